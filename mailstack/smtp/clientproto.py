"""The SMTP client's protocol pieces, with no I/O: reply parsing, EHLO keywords,
command building, message text preparation.  client.py owns the sockets.

Everything a remote server sends goes through ReplyParser, which bounds line
length and lines per reply, so a hostile server cannot make us buffer without end.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..nexthop import to_alabel
from ..pop3.parser import MessageEncoder  # the same CRLF + dot-stuffing, chunk by chunk

MAX_REPLY_LINE = 4096  # RFC 5321 says 512; be generous, real servers exceed it
MAX_REPLY_LINES = 200


class ProtocolError(Exception):
    """The server broke the protocol (garbage, oversized reply). The connection is unusable."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # text after "NNN-" / "NNN ", one per line

    @property
    def kind(self) -> int:
        return self.code // 100

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)

    @property
    def status(self) -> str | None:
        """Enhanced status code (RFC 3463) of the first line, if the server gave one."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        return m.group(1) if m else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


class ReplyParser:
    """Bytes in, Reply objects out. feed() may be called with any split of the stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete reply (must be 0 before STARTTLS)."""
        return len(self._buf) + (1 if self._lines else 0)

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies: list[Reply] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
                return replies
            if end + 1 > MAX_REPLY_LINE:
                raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            raw = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[:end + 1]
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) < 3 or not raw[:3].isdigit() or raw[0:1] not in b"2345" or \
                (len(raw) > 3 and raw[3:4] not in b" -"):
            raise ProtocolError(f"malformed reply line: {raw[:80]!r}")
        code = int(raw[:3])
        if self._code is not None and code != self._code:
            raise ProtocolError(f"reply code changed within a multi-line reply: {raw[:80]!r}")
        self._code = code
        # Remote text ends up in logs and bounces: no control characters (terminal escapes, NULs).
        self._lines.append(_CONTROL.sub("?", raw[4:].decode("utf-8", "replace")).strip())
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
        if raw[3:4] == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines, self._code = [], None
        return reply


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO reply -> {KEYWORD: parameters}; the first line is the greeting, not a keyword."""
    features: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        if keyword:
            features[keyword.upper()] = params.strip()
    return features


