"""POP3 on the wire, without I/O: command lines in, response bytes out.

Everything here is a plain function or class over bytes (the way h11 does HTTP), so
it can be tested and fuzzed without sockets:

- LineBuffer: bytes from the network -> complete command lines, bounded in length.
- parse_command: one line -> Command (keyword, arguments) or CommandError.
- MessageEncoder / encode_message / encoded_size: a stored message (LF or CRLF line
  endings) -> the bytes RETR sends (CRLF, dot-stuffed), incrementally, and the size of
  those bytes computed without building them (so STAT/LIST agree with RETR exactly).
- top_extent: how many bytes of a message TOP n must send.
- ok / err / multiline: response formatting with RFC 2449 response codes.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

CRLF = b"\r\n"

# RFC 2449 4: keywords are 3 or 4 characters, arguments up to 40 characters.  Arguments are
# not cut to 40 (user names and AUTH responses are longer); only the line length is bounded.
MAX_KEYWORD = 4
MAX_ARG = 40  # an argument echoed back in an error reply is cut to this
# Numbers that can name a message or a line count: anything longer is nonsense.
MAX_NUMBER_DIGITS = 10


# RFC 1939's session states (UPDATE is reached only through QUIT; after it, CLOSED).
AUTHORIZATION, TRANSACTION, CLOSED = "AUTHORIZATION", "TRANSACTION", "CLOSED"


class CommandError(Exception):
    """A line that is not a well-formed command; str() is the reason for the -ERR reply."""


class LineTooLong:
    """Marker returned by LineBuffer.next_line() for a line that exceeded the bound (its bytes
    were discarded up to and including its end, so the next line starts clean)."""

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong()


class LineBuffer:
    """Bytes in, command lines out, with every line bounded.

    An over-long line is not kept: its bytes are dropped as they arrive and, once its
    end is seen, next_line() reports LINE_TOO_LONG once, so memory stays bounded however
    long the line is and the session can answer -ERR and carry on.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False
        self._too_long_pending = False  # an over-long line ended; not reported yet
        self._scan_from = 0  # no b"\n" before this offset in _buf

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1:]
            self._discarding = False
            self._too_long_pending = True
        self._buf += data

    def clear(self) -> int:
        """Drop everything buffered (after STLS: nothing sent before the handshake may be
        taken as a command sent after it). Returns how many bytes were dropped."""
        n = len(self._buf)
        self._buf.clear()
        self._scan_from = 0
        return n

    def next_line(self) -> bytes | LineTooLong | None:
        """The next complete line without its line ending, LINE_TOO_LONG, or None if no
        complete line is buffered yet."""
        # A pending over-long line came before anything now in the buffer: discarding
        # starts only when the buffer holds nothing but that one unfinished line.
        if self._too_long_pending:
            self._too_long_pending = False
            return LINE_TOO_LONG
        nl = self._buf.find(b"\n", self._scan_from)
        if nl < 0:
            if len(self._buf) > self.max_line:
                # No end in sight and already too long: drop it and discard until its end.
                self._buf.clear()
                self._scan_from = 0
                self._discarding = True
            else:
                self._scan_from = len(self._buf)
            return None
        line_len = nl + 1
        line = bytes(self._buf[:nl])
        del self._buf[:line_len]
        self._scan_from = 0
        if line_len > self.max_line:
            return LINE_TOO_LONG
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


