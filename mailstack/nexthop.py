"""Next-hop syntax shared by the config checks and outbound routing.

Postfix's form: "[host]:port" means "connect to host, no MX lookup"; "host" or
"host:port" means "look up host's MX records first" (port defaults to 25).
Kept free of imports beyond the standard library so config.py can use it.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class NextHop:
    host: str  # A-label domain name or IP address literal
    port: int | None = None  # None: the configured default (delivery.port, 25)
    mx: bool = True  # False for "[host]": connect to the host's addresses directly

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx else self.host
        return f"{host}:{self.port}" if self.port else host


def to_alabel(name: str) -> str:
    """A domain name in the ASCII (A-label) form DNS lookups and EHLO need.

    Raises ValueError for names IDNA cannot encode. Python's built-in codec is
    IDNA 2003; good enough here because every name goes through the same path.
    """
    name = name.strip().rstrip(".").lower()
    if not name:
        raise ValueError("empty domain name")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"not a valid international domain name: {name!r} ({e})") from None


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    host = to_alabel(host)
    labels = host.split(".")
    if len(host) > 253 or any(not label or len(label) > 63 for label in labels) or \
            not all(c.isalnum() or c in "-_" for label in labels for c in label):
        raise ValueError(f"{host!r} is not a host name")
    return host


def parse_nexthop(text: str) -> NextHop:
    """'[mx.example.com]:587' / '[192.0.2.1]' / 'example.com' / 'example.com:2525' -> NextHop."""
    text = text.strip()
    if text.startswith("smtp:"):  # accept Postfix's transport prefix, it means the same
        text = text[5:]
    port = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        mx = False
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not [host]:port")
            port_text = rest[1:]
            if not port_text:
                raise ValueError(f"{text!r}: no port after ':'")
        else:
            port_text = ""
    else:
        mx = True
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        elif ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:25")
        elif not port_text:
            raise ValueError(f"{text!r}: no port after ':'")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"{text!r}: bad port {port_text!r}")
        port = int(port_text)
    if not host:
        raise ValueError(f"{text!r}: no host")
    return NextHop(_check_host(host), port, mx)


def parse_nameserver(text: str) -> tuple[str, int]:
    """'127.0.0.1', '127.0.0.1:5353', '[::1]:53', '::1' -> (ip, port). Name servers are addresses."""
    text = text.strip()
    port_text = ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [address]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: a name server must be an IP address") from None
    port = 53
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"{text!r}: bad port {port_text!r}")
        port = int(port_text)
    return host, port
