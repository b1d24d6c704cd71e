"""PROXY protocol v1 and v2 (HAProxy's spec): the real client address behind a proxy.

Two parts, as h11 splits its work:

  - parse(data): a pure function over bytes.  It says "need more", returns the header
    (with its exact length) or raises ProxyError.  Bounded: a v1 line is at most 107
    bytes, a v2 header at most V2_MAX_LENGTH.
  - create_server(): what every protocol module uses instead of loop.create_server.
    With proxy.trusted empty it IS loop.create_server (the fast path).  Otherwise a
    small gate protocol stands in front of the session: a connection from a trusted
    proxy must start with a header; the gate peeks at the socket (MSG_PEEK) to size
    each read so that not one byte past the header is consumed (the TLS ClientHello
    that follows belongs to the TLS layer, which is why implicit-TLS listeners start
    TLS themselves, after the header, as HAProxy expects).  Anyone else gets the
    session at once, and a PROXY line from them is junk like any other.

Sessions learn their client's address from client_ip(), the one place that knows
about the header; logs, relay decisions, connection limits, login throttling and
Received: lines all take it from there.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Callable
from .netutil import address_in

log = logging.getLogger("mailstack.proxy")

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the spec's worst case, "PROXY TCP6 <ipv6> <ipv6> 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
# Addresses plus TLVs (HAProxy adds ALPN, authority, unique id, SSL details).  The spec
# allows 64 KiB; nothing sane sends more than this, and it bounds what is buffered.
V2_MAX_LENGTH = V2_FIXED + 4096
MAX_HEADER = max(V1_MAX_LENGTH, V2_MAX_LENGTH)

_V2_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header; str() says why."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # bytes the header occupies on the wire
    # The client as the proxy saw it, or None for LOCAL (v2 health checks), UNKNOWN (v1),
    # and address families without an IP: then the connection's own peer is the client.
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of `data`; None if more bytes are needed to tell.

    Raises ProxyError as soon as the bytes cannot be the start of a valid header."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        if b"\n" in data:
            raise ProxyError("PROXY v1 line not ended by CRLF")
        return None
    line = data[len(V1_PREFIX):end]
    fields = line.split(b" ")
    length = end + 2
    if fields[0] == b"UNKNOWN":  # the proxy does not know the client; the rest is to be ignored
        return ProxyHeader(1, length)
    if fields[0] not in (b"TCP4", b"TCP6") or len(fields) != 5:
        raise ProxyError("PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    family = ipaddress.IPv4Address if fields[0] == b"TCP4" else ipaddress.IPv6Address
    try:
        src, dst = (str(family(f.decode("ascii"))) for f in fields[1:3])
    except (ValueError, UnicodeDecodeError):
        raise ProxyError(f"PROXY v1 address is not {fields[0].decode()}") from None
    sport, dport = (_v1_port(f) for f in fields[3:5])
    return ProxyHeader(1, length, (src, sport), (dst, dport))


def _v1_port(field: bytes) -> int:
    if not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[0:1] == b"0"):
        raise ProxyError("PROXY v1 port is not a number from 0 to 65535")
    port = int(field)
    if port > 65535:
        raise ProxyError("PROXY v1 port is not a number from 0 to 65535")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        raise ProxyError("not a PROXY protocol header")
    if len(data) < V2_FIXED:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"PROXY v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2 header with unknown command {command}")
    total = V2_FIXED + length
    if total > V2_MAX_LENGTH:
        raise ProxyError(f"PROXY v2 header of {total} bytes (at most {V2_MAX_LENGTH} accepted)")
    family, transport = fam >> 4, fam & 0xF
    if family > 3 or transport > 2:
        raise ProxyError(f"PROXY v2 header with unknown address family 0x{fam:02x}")
    if family and length < _V2_ADDRESS_LENGTH[family]:
        raise ProxyError("PROXY v2 header too short for its address family")
    if len(data) < total:
        return None
    if command == 0:  # LOCAL: the proxy's own connection (health check); addresses ignored
        return ProxyHeader(2, total)
    if transport == 2:
        raise ProxyError("PROXY v2 header for a datagram connection")
    if family in (1, 2) and transport == 1:
        size = 4 if family == 1 else 16
        at = V2_FIXED
        src = ipaddress.ip_address(data[at:at + size])
        dst = ipaddress.ip_address(data[at + size:at + 2 * size])
        sport, dport = struct.unpack_from("!HH", data, at + 2 * size)
        return ProxyHeader(2, total, (str(src), sport), (str(dst), dport))
    return ProxyHeader(2, total)  # UNSPEC or UNIX: no client IP to take


# --- the one place sessions get their client's address from ------------------------------
def client_ip(transport, protocol=None) -> str | None:
    """The client's IP address for `protocol` on `transport`: the one a trusted proxy sent in
    its PROXY header, else the socket's peer.  `protocol` defaults to the transport's."""
    if protocol is None and transport is not None:
        protocol = transport.get_protocol()
    peer = getattr(protocol, "proxied_peer", None)
    if peer is None and transport is not None:
        peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else None


is_trusted = address_in  # a client in one of the configured networks


# --- reading the header before a session starts ------------------------------------------
class _ProxyGate(asyncio.BufferedProtocol):
    """Stands in front of the session's protocol until the connection is handed over.

    A BufferedProtocol because it decides how many bytes each read may take: get_buffer()
    peeks at the socket and offers a buffer that ends where the header ends, so whatever
    follows (the client's first command, the TLS ClientHello) is read by the session's
    protocol, never by the gate.  (Pausing the transport instead does not work: uvloop
    starts reading right after connection_made whatever it was told.)"""

    def __init__(self, services, listener: str, factory: Callable[[], asyncio.BaseProtocol],
                 ssl_context: ssl.SSLContext | None, ssl_handshake_timeout: float | None) -> None:
        self.services = services
        self.listener = listener
        self.factory = factory
        self.ssl_context = ssl_context
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.transport: asyncio.Transport | None = None
        self.proxy_ip: str | None = None
        self.sock: socket.socket | None = None  # a second descriptor, for recv(MSG_PEEK)
        self.timer: asyncio.TimerHandle | None = None
        self.have = b""  # header bytes read so far
        self.buffer = bytearray(MAX_HEADER)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.proxy_ip = client_ip(transport, self)
        settings = self.services.config.proxy  # read per connection: reload changes the list
        if not is_trusted(self.proxy_ip, settings.trusted):
            self._hand_over(None)  # a PROXY line from anyone else is junk for the session
            return
        try:
            self.sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
            self.sock.setblocking(False)
        except OSError as e:
            self._refuse(f"cannot read the PROXY header: {e}")
            return
        self.timer = asyncio.get_running_loop().call_later(settings.timeout, self._timed_out)

    # --- reading -------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)[:self._safe_read_size()]

    def _safe_read_size(self) -> int:
        """How many bytes the next read may take without going past the end of the header."""
        try:
            peeked = self.sock.recv(MAX_HEADER - len(self.have), socket.MSG_PEEK)
        except OSError:  # nothing there yet, or an error the read itself will report
            return 1  # the header is incomplete, so at least one more byte belongs to it
        if not peeked:
            return 1  # end of input: the read sees it
        try:
            header = parse(self.have + peeked)
        except ProxyError:
            return len(peeked)  # read them; buffer_updated refuses the connection
        if header is None:
            return len(peeked)  # no end of header in sight: all of it is header
        return header.length - len(self.have)

    def buffer_updated(self, nbytes: int) -> None:
        self.have += self.buffer[:nbytes]
        try:
            header = parse(self.have)
        except ProxyError as e:
            self._refuse(str(e))
            return
        if header is None:
            return
        if header.length != len(self.have):  # pragma: no cover - get_buffer prevents it
            self._refuse("read past the end of the PROXY header")
            return
        self._done_reading()
        source = header.source  # None (LOCAL, UNKNOWN): the proxy's own address is the client
        log.debug("PROXY v%d on %s: client %s", header.version, self.listener,
                  source[0] if source else f"{self.proxy_ip} (the proxy itself)",
                  extra={"client": source[0] if source else self.proxy_ip, "listener": self.listener})
        self._hand_over(source)

    def eof_received(self) -> bool:
        if self.have:
            self._refuse("connection closed in the PROXY header")
        else:  # a TCP health check that connects and leaves
            log.debug("connection from trusted proxy on %s closed without a PROXY header", self.listener,
                      extra={"client": self.proxy_ip, "listener": self.listener})
        return False

    def connection_lost(self, exc) -> None:
        self._done_reading()

    def _timed_out(self) -> None:
        self.timer = None
        self._refuse(f"no PROXY header within {self.services.config.proxy.timeout:g}s")

    def _refuse(self, reason: str) -> None:
        log.warning("closing connection from trusted proxy on %s: %s", self.listener, reason,
                    extra={"client": self.proxy_ip, "listener": self.listener})
        self._done_reading()
        self.transport.abort()

    def _done_reading(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.sock.close()  # only the duplicate; the transport keeps its own
            self.sock = None
        self.buffer = b""

    # --- handing over --------------------------------------------------------------------
    def _hand_over(self, source: tuple[str, int] | None) -> None:
        """Give the connection to the session's protocol, here and now: a read that follows
        goes to it (or, for implicit TLS, to the TLS layer in front of it)."""
        transport = self.transport
        inner = self.factory()
        if source is not None:
            inner.proxied_peer = source
            self.proxy_ip = source[0]  # from here on, log lines name the real client
        if self.ssl_context is None:
            transport.set_protocol(inner)
            inner.connection_made(transport)
            return
        # What create_server(ssl=...) does for each connection: a TLS protocol between the
        # transport and the session, which sees connection_made once the handshake is done.
        # loop.start_tls would need a task, and the bytes read before it runs would be lost.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        tls = _ssl_protocol_class(loop)(loop, inner, self.ssl_context, waiter, server_side=True,
                                        server_hostname=None,
                                        ssl_handshake_timeout=self.ssl_handshake_timeout)
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, waiter: asyncio.Future) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is not None:
            log.info("TLS handshake failed on %s: %s", self.listener, str(exc) or type(exc).__name__,
                     extra={"client": self.proxy_ip, "listener": self.listener})


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> type:
    """The TLS protocol class of this loop, the one its create_server(ssl=...) uses."""
    try:
        import uvloop.loop
    except ImportError:
        pass
    else:
        if isinstance(loop, uvloop.loop.Loop):
            return uvloop.loop.SSLProtocol
    from asyncio.sslproto import SSLProtocol
    return SSLProtocol


async def create_server(services, listener: str, factory: Callable[[], asyncio.BaseProtocol],
                        host: str, port: int, *, ssl: ssl.SSLContext | None = None,
                        ssl_handshake_timeout: float | None = None, **kwargs) -> asyncio.Server:
    """loop.create_server for a mail listener, with the PROXY protocol gate in front of every
    connection when proxy.trusted is set (at start; the list itself may change on reload)."""
    loop = asyncio.get_running_loop()
    if not services.config.proxy.trusted:
        return await loop.create_server(factory, host, port, ssl=ssl,
                                        ssl_handshake_timeout=ssl_handshake_timeout if ssl else None,
                                        **kwargs)
    return await loop.create_server(
        lambda: _ProxyGate(services, listener, factory, ssl, ssl_handshake_timeout), host, port, **kwargs)