def size_limit(features: dict[str, str]) -> int | None:
    """The server's fixed SIZE limit, or None when it states none (absent, 0 or garbage)."""
    value = features.get("SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def auth_mechanisms(features: dict[str, str]) -> set[str]:
    return {m.upper() for m in features.get("AUTH", "").split()}


def wire_address(address: str) -> str:
    """Envelope address as sent: the domain in A-label form, the local part untouched."""
    if not address:
        return ""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    try:
        return f"{local}@{to_alabel(domain)}"
    except ValueError:
        return address


def needs_smtputf8(sender: str, recipients: list[str], header_utf8: bool) -> bool:
    """True when the message cannot go to a server without SMTPUTF8 (RFC 6531): a
    non-ASCII local part in the envelope (domains become A-labels), or raw UTF-8 in
    headers of a message that was submitted with SMTPUTF8."""
    for addr in [sender, *recipients]:
        if not wire_address(addr).isascii():
            return True
    return header_utf8


def mail_command(sender: str, size: int | None, body8: bool, smtputf8: bool) -> bytes:
    params = ""
    if size is not None:
        params += f" SIZE={size}"
    if body8:
        params += " BODY=8BITMIME"
    if smtputf8:
        params += " SMTPUTF8"
    return f"MAIL FROM:<{wire_address(sender)}>{params}\r\n".encode()


def rcpt_command(recipient: str) -> bytes:
    return f"RCPT TO:<{wire_address(recipient)}>\r\n".encode()


def check_envelope_address(address: str) -> str | None:
    """Why `address` cannot be put in a command line, or None. Guards against CR/LF
    injection and oversized paths (RFC 5321 4.5.3.1.3: 256)."""
    if any(c in address for c in "\r\n\0<>") or len(address.encode()) > 256:
        return "bad address syntax"
    return None


_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass
class WireMessage:
    """A message ready for DATA: CRLF line ends, dot-stuffed, ending in CRLF.
    The terminating ".\\r\\n" is not included (sent as its own small write)."""

    prefix: bytes  # e.g. the DKIM-Signature header, sent before `body`
    body: bytes
    size: int  # octets of the message before dot-stuffing (for SIZE=)
    eightbit: bool  # any byte > 127 (BODY=8BITMIME wanted)
    header_utf8: bool  # any byte > 127 in the header section
    # A big message is not held in memory: `body` is empty and the text is read from this
    # (path, offset, size) range of the queue file piece by piece while DATA is sent,
    # CRLF-normalized and dot-stuffed by a DataEncoder.
    source: tuple[str, int, int] | None = None


def normalize_crlf(data: bytes) -> bytes:
    """Bare LF -> CRLF. Returns `data` itself (no copy) when it is already CRLF throughout."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _BARE_LF.sub(b"\r\n", data)


def header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 2]


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency; also makes sure the text ends with CRLF.
    No copy when no line starts with a dot and the text ends with CRLF."""
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def prepare(data: bytes, prefix: bytes = b"") -> WireMessage:
    """Message bytes (CRLF already) + optional prefix header -> WireMessage. CPU work: call in a thread."""
    eightbit = not data.isascii() or not prefix.isascii()
    header_utf8 = eightbit and not header_section(data).isascii()
    return WireMessage(prefix=prefix, body=dot_stuff(data), size=len(prefix) + len(data),
                       eightbit=eightbit, header_utf8=header_utf8)


STREAM_MIN = 1 << 20  # messages at least this big are streamed from their file
STREAM_CHUNK = 256 * 1024


class DataEncoder(MessageEncoder):
    """dot_stuff(normalize_crlf(text)) for a text fed in chunks of any size: POP3's encoder
    (the same line ends and dot-stuffing, whatever the cut), except that an empty text still
    gets its CRLF, as dot_stuff gives it."""

    __slots__ = ("_empty",)

    def __init__(self) -> None:
        super().__init__()
        self._empty = True  # nothing fed yet

    def feed(self, chunk: bytes) -> bytes:
        if chunk:
            self._empty = False
        return super().feed(chunk)

    def end(self) -> bytes:
        return super().end() or (b"\r\n" if self._empty else b"")


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def prepare_file(path: str, offset: int, size: int, prefix: bytes = b"") -> WireMessage:
    """A WireMessage for `size` bytes at `offset` of a file, without holding them: one pass
    in bounded pieces finds the SIZE= figure (octets after CRLF normalization) and whether
    the text or its header has 8-bit bytes.  Blocking: call in a thread."""
    normalized = 0
    eightbit = not prefix.isascii()
    header_utf8 = False
    in_header, tail, prev_cr = True, b"", False
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(STREAM_CHUNK, left))
            if not chunk:
                raise OSError(f"{path}: expected {size} bytes at offset {offset}, read {size - left}")
            left -= len(chunk)
            # bare LFs get a CR: count LFs not preceded by CR (across the chunk boundary too)
            bare = chunk.count(b"\n") - chunk.count(b"\r\n") - (1 if prev_cr and chunk.startswith(b"\n") else 0)
            normalized += len(chunk) + bare
            prev_cr = chunk.endswith(b"\r")
            ascii_chunk = chunk.isascii()
            if in_header:
                window = tail + chunk
                m = _BLANK_LINE.search(window)
                header_part = window if m is None else window[:m.start()]
                header_utf8 = header_utf8 or not header_part.isascii()
                in_header, tail = m is None, window[-3:]
            eightbit = eightbit or not ascii_chunk
    return WireMessage(prefix=prefix, body=b"", size=len(prefix) + normalized, eightbit=eightbit,
                       header_utf8=header_utf8, source=(path, offset, size))


def auth_plain(username: str, password: str) -> bytes:
    import base64
    token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode()).decode()
    return f"AUTH PLAIN {token}\r\n".encode()
