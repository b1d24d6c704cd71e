"""Async DNS for outbound routing, on dnspython.

Answers are reduced to what delivery needs: an ordered list of MX hosts, the
addresses of one host, TXT strings.  Failures are DnsError with `temporary` set
the way Postfix decides: timeouts and SERVFAIL defer, NXDOMAIN and Null MX bounce.
Name servers come from the config (`dns.nameservers`) so tests can point the
resolver at a real DNS server on loopback.
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from .nexthop import parse_nameserver, to_alabel


class DnsError(Exception):
    """A lookup that gave no usable answer. str() is a Postfix-style reason for a log or a DSN."""

    def __init__(self, reason: str, temporary: bool, status: str = "") -> None:
        super().__init__(reason)
        self.temporary = temporary
        # Enhanced status code (RFC 3463) for the DSN.
        self.status = status or ("4.4.3" if temporary else "5.4.4")


class NullMX(DnsError):
    """The domain publishes a Null MX (RFC 7505): it accepts no mail at all."""

    def __init__(self, domain: str) -> None:
        super().__init__(f"Domain {domain} does not accept mail (nullMX)", temporary=False, status="5.1.10")


@dataclass(frozen=True)
class MXHost:
    name: str  # A-label host name without the trailing dot
    preference: int
    implicit: bool = False  # no MX records: the domain itself (RFC 5321 5.1)


def _shuffle_equal_preferences(hosts: list[MXHost], rng: random.Random) -> list[MXHost]:
    """Sort by preference; hosts of equal preference in random order (RFC 5321 5.1)."""
    groups: dict[int, list[MXHost]] = {}
    for h in hosts:
        groups.setdefault(h.preference, []).append(h)
    ordered: list[MXHost] = []
    for pref in sorted(groups):
        group = groups[pref]
        rng.shuffle(group)
        ordered += group
    return ordered


MAX_CACHED_ANSWERS = 10000  # as many as dnspython's own cache keeps


class Resolver:
    """One dnspython async resolver with a cache shared by all deliveries."""

    def __init__(self, nameservers: list[tuple[str, int]] | None = None, timeout: float = 10.0,
                 rng: random.Random | None = None) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=True)
        self._resolver.lifetime = timeout
        # One try per server should not eat the whole lifetime: leave room for a retry.
        self._resolver.timeout = max(timeout / 3, 0.1)
        self._resolver.cache = dns.resolver.LRUCache(10000)
        self._rng = rng or random.Random()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        # records()' answers as it returns them, until dnspython's expiration (the TTL): a warm
        # answer then costs a dict look-up instead of a task, a shield and dnspython's cache
        # (~25 us of CPU each; sender authentication asks several times for every message).
        self._answers: dict[tuple[str, str], tuple[float, tuple]] = {}

    @classmethod
    def from_config(cls, cfg) -> "Resolver":
        servers = [parse_nameserver(s) for s in cfg.dns.nameservers]
        return cls(servers, cfg.dns.timeout)

    async def _query(self, name: str, rdtype: str):
        """Answer or None for "exists, but no records of this type"; DnsError otherwise."""
        try:
            return await self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=True)
        except dns.resolver.NXDOMAIN:
            raise DnsError(f"Host or domain name not found. Name service error for name={name} "
                           f"type={rdtype}: Host not found", temporary=False) from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.YXDOMAIN:
            raise DnsError(f"Name service error for name={name} type={rdtype}: name too long",
                           temporary=False) from None
        except dns.resolver.NoNameservers:  # SERVFAIL / REFUSED from every server
            raise DnsError(f"Host or domain name not found. Name service error for name={name} "
                           f"type={rdtype}: Host not found, try again", temporary=True) from None
        except dns.exception.Timeout:
            raise DnsError(f"Name service error for name={name} type={rdtype}: DNS lookup timed out",
                           temporary=True) from None
        except dns.exception.DNSException as e:
            raise DnsError(f"Name service error for name={name} type={rdtype}: {e}", temporary=True) from None

    async def mx_hosts(self, domain: str) -> list[MXHost]:
        """MX hosts of `domain` in the order to try. Raises DnsError / NullMX.

        CNAME chains are followed by the resolver; with no MX records the domain's
        own address records are used (implicit MX).
        """
        try:
            domain = to_alabel(domain)
        except ValueError as e:
            raise DnsError(str(e), temporary=False, status="5.1.2") from None
        if _is_ip(domain):  # an address literal is not a domain; nobody should MX-route it
            raise DnsError(f"{domain}: an address is not a mail domain", temporary=False, status="5.1.2")
        answer = await self._query(domain, "MX")
        if answer is None:
            return [MXHost(domain, 0, implicit=True)]
        hosts = []
        null_mx = False
        for rr in answer:
            if rr.exchange == dns.name.root:
                null_mx = True
                continue
            hosts.append(MXHost(rr.exchange.to_text(omit_final_dot=True).lower(), rr.preference))
        if not hosts:
            if null_mx:
                raise NullMX(domain)
            raise DnsError(f"Name service error for name={domain} type=MX: no usable MX host", temporary=False)
        return _shuffle_equal_preferences(hosts, self._rng)

    async def addresses(self, host: str, families: str = "all") -> list[str]:
        """IP addresses of `host` (IPv4 first). Raises DnsError when there are none.

        A temporary failure of one family with an answer from the other is not an
        error: use what we have.
        """
        if _is_ip(host):
            return [host]
        try:
            host = to_alabel(host)
        except ValueError as e:
            raise DnsError(str(e), temporary=False) from None
        types = {"all": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}[families]
        results = await asyncio.gather(*(self._query(host, t) for t in types), return_exceptions=True)
        addrs: list[str] = []
        errors: list[DnsError] = []
        for result in results:
            if isinstance(result, DnsError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result is not None:
                addrs += [rr.address for rr in result]
        if addrs:
            return addrs
        temporary = [e for e in errors if e.temporary]
        if temporary:
            raise temporary[0]
        if errors:
            raise errors[0]
        raise DnsError(f"Host or domain name not found. Name service error for name={host} "
                       f"type={'/'.join(types)}: No address associated with hostname", temporary=False)

    async def txt(self, name: str) -> list[str]:
        """TXT strings of `name`, each record's strings joined. [] when there are none."""
        answer = await self._query(to_alabel(name), "TXT")
        if answer is None:
            return []
        return [b"".join(rr.strings).decode("utf-8", "replace") for rr in answer]

    async def ptr(self, ip: str) -> list[str]:
        """Reverse names of address `ip` (PTR), without the trailing dot. Raises DnsError."""
        import dns.reversename
        answer = await self._query(dns.reversename.from_address(ip).to_text(), "PTR")
        return [rr.target.to_text(omit_final_dot=True) for rr in answer or ()]


    # --- lookups for sender authentication (SPF, DKIM, DMARC, ARC) --------------------------
    # senderauth/ evaluates over this small interface: `records(name, rdtype)` answers a list
    # (empty for NXDOMAIN and for "no records of this type", which SPF counts alike as void
    # lookups) or raises DnsError(temporary=True) for timeouts and SERVFAIL.  Values:
    #   TXT  -> bytes (the record's character-strings concatenated, RFC 7208 3.3)
    #   A, AAAA -> address text;  MX -> (preference, host);  PTR, CNAME -> host
    # Host names come back lower-case without the final dot.
    async def records(self, name: str, rdtype: str) -> list:
        key = (name.lower(), rdtype)
        hit = self._answers.get(key)
        if hit is not None and hit[0] > time.time():
            return list(hit[1])
        # Sessions asking the same question at the same moment share one query: a burst of
        # mail from one sender costs the DNS server one packet, not one per session.
        pending = self._inflight.get(key)
        if pending is not None:
            return list(await asyncio.shield(pending))
        task = asyncio.ensure_future(self._records(name, rdtype))
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._query_done(key, done))
        return list(await asyncio.shield(task))

    def cached(self, name: str, rdtype: str) -> list | None:
        """What records() would answer now without a query (within the TTL), else None."""
        hit = self._answers.get((name.lower(), rdtype))
        return list(hit[1]) if hit is not None and hit[0] > time.time() else None

    def _remember(self, key: tuple[str, str], expiration: float, out: list) -> None:
        if expiration <= time.time():  # TTL 0: not kept, as dnspython does not keep it
            return
        self._answers.pop(key, None)  # re-inserted last: the first entries are the oldest
        if len(self._answers) >= MAX_CACHED_ANSWERS:
            del self._answers[next(iter(self._answers))]
        self._answers[key] = (expiration, tuple(out))

    def _query_done(self, key: tuple[str, str], task: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # seen: every session that asked may have given up already

    async def _records(self, name: str, rdtype: str) -> list:
        try:
            text = (name if name.isascii() else to_alabel(name)).rstrip(".")
            # From labels, not zone text: an SPF macro may expand to a label with blanks.
            qname = dns.name.Name([label.encode() for label in text.split(".")] + [b""])
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return []  # not a valid DNS name: nothing can exist there
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            # dnspython keeps "no such name" under the type ANY (the SOA's negative TTL, or its
            # default): kept here for as long, most sender domains publish no _dmarc name.
            missing = self._resolver.cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
            if missing is not None and missing.response.rcode() == dns.rcode.NXDOMAIN:
                self._remember((name.lower(), rdtype), missing.expiration, [])
            return []
        except dns.resolver.YXDOMAIN:
            return []
        except dns.resolver.NoNameservers:
            raise DnsError(f"name={name} type={rdtype}: SERVFAIL", temporary=True) from None
        except dns.exception.Timeout:
            raise DnsError(f"name={name} type={rdtype}: DNS lookup timed out", temporary=True) from None
        except dns.exception.DNSException as e:
            raise DnsError(f"name={name} type={rdtype}: {e}", temporary=True) from None
        out: list = []
        want = dns.rdatatype.from_text(rdtype)
        for rrset in answer.response.answer if answer.rrset is not None else ():
            if rrset.rdtype != want:
                continue
            for rr in rrset:
                if rdtype == "TXT":
                    out.append(b"".join(rr.strings))
                elif rdtype in ("A", "AAAA"):
                    out.append(rr.address)
                elif rdtype == "MX":
                    host = "" if rr.exchange == dns.name.root else rr.exchange.to_text(omit_final_dot=True)
                    out.append((rr.preference, host.lower()))
                else:  # PTR, CNAME
                    out.append(rr.target.to_text(omit_final_dot=True).lower())
        self._remember((name.lower(), rdtype), answer.expiration, out)
        return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


_SHARED: dict[tuple, Resolver] = {}


def shared(cfg) -> Resolver:
    """The process's one resolver for these settings: its cache (dnspython's, by TTL) is
    shared by every session and check.  A reload with other name servers gets a new one."""
    key = (tuple(cfg.dns.nameservers), cfg.dns.timeout)
    resolver = _SHARED.get(key)
    if resolver is None:
        _SHARED.clear()  # settings changed: the old one is no longer wanted
        resolver = _SHARED[key] = Resolver.from_config(cfg)
    return resolver
