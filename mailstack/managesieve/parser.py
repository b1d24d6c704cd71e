"""ManageSieve (RFC 5804) command syntax: bytes in, commands out.  Pure, no I/O.

    command   = atom *(SP argument) CRLF
    argument  = atom / number / quoted-string / literal
    literal   = "{" number ["+"] "}" CRLF *OCTET      ({n} is taken like {n+}, as Pigeonhole does)

CommandReader.feed(data) buffers; next() returns a Command, a CommandError (the command
was bad: answer NO and carry on) or None (need more input).  Lines and literals are
bounded; an over-long one is skipped, not kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Command:
    name: str  # upper case
    args: list[str]
    first: str = ""  # the first word as sent (a SASL response line is one string, case kept)


class CommandError(Exception):
    pass


_ATOM = re.compile(rb"[A-Za-z0-9_.\-]+")
_LITERAL_END = re.compile(rb"\{(\d{1,10})(\+?)\}$")


class CommandReader:
    def __init__(self, max_line: int = 8192, max_literal: int = 1 << 20) -> None:
        self.buf = bytearray()
        self.max_line, self.max_literal = max_line, max_literal
        self._skip_literal = 0  # bytes of a refused literal still to drop

    def feed(self, data: bytes) -> None:
        self.buf += data

    def clear(self) -> int:
        n = len(self.buf)
        self.buf.clear()
        return n

    def __len__(self) -> int:
        return len(self.buf)

    def next(self) -> Command | CommandError | None:
        if self._skip_literal:
            n = min(self._skip_literal, len(self.buf))
            del self.buf[:n]
            self._skip_literal -= n
            if self._skip_literal:
                return None
            # the rest of the command line after the literal is dropped too
            nl = self.buf.find(b"\n")
            if nl < 0:
                return None
            del self.buf[:nl + 1]
            return CommandError("Literal too large")
        pos = 0
        parts: list[bytes] = []  # the command text with literals cut out
        literals: list[bytes] = []
        while True:
            nl = self.buf.find(b"\n", pos)
            if nl < 0:
                if len(self.buf) - pos > self.max_line:
                    self.buf.clear()
                    raise CommandError("Line too long")  # the session closes: no resync possible
                return None
            line = bytes(self.buf[pos:nl]).rstrip(b"\r")
            if b"\x00" in line:
                del self.buf[:nl + 1]
                return CommandError("NUL in command")
            if len(line) > self.max_line:
                del self.buf[:nl + 1]
                return CommandError("Line too long")
            m = _LITERAL_END.search(line)
            if m is None:
                parts.append(line)
                del self.buf[:nl + 1]
                break
            size = int(m.group(1))
            if size > self.max_literal:
                del self.buf[:nl + 1]
                self._skip_literal = size
                return self.next() if self.buf else None
            start = nl + 1
            if len(self.buf) - start < size:
                return None
            parts.append(line[:m.start()] + b"\x00LIT%d\x00" % len(literals))
            literals.append(bytes(self.buf[start:start + size]))
            pos = start + size
        return parse_command(b"".join(parts), literals)


def parse_command(text: bytes, literals: list[bytes]) -> Command | CommandError:
    i, n = 0, len(text)
    words: list[str] = []
    while i < n:
        c = text[i:i + 1]
        if c == b" ":
            i += 1
            continue
        if c == b'"':
            j, out = i + 1, bytearray()
            while True:
                if j >= n:
                    return CommandError("Unterminated string")
                ch = text[j:j + 1]
                if ch == b"\\":
                    if j + 1 >= n or text[j + 1:j + 2] not in (b'"', b"\\"):
                        return CommandError("Bad escape in string")
                    out += text[j + 1:j + 2]
                    j += 2
                    continue
                if ch == b'"':
                    break
                out += ch
                j += 1
            words.append(_text(bytes(out)))
            i = j + 1
        elif c == b"\x00":
            j = text.index(b"\x00", i + 1)
            words.append(_text(literals[int(text[i + 4:j])]))
            i = j + 1
        else:
            m = _ATOM.match(text, i)
            if m is None:
                return CommandError("Bad syntax")
            words.append(m.group(0).decode("ascii"))
            i = m.end()
        if i < n and text[i:i + 1] not in (b" ",):
            return CommandError("Bad syntax: expected a space between arguments")
    if not words:
        return CommandError("Empty command")
    return Command(words[0].upper(), words[1:], words[0])


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def quote(s: str) -> bytes:
    """A string for a response: quoted when it can be, else a literal."""
    b = s.encode("utf-8", "surrogateescape")
    if len(b) < 1024 and b"\r" not in b and b"\n" not in b and b"\x00" not in b:
        return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(b) + b
