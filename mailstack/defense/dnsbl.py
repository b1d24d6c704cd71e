"""DNS block lists and allow lists, scored the way Postfix's postscreen does.

A site is "domain[=filter][*weight]" (postscreen_dnsbl_sites syntax):

    zen.spamhaus.org*3                    any 127.0.0.x answer counts 3
    bl.example=127.0.0.[2..11]*2          only answers 127.0.0.2 .. 127.0.0.11 count
    list.dnswl.org=127.0.[0..255].[1..3]*-2   an allow list: listed clients score lower

The client's address is looked up as the list's A record (1.2.3.4 -> 4.3.2.1.domain,
IPv6 as nibbles).  Every list is asked at once; the weights of those that list the
client add up, and a total at or above the threshold refuses the client.  A list that
times out or fails counts as not listing (the mail is not held up by a broken list).
Answers outside 127.0.0.0/8, and the 127.255.255.x codes the big lists use for "query
refused" / "you query through an open or public resolver" / "rate limited", are errors
of the lookup, not listings: they are logged and ignored, or every client would be
refused the day a list stops answering this server.
Answers are cached by their TTL in the resolver (dns.py's shared cache).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from dataclasses import dataclass

from ..dns import DnsError

log = logging.getLogger("mailstack.defense")

_SITE = re.compile(r"^([A-Za-z0-9.-]+?)(?:=([0-9.;\[\]]+))?(?:\*(-?\d+))?$")
_OCTET = re.compile(r"^(?:\d{1,3}|\[\d{1,3}\.\.\d{1,3}\]|\[\d{1,3}(?:;\d{1,3})*\])$")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")  # Spamhaus & co: query refused / open resolver
MAX_SITES = 32


@dataclass(frozen=True)
class Site:
    domain: str
    filter: tuple | None  # four sets of allowed octet values, or None = any 127.x answer
    weight: int

    def matches(self, address: str) -> bool:
        if self.filter is None:
            return True
        octets = address.split(".")
        return len(octets) == 4 and all(int(o) in allowed for o, allowed in zip(octets, self.filter))


def _octet_set(text: str) -> frozenset[int]:
    if not _OCTET.match(text):
        raise ValueError(f"bad octet pattern {text!r}")
    if text.startswith("[") and ".." in text:
        lo, hi = (int(x) for x in text[1:-1].split(".."))
        if not 0 <= lo <= hi <= 255:
            raise ValueError(f"bad octet range {text!r}")
        return frozenset(range(lo, hi + 1))
    values = [int(x) for x in text.strip("[]").split(";")]
    if any(v > 255 for v in values):
        raise ValueError(f"octet out of range in {text!r}")
    return frozenset(values)


def parse_site(text: str) -> Site:
    """"domain[=filter][*weight]" -> Site; ValueError with a reason otherwise."""
    m = _SITE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not domain[=filter][*weight]")
    domain, pattern, weight = m.group(1).strip(".").lower(), m.group(2), m.group(3)
    if "." not in domain or ".." in domain:
        raise ValueError(f"{text!r}: {domain!r} is not a DNS list domain")
    filt = None
    if pattern:
        parts = re.findall(r"\[[^\]]*\]|[^.]+", pattern)
        if len(parts) != 4 or ".".join(parts) != pattern:
            raise ValueError(f"{text!r}: filter {pattern!r} must have four octets")
        filt = tuple(_octet_set(p) for p in parts)
    w = int(weight) if weight is not None else 1
    if w == 0 or abs(w) > 1000:
        raise ValueError(f"{text!r}: weight must be a non-zero number between -1000 and 1000")
    return Site(domain, filt, w)


def query_name(ip: str, domain: str) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.version == 4:
        return ".".join(reversed(str(addr).split("."))) + "." + domain
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + domain


@dataclass
class Result:
    score: int = 0
    listed_by: tuple[str, ...] = ()  # block lists (weight > 0) that list the client
    allowed_by: tuple[str, ...] = ()  # allow lists (weight < 0) that list the client


async def _ask(resolver, site: Site, ip: str) -> bool:
    name = query_name(ip, site.domain)
    if name is None:
        return False
    try:
        answers = await resolver.addresses(name, "ipv4")
    except DnsError as e:
        if e.temporary:
            log.info("dnsbl %s: lookup for %s failed: %s", site.domain, ip, e)
        return False
    hit = False
    for a in answers:
        try:
            addr = ipaddress.ip_address(a)
        except ValueError:
            continue
        if addr in ERROR_CODES or not addr.is_loopback:
            log.warning("dnsbl %s: answer %s for %s is an error code of the list (query refused, open "
                        "resolver or limit), not a listing: ignored", site.domain, a, ip)
            return False
        if site.matches(a):
            hit = True
    return hit


async def lookup(resolver, sites: list[Site], ip: str, timeout: float) -> Result:
    """Ask every list at once; a list that has not answered within `timeout` does not list."""
    tasks = [asyncio.ensure_future(_ask(resolver, site, ip)) for site in sites[:MAX_SITES]]
    done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for t in pending:
        t.cancel()
        log.info("dnsbl %s: no answer for %s within %.1fs", sites[tasks.index(t)].domain, ip, timeout)
    result = Result()
    for site, task in zip(sites, tasks):
        if task in done and not task.cancelled() and task.exception() is None and task.result():
            result.score += site.weight
            if site.weight > 0:
                result.listed_by += (site.domain,)
            else:
                result.allowed_by += (site.domain,)
    return result
