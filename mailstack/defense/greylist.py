"""Greylisting (as postgrey does it): a triplet seen for the first time gets "try later".

The triplet is (client network, sender, recipient): the client's /24 (IPv4) or /64
(IPv6), because big senders retry from another address of the same pool; the sender
with its +extension and VERP-style numbers folded, so a bounce-address per message
does not make every retry a new triplet.  A retry after `delay` and within `max_age` of
the first attempt passes, and the triplet is then known for `pass_ttl`.  A client
network that passed `auto_allow` different triplets is accepted without greylisting
from then on (postgrey's --auto-whitelist-clients).
"""
from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

from .state import StateStore

REPLY = "451 4.7.1 Greylisted, please try again later"
_DIGITS = re.compile(r"\d+")


def client_network(ip: str) -> str:
    """1.2.3.4 -> 1.2.3.0/24; 2001:db8::1 -> 2001:db8::/64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def normalize_sender(sender: str) -> str:
    """Fold what changes from message to message: +extensions and numbers in the local part."""
    if not sender:
        return "<>"
    local, at, domain = sender.rpartition("@")
    if not at:
        return sender.lower()
    local = local.split("+", 1)[0]
    local = _DIGITS.sub("#", local)
    return f"{local}@{domain}".lower()


@dataclass
class Settings:
    delay: float = 300.0
    max_age: float = 86400.0
    pass_ttl: float = 35 * 86400.0
    auto_allow: int = 5


class Greylist:
    def __init__(self, state: StateStore, settings: Settings, clock=time.time) -> None:
        self.state = state
        self.settings = settings
        self.clock = clock

    async def allowed_client(self, ip: str) -> bool:
        """The client's network passed often enough to skip greylisting."""
        if self.settings.auto_allow <= 0:
            return False
        count = await self.state.get(f"gl-client:{client_network(ip)}")
        return count is not None and int(count) >= self.settings.auto_allow

    async def check(self, ip: str, sender: str, rcpt: str) -> tuple[bool, str]:
        """(passes, why) for one recipient. why: new | early | passed | known | allowed."""
        s = self.settings
        net = client_network(ip)
        if await self.allowed_client(ip):
            return True, "allowed"
        key = f"gl:{net}|{normalize_sender(sender)}|{rcpt.lower()}"
        now = self.clock()
        record = await self.state.get(key)
        if record is not None:
            first, _, passed = record.partition(":")
            first_seen = float(first)
            if passed:
                await self.state.put(key, record, s.pass_ttl)  # still in use: keep it
                return True, "known"
            waited = now - first_seen
            if waited < s.delay:
                return False, "early"
            if waited <= s.max_age:
                await self.state.put(key, f"{first}:passed", s.pass_ttl)
                await self.state.incr(f"gl-client:{net}", s.pass_ttl)
                return True, "passed"
        await self.state.put(key, f"{now:.3f}:", s.max_age)
        return False, "new"
