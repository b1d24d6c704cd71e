"""Small blocking IMAP / POP3 / SMTP clients over plain sockets, for timing.

They do as little as a client can (find line ends, skip literals by their length, count
bytes) so that the time measured is the server's, not a client library's parsing:
imaplib would spend longer splitting a 10,000-line FETCH response than a fast server
spends making it, and that would squeeze every ratio towards 1.
"""
from __future__ import annotations

import re
import socket
import time

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


class Conn:
    """`buf[pos:]` is what was received and not yet consumed. Consuming moves `pos`; the
    consumed part is dropped once per recv, so reading N lines costs O(bytes), not O(N x
    buffer) as slicing the buffer for every line would (100,000 FETCH lines)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 120) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.pos = 0

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = self.buf[self.pos:i + 2]
                self.pos = i + 2
                return line
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def take(self, n: int) -> bytes:
        """Up to n bytes, at least one (waits for them)."""
        if self.pos >= len(self.buf):
            self._fill()
        data = self.buf[self.pos:self.pos + n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.take(n))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class IMAP(Conn):
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.n = 0
        greeting = self.readline()
        if not greeting.startswith(b"* OK"):
            raise ConnectionError(f"IMAP greeting: {greeting!r}")

    def command(self, text: str) -> tuple[list[bytes], int, bytes]:
        """Send one command; return (untagged lines without literals, literal bytes, tagged line).
        Raises on NO/BAD."""
        self.n += 1
        tag = f"B{self.n:05d}".encode()
        self.send(tag + b" " + text.encode() + b"\r\n")
        lines: list[bytes] = []
        literal_bytes = 0
        while True:
            line = self.readline()
            m = _LITERAL.search(line)
            while m:  # a line may carry several literals
                n = int(m.group(1))
                self.skip(n)
                literal_bytes += n
                line = line[:m.start()] + b"<lit>" + self.readline()
                m = _LITERAL.search(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"IMAP {text.split()[0]}: {line!r}")
                return lines, literal_bytes, line
            lines.append(line)

    def login(self, user: str, password: str) -> None:
        self.command(f'LOGIN "{user}" "{password}"')

    def timed(self, text: str) -> tuple[float, list[bytes], int]:
        t0 = time.perf_counter()
        lines, lit, _ = self.command(text)
        return time.perf_counter() - t0, lines, lit


class POP3(Conn):
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        greeting = self.readline()
        if not greeting.startswith(b"+OK"):
            raise ConnectionError(f"POP3 greeting: {greeting!r}")

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"POP3 {text.split()[0]}: {line!r}")
        return line

    def multiline(self, text: str) -> int:
        """Send a command whose answer is dot-terminated; return the bytes of the answer."""
        self.command(text)
        while len(self.buf) - self.pos < 3:
            self._fill()
        if self.buf.startswith(b".\r\n", self.pos):  # empty answer
            self.pos += 3
            return 3
        total = 0
        while True:
            i = self.buf.find(b"\r\n.\r\n", self.pos)
            if i >= 0:
                total += i + 5 - self.pos
                self.pos = i + 5
                return total
            keep_from = max(self.pos, len(self.buf) - 4)  # the terminator may straddle two reads
            total += keep_from - self.pos
            self.pos = keep_from
            self._fill()

class SMTP(Conn):
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.reply()
        self.command("EHLO client.bench.test")

    def reply(self) -> bytes:
        while True:
            line = self.readline()
            if line[3:4] != b"-":
                return line

    def command(self, text: str, expect: bytes = b"2") -> bytes:
        self.send(text.encode() + b"\r\n")
        line = self.reply()
        if not line.startswith(expect):
            raise RuntimeError(f"SMTP {text.split()[0]}: {line!r}")
        return line

    def send_message(self, sender: str, rcpt: str, body: bytes) -> float:
        """One transaction; returns the moment (perf_counter) the final 250 arrived."""
        self.command(f"MAIL FROM:<{sender}>")
        self.command(f"RCPT TO:<{rcpt}>")
        self.command("DATA", expect=b"3")
        self.send(body + b".\r\n")
        line = self.reply()
        if not line.startswith(b"250"):
            raise RuntimeError(f"SMTP end of DATA: {line!r}")
        return time.perf_counter()
