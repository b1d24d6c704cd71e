"""Client addresses against configured networks (smtp.trusted_networks, proxy.trusted)."""
from __future__ import annotations

import ipaddress
from typing import Iterable


def address_in(ip: str | None, networks: Iterable) -> bool:
    """Is `ip` inside one of `networks`? An IPv4-mapped IPv6 address (::ffff:192.0.2.1, as a
    dual-stack socket reports IPv4 clients) counts as its IPv4 address; a zone (%eth0) is
    ignored; anything unparsable is outside."""
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)
