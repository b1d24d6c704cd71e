"""SPF (RFC 7208): check_host() over a resolver, and the pure parts it is made of.

    result = await check_host(resolver, ip, domain, sender, helo)
    result.result       "pass" | "fail" | "softfail" | "neutral" | "none" | "temperror" | "permerror"
    result.explanation  for "fail": the domain's exp= text (or our default)
    result.reason       a short text for logs and Authentication-Results comments

parse_record() (text -> terms) and expand() (macro-string -> text) do no I/O, so they can
be fuzzed; the evaluator counts DNS-querying terms (at most 10) and void lookups (at most
2) over the whole evaluation, includes and redirects included (RFC 7208 4.6.4).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field

from ..dns import DnsError

MAX_DNS_TERMS = 10  # 4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID = 2  # 4.6.4: lookups answering NXDOMAIN or nothing
MAX_MX_NAMES = 10
MAX_PTR_NAMES = 10
DEFAULT_EXPLANATION = "Please see http://www.open-spf.org/Why"

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")


class PermError(Exception):
    """The record (or what it leads to) is broken: result permerror."""


class TempError(Exception):
    """A DNS failure that may go away: result temperror."""


@dataclass(frozen=True)
class Mechanism:
    qualifier: str  # "pass" | "fail" | "softfail" | "neutral"
    name: str  # one of _MECHANISMS
    domain: str | None = None  # domain-spec (unexpanded macro-string) or None
    cidr4: int | None = None
    cidr6: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # ip4/ip6


@dataclass
class Record:
    mechanisms: list[Mechanism] = field(default_factory=list)
    redirect: str | None = None
    exp: str | None = None


@dataclass
class Result:
    result: str
    reason: str = ""
    explanation: str | None = None
    domain: str = ""  # the domain checked

    def __str__(self) -> str:
        return self.result


# --- pure parts ------------------------------------------------------------------------
_MACRO = re.compile(r"%(?:\{([slodiphcrtvSLODIPHCRTV])(\d*)(r?)([.\-+,/_=]*)\}|(.)|$)", re.I)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9\-_.]*$")
_TOPLABEL = re.compile(r"^(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])$")
_CIDR = re.compile(r"^(?P<spec>.*?)(?:/(?P<c4>0|[1-9]\d*))?(?://(?P<c6>0|[1-9]\d*))?$", re.S)


def is_spf_record(txt: bytes) -> bool:
    """4.5: a record starts with "v=spf1" followed by a space or its end (case-insensitive)."""
    head = txt[:7].lower()
    return head == b"v=spf1" or head == b"v=spf1 "


def _check_macro_string(text: str, exp: bool = False) -> None:
    """7.1: every % starts a valid macro; c, r, t only in explanations."""
    pos = 0
    while True:
        i = text.find("%", pos)
        if i < 0:
            return
        m = _MACRO.match(text, i)
        if m is None or m.end() == i:
            raise PermError(f"bad macro in {text!r}")
        if m.group(1):
            if m.group(1).lower() in "crt" and not exp:
                raise PermError(f"macro %{{{m.group(1)}}} only allowed in exp")
            if m.group(2) and int(m.group(2)) == 0:
                raise PermError("macro digit transformer 0")
        elif m.group(5) is None or m.group(5) not in "%_-":
            raise PermError(f"bad macro in {text!r}")
        pos = m.end()


def _check_domain_spec(spec: str) -> None:
    """4.8: a domain-spec is a macro-string ending in a top label or a macro."""
    if not spec:
        raise PermError("empty domain-spec")
    _check_macro_string(spec)
    if any(c.isspace() for c in spec):
        raise PermError("blank in domain-spec")
    if spec.endswith("}") and "%{" in spec:  # ends with a macro-expand
        return
    trimmed = spec[:-1] if spec.endswith(".") else spec
    labels = trimmed.split(".")
    if len(labels) < 2 or not _TOPLABEL.match(labels[-1]):
        raise PermError(f"{spec!r} does not end in a top-level domain label")


def _parse_cidr(text: str, six_only: bool = False) -> tuple[str, int | None, int | None]:
    m = _CIDR.match(text)
    if m is None:  # pragma: no cover - the pattern matches everything
        raise PermError(f"bad CIDR in {text!r}")
    c4 = int(m.group("c4")) if m.group("c4") is not None else None
    c6 = int(m.group("c6")) if m.group("c6") is not None else None
    if (c4 is not None and c4 > 32) or (c6 is not None and c6 > 128):
        raise PermError(f"CIDR length out of range in {text!r}")
    return m.group("spec"), c4, c6


@functools.lru_cache(maxsize=1024)  # the same few records arrive over and over; never mutated
def parse_record(text: str) -> Record:
    """'v=spf1 ...' -> Record. Raises PermError for anything RFC 7208 calls a syntax error."""
    if not is_spf_record(text.encode("utf-8", "surrogateescape")):
        raise PermError("not an SPF record")
    if not text.isascii():
        raise PermError("non-ASCII characters in the record")
    record = Record()
    for term in text[6:].split(" "):
        if not term:
            continue
        name, eq, value = term.partition("=")
        if eq and _NAME.match(name) and not name.lower() in _MECHANISMS:
            # 4.6.1 modifier: name "=" macro-string
            lower = name.lower()
            if lower == "redirect":
                if record.redirect is not None:
                    raise PermError("redirect= given twice")
                _check_domain_spec(value)
                record.redirect = value
            elif lower == "exp":
                if record.exp is not None:
                    raise PermError("exp= given twice")
                _check_domain_spec(value)
                record.exp = value
            else:
                _check_macro_string(value)  # unknown modifiers are ignored, but must parse
            continue
        record.mechanisms.append(_parse_mechanism(term))
    return record


def _parse_mechanism(term: str) -> Mechanism:
    qualifier = "pass"
    if term[0] in _QUALIFIERS:
        qualifier, term = _QUALIFIERS[term[0]], term[1:]
    m = re.match(r"^([A-Za-z0-9]+)", term)
    if m is None:
        raise PermError(f"unknown mechanism {term!r}")
    name, rest = m.group(1).lower(), term[m.end():]
    if name not in _MECHANISMS:
        raise PermError(f"unknown mechanism {name!r}")
    if name == "all":
        if rest:
            raise PermError(f"bad term {term!r}")
        return Mechanism(qualifier, name)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise PermError(f"{name} needs a domain")
        _check_domain_spec(rest[1:])
        return Mechanism(qualifier, name, rest[1:])
    if name in ("a", "mx", "ptr"):
        if rest and rest[0] not in ":/":
            raise PermError(f"bad term {term!r}")
        spec, c4, c6 = _parse_cidr(rest)
        if name == "ptr" and (c4 is not None or c6 is not None):
            raise PermError("ptr takes no CIDR length")
        domain = None
        if spec:
            if not spec.startswith(":"):
                raise PermError(f"bad term {term!r}")
            domain = spec[1:]
            _check_domain_spec(domain)
        return Mechanism(qualifier, name, domain, c4, c6)
    # ip4 / ip6
    if not rest.startswith(":"):
        raise PermError(f"{name} needs an address")
    addr, slash, length = rest[1:].partition("/")
    try:
        if name == "ip4":
            if not re.fullmatch(r"(?:0|[1-9]\d{0,2})(?:\.(?:0|[1-9]\d{0,2})){3}", addr):
                raise ValueError(addr)
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(addr)
            limit = 32
        else:
            ip = ipaddress.IPv6Address(addr)
            limit = 128
        bits = limit
        if slash:
            if not re.fullmatch(r"0|[1-9]\d{0,2}", length) or int(length) > limit:
                raise ValueError(length)
            bits = int(length)
        network = ipaddress.ip_network(f"{ip}/{bits}", strict=False)
    except ValueError:
        raise PermError(f"bad address in {term!r}") from None
    return Mechanism(qualifier, name, network=network)


@dataclass
class MacroContext:
    sender: str  # the <sender> identity (local@domain)
    domain: str  # <domain> of the current check_host()
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    helo: str
    receiver: str = "unknown"
    validated: str | None = None  # %{p}, filled on demand by the evaluator
    now: int = 0


def _ip_macro(ip) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


def expand(text: str, ctx: MacroContext, exp: bool = False) -> str:
    """7.3: expand a macro-string. %{p} must already be in ctx.validated (or "unknown")."""
    local, _, sdomain = ctx.sender.rpartition("@")
    out = []
    pos = 0
    for m in _MACRO.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
        letter, digits, reverse, delims, escape = m.groups()
        if letter is None:
            if escape is None:
                raise PermError("% at the end of a macro-string")
            if escape not in "%_-":
                raise PermError(f"bad macro %{escape}")
            out.append({"%": "%", "_": " ", "-": "%20"}[escape])
            continue
        key = letter.lower()
        if key in "crt" and not exp:
            raise PermError(f"macro %{{{letter}}} only allowed in exp")
        value = {
            "s": ctx.sender, "l": local or "postmaster", "o": sdomain, "d": ctx.domain,
            "i": _ip_macro(ctx.ip), "p": ctx.validated or "unknown", "h": ctx.helo,
            "v": "in-addr" if ctx.ip.version == 4 else "ip6", "c": str(ctx.ip),
            "r": ctx.receiver, "t": str(ctx.now or int(time.time())),
        }[key]
        parts = re.split("[" + re.escape(delims) + "]", value) if delims else value.split(".")
        if reverse:
            parts.reverse()
        if digits:
            n = int(digits)
            if n == 0:
                raise PermError("macro digit transformer 0")
            parts = parts[-n:]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="-._~")
        out.append(value)
    out.append(text[pos:])
    return "".join(out)


def _domain_after_expansion(text: str) -> str:
    """7.3: a name longer than 253 characters loses labels on the left until it fits."""
    text = text.rstrip(".")
    while len(text) > 253 and "." in text:
        text = text.split(".", 1)[1]
    return text


def valid_domain(domain: str) -> bool:
    """4.3: a multi-label name whose labels are 1..63 octets."""
    domain = domain.rstrip(".")
    labels = domain.split(".")
    return (len(labels) >= 2 and len(domain) <= 253
            and all(0 < len(lbl.encode("utf-8", "surrogateescape")) <= 63 for lbl in labels))


# --- evaluation ---------------------------------------------------------------------------
class _Evaluation:
    """State of one check_host() including its includes and redirects (shared limits)."""

    def __init__(self, resolver, ip, sender: str, helo: str, receiver: str) -> None:
        self.resolver = resolver
        self.ip = ip
        self.sender = sender
        self.helo = helo
        self.receiver = receiver
        self.dns_terms = 0
        self.void = 0
        self._validated: dict[str, str] = {}

    async def query(self, name: str, rdtype: str, count_void: bool = True) -> list:
        try:
            answer = await self.resolver.records(name, rdtype)
        except DnsError as e:
            raise TempError(str(e)) from None
        if not answer and count_void:
            self.void += 1
            if self.void > MAX_VOID:
                raise PermError("too many void DNS lookups")
        return answer

    def count_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise PermError("too many DNS lookups")

    def ctx(self, domain: str) -> MacroContext:
        return MacroContext(self.sender, domain, self.ip, self.helo, self.receiver)

    async def expand_domain(self, spec: str, domain: str) -> str:
        ctx = self.ctx(domain)
        if "%{p" in spec.lower():
            ctx.validated = await self.validated_name(domain)
        return _domain_after_expansion(expand(spec, ctx))

    async def host_addresses(self, host: str, count_void: bool = True) -> list:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        return [ipaddress.ip_address(a) for a in await self.query(host, rdtype, count_void)]

    async def validated_names(self, limit: int = MAX_PTR_NAMES) -> list[str]:
        """5.5: the client's PTR names that resolve back to the client's address."""
        rev = self.ip.reverse_pointer
        try:
            names = await self.query(rev, "PTR")
        except TempError:
            return []
        out = []
        for name in names[:limit]:
            try:
                if self.ip in await self.host_addresses(name, count_void=False):
                    out.append(name)
            except TempError:
                continue
        return out

    async def validated_name(self, domain: str) -> str:
        """%{p}: a validated name, preferring one in `domain`."""
        domain = domain.lower()
        if domain not in self._validated:
            names = await self.validated_names()
            best = next((n for n in names if n == domain), None) \
                or next((n for n in names if n.endswith("." + domain)), None) \
                or (names[0] if names else "unknown")
            self._validated[domain] = best
        return self._validated[domain]

    async def check_host(self, domain: str, depth: int = 0) -> tuple[str, str, Record | None, str]:
        """(result, reason, record, domain) for one domain."""
        if depth > 20:  # the term limit stops loops first; this is belt and braces
            raise PermError("include/redirect loop")
        if not valid_domain(domain):
            return "none", f"{domain!r} is not a valid domain", None, domain
        try:
            txts = await self.resolver.records(domain, "TXT")
        except DnsError as e:
            raise TempError(str(e)) from None
        spf = [t for t in txts if is_spf_record(t)]
        if not spf:
            return "none", f"no SPF record for {domain}", None, domain
        if len(spf) > 1:
            raise PermError(f"more than one SPF record for {domain}")
        try:
            text = spf[0].decode("utf-8")
        except UnicodeDecodeError:
            raise PermError(f"SPF record of {domain} is not valid text") from None
        record = parse_record(text)
        for mech in record.mechanisms:
            if await self.matches(mech, domain, depth):
                return mech.qualifier, f"{domain}: matched {_show(mech)}", record, domain
        if record.redirect is not None:
            self.count_term()
            target = await self.expand_domain(record.redirect, domain)
            result, reason, sub, subdomain = await self.check_host(target, depth + 1)
            if result == "none":
                raise PermError(f"redirect to {target}: no SPF record")
            return result, reason, sub, subdomain
        return "neutral", f"{domain}: no mechanism matched", record, domain

    async def matches(self, mech: Mechanism, domain: str, depth: int) -> bool:
        name = mech.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            return self.ip.version == mech.network.version and self.ip in mech.network
        self.count_term()
        target = await self.expand_domain(mech.domain, domain) if mech.domain is not None else domain
        if name == "include":
            result, reason, _, _ = await self.check_host(target, depth + 1)
            if result == "pass":
                return True
            if result in ("fail", "softfail", "neutral"):
                return False
            if result == "none":
                raise PermError(f"include:{target} has no SPF record")
            raise PermError(reason)  # permerror inside (temperror raised already)
        if name == "exists":
            return bool(await self.query(target, "A"))
        if name == "a":
            return self._in_any(await self.host_addresses(target), mech)
        if name == "mx":
            mx = await self.query(target, "MX")
            if len(mx) > MAX_MX_NAMES:
                raise PermError(f"{target} has more than {MAX_MX_NAMES} MX records")
            for _, host in sorted(mx):
                if host in ("", "."):
                    continue
                if self._in_any(await self.host_addresses(host, count_void=False), mech):
                    return True
            return False
        if name == "ptr":
            names = await self.validated_names()
            target = target.lower()
            return any(n == target or n.endswith("." + target) for n in names)
        raise PermError(f"unknown mechanism {name}")  # pragma: no cover

    def _in_any(self, addresses: list, mech: Mechanism) -> bool:
        bits = (mech.cidr4 if mech.cidr4 is not None else 32) if self.ip.version == 4 \
            else (mech.cidr6 if mech.cidr6 is not None else 128)
        net = ipaddress.ip_network(f"{self.ip}/{bits}", strict=False)
        return any(a.version == self.ip.version and a in net for a in addresses)

    async def explanation(self, record: Record, domain: str) -> str | None:
        """6.2: the exp= text of a "fail", or None when there is none or it is unusable."""
        if record.exp is None:
            return None
        try:
            target = await self.expand_domain(record.exp, domain)
            txts = await self.resolver.records(target, "TXT")
            if len(txts) != 1:
                return None
            text = txts[0].decode("ascii")
            ctx = self.ctx(domain)
            if "%{p" in text.lower():
                ctx.validated = await self.validated_name(domain)
            _check_macro_string(text, exp=True)
            return expand(text, ctx, exp=True)
        except (PermError, TempError, DnsError, UnicodeDecodeError):
            return None


def _show(mech: Mechanism) -> str:
    q = {"pass": "", "fail": "-", "softfail": "~", "neutral": "?"}[mech.qualifier]
    if mech.network is not None:
        return f"{q}{mech.name}:{mech.network}"
    return f"{q}{mech.name}" + (f":{mech.domain}" if mech.domain else "")


def client_ip(ip: str):
    """The client address; an IPv4-mapped IPv6 address is checked as IPv4 (RFC 7208 5)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


async def check_host(resolver, ip: str, domain: str, sender: str, helo: str = "",
                     receiver: str = "unknown") -> Result:
    """RFC 7208 check_host(<ip>, <domain>, <sender>). `sender` is local@domain; a sender
    without a local part is postmaster@domain (4.3)."""
    local, at, sdomain = sender.rpartition("@")
    if not at:
        sender = f"postmaster@{sender}"
    elif not local:
        sender = f"postmaster@{sdomain}"
    domain = domain.rstrip(".")
    ev = _Evaluation(resolver, client_ip(ip), sender, helo, receiver)
    try:
        result, reason, record, where = await ev.check_host(domain)
    except TempError as e:
        return Result("temperror", str(e), domain=domain)
    except PermError as e:
        return Result("permerror", str(e), domain=domain)
    explanation = None
    if result == "fail" and record is not None:
        explanation = await ev.explanation(record, where) or DEFAULT_EXPLANATION
    return Result(result, reason, explanation, domain)