class Command(NamedTuple):  # a NamedTuple: half the cost of a frozen dataclass, per command
    name: str  # upper-case keyword, e.g. "RETR"
    args: tuple[str, ...]  # arguments split on spaces
    rest: str  # everything after the keyword and one space, verbatim (PASS may hold spaces)


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def parse_command(line: bytes) -> Command:
    """One command line (without CRLF) -> Command. Raises CommandError for malformed input."""
    if not line:
        raise CommandError("Empty command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("Command is not valid UTF-8") from None
    # isprintable() is one C pass that is true for nearly every line; what it rejects besides
    # control characters (some non-ASCII spaces in a password) is looked at again exactly.
    if not text.isprintable() and _CONTROL.search(text):
        raise CommandError("Control characters in command")
    keyword, sep, rest = text.partition(" ")
    if not keyword.isascii() or not keyword.isalpha() or not 3 <= len(keyword) <= MAX_KEYWORD:
        raise CommandError("Unknown command")
    # RFC 1939 separates arguments by one space; extra spaces (a trailing one is common) are
    # tolerated rather than read as empty arguments.
    args = rest.split(" ") if rest else []
    if "" in args:
        args = [a for a in args if a]
    return Command(keyword.upper(), tuple(args), rest)


def parse_number(arg: str, what: str = "message number") -> int:
    """A decimal argument (message number or line count)."""
    if not arg or not arg.isascii() or not arg.isdigit() or len(arg) > MAX_NUMBER_DIGITS:
        raise CommandError(f"Invalid {what}: {arg[:MAX_ARG]!r}" if arg else f"Missing {what}")
    return int(arg)


def decode_sasl_plain(b64: str) -> tuple[str, str, str]:
    """RFC 4616 PLAIN: base64(authzid NUL authcid NUL passwd) -> (authzid, authcid, passwd)."""
    if b64 == "=":  # RFC 5034: "=" is an empty initial response
        b64 = ""
    try:
        raw = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CommandError("Invalid base64 data") from None
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise CommandError("Invalid PLAIN response")
    try:
        authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise CommandError("Invalid PLAIN response (not UTF-8)") from None
    if not authcid:
        raise CommandError("Invalid PLAIN response (no user name)")
    return authzid, authcid, passwd


# --- responses ---------------------------------------------------------------------

def ok(text: str = "") -> bytes:
    return (f"+OK {text}" if text else "+OK").encode("utf-8") + CRLF


def err(text: str, code: str | None = None) -> bytes:
    """-ERR with an optional RFC 2449 response code: err("locked", "IN-USE") -> -ERR [IN-USE] locked."""
    if code:
        text = f"[{code}] {text}"
    return f"-ERR {text}".encode("utf-8") + CRLF


def multiline(first: str, lines: list[str]) -> bytes:
    """+OK first, then lines (each dot-stuffed), then the terminating ".\"."""
    out = [f"+OK {first}" if first else "+OK"]
    out += [("." + line) if line.startswith(".") else line for line in lines]
    out.append(".")
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


# --- message bytes -------------------------------------------------------------------

# Bytes that need no change to go out in RETR: every LF is part of a CRLF and no line begins
# with "." (a chunk's first line is taken as a line start, so a "." there falls back to the
# exact path below).  One regex pass (~1 ns a byte) instead of two counts and a replace
# (~2.5 ns a byte, all holding the GIL in the read-ahead's worker while the loop waits to
# answer the next RETR).  The repeat is possessive ("*+"): it never gives back a line, so the
# engine keeps no backtracking state per line.  An atomic group per line instead, "(?>...)*",
# kept ~1.1 bytes of state per byte matched (563 KiB for a 512 KiB piece): five clients
# RETRieving an 8 MiB message at once grew the server by 137 MiB
# (tests/test_large_messages.py::test_pop3_retr_by_five_clients_at_once_is_bounded_and_exact).
_WIRE_READY = re.compile(rb"(?:[^\n.][^\n]*\r\n|\r\n)*+(?:[^\n.][^\n]*)?")
# Every LF part of a CRLF (lines may start with "."); possessive for the same reason.
_NO_BARE_LF = re.compile(rb"(?:[^\n]*\r\n)*+[^\n]*")


class MessageEncoder:
    """A stored message, fed in chunks of any size -> the bytes RETR/TOP send.

    Line endings become CRLF (a bare LF gets its CR; a bare CR inside a line is left as
    it is), a line that starts with "." gets another "." (RFC 1939 byte-stuffing), and a
    message that does not end with a line ending gets one, so the ".CRLF" terminator is
    on a line of its own.  The output is the same however the input is chunked.
    """

    __slots__ = ("_line_start", "_pending_cr")

    def __init__(self) -> None:
        self._line_start = True  # the next byte begins a line
        self._pending_cr = False  # a CR ended the previous chunk; it may be half of a CRLF

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            self._pending_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        if _WIRE_READY.fullmatch(chunk) is not None:
            # Already as RETR sends it (nearly all stored mail): one C pass, no copy.
            self._line_start = chunk[-1:] == b"\n"
            return chunk
        if _NO_BARE_LF.fullmatch(chunk) is not None:
            # No bare LF, but lines that start with ".": only the dot-stuffing is left to do.
            # The regex pass costs half of the two counts it replaced (the 50 MB message:
            # 0.12 s against 0.15-0.18 s), and one replace half of the three below.  Every
            # LF has its CR (a CR cut from it at the last chunk's end was put back in front
            # above), so the three-byte pattern finds the places "\n." would, and the
            # search skips further on each miss: 0.06 against 0.08 s for 50 MB.
            text = chunk.replace(b"\r\n.", b"\r\n..")  # the same object back when there is none
            if self._line_start and chunk[:1] == b".":
                text = b"." + text
            self._line_start = chunk[-1:] == b"\n"
            return text
        text = chunk.replace(b"\r\n", b"\n").replace(b"\n.", b"\n..")
        if self._line_start and text.startswith(b"."):
            text = b"." + text
        self._line_start = text.endswith(b"\n")
        return text.replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        out = b""
        if self._pending_cr:
            self._pending_cr = False
            out = b"\r"
            self._line_start = False
        if not self._line_start:
            out += CRLF
            self._line_start = True
        return out


def encode_message(data: bytes) -> bytes:
    enc = MessageEncoder()
    return enc.feed(data) + enc.end()


def encoded_size(data: bytes) -> int:
    """len(encode_message(data)) without building it: a few C-speed counts over the bytes."""
    if not data:
        return 0
    lf = data.count(b"\n")
    crlf = data.count(b"\r\n")
    stuffed = data.count(b"\n.") + (1 if data.startswith(b".") else 0)
    tail = 0 if data.endswith(b"\n") else 2
    return len(data) + (lf - crlf) + stuffed + tail


def message_size(data: bytes) -> int:
    """The size LIST, STAT and RETR's +OK report (RFC 1939): the message's own octets in
    CRLF form, as Dovecot counts them; not the dot-stuffing or terminator RETR adds."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def top_extent(data: bytes, lines: int, eof: bool) -> int | None:
    """Bytes of `data` (a prefix of a stored message) that TOP sends: the header, the blank
    line after it, and `lines` lines of the body.  None when `data` ends before that point
    and more of the message exists (not `eof`): the caller reads more and asks again."""
    pos = 0
    n = len(data)
    # The header ends with the first empty line (LF or CRLF ending).
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return n if eof else None
        line = data[pos:nl]
        pos = nl + 1
        if line == b"" or line == b"\r":
            break
    for _ in range(lines):
        nl = data.find(b"\n", pos)
        if nl < 0:
            return n if eof else None
        pos = nl + 1
    return pos


class TopCutter:
    """What TOP sends of a message fed in chunks of any size: the header, the blank line
    after it and `lines` lines of the body (the same bytes as top_extent on the whole
    message), so that TOP of a big message never holds it whole.  feed() gives back the part
    of each chunk to send; `done` says nothing more is wanted."""

    __slots__ = ("lines", "in_header", "done", "_line_len", "_line_head")

    def __init__(self, lines: int) -> None:
        self.lines = lines  # body lines still to send
        self.in_header = True
        self.done = False
        self._line_len = 0  # bytes of the current header line seen in earlier chunks
        self._line_head = b""  # its first two bytes (is it empty, or a lone CR?)

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while self.in_header:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                self._line_head = (self._line_head + chunk[pos:pos + 2])[:2]
                self._line_len += len(chunk) - pos
                return chunk
            length = self._line_len + nl - pos
            head = (self._line_head + chunk[pos:min(pos + 2, nl)])[:2]
            self._line_len, self._line_head = 0, b""
            pos = nl + 1
            if length == 0 or (length == 1 and head == b"\r"):
                self.in_header = False
        if self.lines <= 0:
            self.done = True
            return chunk[:pos]
        count = chunk.count(b"\n", pos)
        if count < self.lines:
            self.lines -= count
            return chunk
        for _ in range(self.lines):
            pos = chunk.find(b"\n", pos) + 1
        self.lines = 0
        self.done = True
        return chunk[:pos]


def uidl_for_key(key: str) -> str:
    """A UIDL value (RFC 1939: 1-70 characters 0x21-0x7E) from the store's stable message key.

    The Maildir base name is used as it is when it fits; otherwise a digest of it, so the
    value is still a function of the key alone and stays the same across sessions/restarts.
    """
    if 0 < len(key) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in key):
        return key
    import hashlib

    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


_UIDL_VAR = re.compile(r"%(0?)(\d*)([Xx]?)([uv%])")


def format_uidl(fmt: str, uid: int, uidvalidity: int) -> str:
    """A UIDL in the style of Dovecot's pop3_uidl_format ("%08Xu%08Xv": zero-padded width,
    X/x for hex, u = UID, v = UIDVALIDITY), for mailboxes imported from Dovecot (see
    store/preserve.py) so POP3 clients keep their UIDLs; spelled exactly as Dovecot 2.3 does
    (checked against its pop3 binary).  ValueError for other variables."""
    out, pos = [], 0
    for m in _UIDL_VAR.finditer(fmt):
        if fmt[pos:m.start()].count("%"):
            raise ValueError(f"unsupported UIDL format {fmt!r}")
        out.append(fmt[pos:m.start()])
        pos = m.end()
        if m.group(4) == "%":
            out.append("%")
            continue
        value = uid if m.group(4) == "u" else uidvalidity
        # Dovecot's var_expand writes hex in lower case for X too ("000000016b0e0bbc")
        spec = f"{m.group(1)}{m.group(2)}{'x' if m.group(3) else 'd'}"
        out.append(format(value, spec))
    if "%" in fmt[pos:]:
        raise ValueError(f"unsupported UIDL format {fmt!r}")
    out.append(fmt[pos:])
    return "".join(out)
