"""After LOGOUT / QUIT over TLS the server closes the TCP connection at once, on every TLS
listener of every protocol (implicit TLS and STARTTLS/STLS), without waiting for the
client's close_notify (which many clients never send: they wait for the TCP close).

The client here is a TLS engine over memory BIOs on a plain socket, so the test sees the
TCP FIN itself, not only TLS's close_notify; it never sends close_notify.
"""
from __future__ import annotations

import socket
import ssl
import time

import pytest

from harness import HOSTNAME, MailServer

USER, PASSWORD = "gb@example.test", "gb-pass"
LIMIT = 5.0  # the old behaviour waited 30 s (asyncio's ssl_shutdown_timeout)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def server(request, tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("goodbye"), loop=request.param)
    srv.add_domain("example.test")
    srv.add_user(USER, PASSWORD)
    srv.start()
    yield srv
    assert srv.stop() == 0


class BioTLS:
    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=HOSTNAME)
        self.buf = b""
        self._run(self.obj.do_handshake)

    def _pump(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _run(self, fn, *args):
        while True:
            try:
                result = fn(*args)
                self._pump()
                return result
            except ssl.SSLWantReadError:
                self._pump()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("TCP closed during TLS") from None
                self.inc.write(data)

    def send(self, data: bytes) -> None:
        self._run(self.obj.write, data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            try:
                data = self._run(self.obj.read, 65536)
            except ssl.SSLZeroReturnError:  # close_notify
                raise EOFError(self.buf) from None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def seconds_to_tcp_close(self) -> float:
        """Read (and drop) until the server's FIN; never answer close_notify."""
        start = time.monotonic()
        self.sock.settimeout(LIMIT + 1)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return float("inf")
        return time.monotonic() - start


def plain_lines(sock: socket.socket, until: bytes) -> None:
    buf = b""
    while until not in buf:
        data = sock.recv(4096)
        assert data, buf
        buf += data


def connect(srv, listener: str) -> BioTLS:
    sock = socket.create_connection(("127.0.0.1", srv.ports[listener]), timeout=10)
    ctx = srv.client_tls()
    if listener == "imap":
        plain_lines(sock, b"\r\n")
        sock.sendall(b"s STARTTLS\r\n")
        plain_lines(sock, b"s OK")
    elif listener == "pop3":
        plain_lines(sock, b"\r\n")
        sock.sendall(b"STLS\r\n")
        plain_lines(sock, b"+OK")
    elif listener in ("smtp", "submission"):
        plain_lines(sock, b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        plain_lines(sock, b"250 ")
        sock.sendall(b"STARTTLS\r\n")
        plain_lines(sock, b"220 ")
    tls = BioTLS(sock, ctx)
    if listener in ("imaps", "pop3s", "submissions"):
        tls.line()  # greeting
    return tls


@pytest.mark.parametrize("listener", ["imaps", "imap", "pop3s", "pop3", "submissions", "submission", "smtp"])
def test_goodbye_closes_tcp_at_once(server, listener):
    c = connect(server, listener)
    if listener.startswith("imap"):
        c.send(f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\nz LOGOUT\r\n".encode())
        while not c.line().startswith(b"z "):
            pass
    elif listener.startswith("pop3"):
        c.send(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode())
        lines = [c.line() for _ in range(4)]
        assert lines[-1].startswith(b"+OK"), lines
    else:
        c.send(b"EHLO client.test\r\nQUIT\r\n")
        while not c.line().startswith(b"221 "):
            pass
    took = c.seconds_to_tcp_close()
    assert took < LIMIT, f"{listener}: TCP closed {took:.1f} s after the goodbye"
