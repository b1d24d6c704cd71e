"""The lexical half of IMAP command parsing, pure (parser.py): `ParseError`, the character
classes, `_Cursor` which walks the parts of a framed command (atoms, numbers, strings and
literals, mailbox names, flags, dates) and `SequenceSet` (with `SearchResult`, "$")."""
from __future__ import annotations

import bisect
import calendar
import re

from . import mutf7
from .framer import LITERAL_RE

_PLAIN_SET = re.compile(rb"[0-9]{1,10}(?::[0-9]{1,10})?(?:,[0-9]{1,10}(?::[0-9]{1,10})?)*")
_SET_CHARS = b"0123456789:,*"


# --------------------------------------------------------------------------- parsing

class ParseError(Exception):
    def __init__(self, tag: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.message = message
        self.code = code


class MailboxNameError(ParseError):
    """A mailbox name that is not valid modified UTF-7: the command is well-formed, the name
    is refused (NO, as Dovecot answers; BAD makes clients such as mutt drop the connection)."""


ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
ATOM_CHARS = frozenset(range(0x21, 0x7F)) - ATOM_SPECIALS
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
LIST_CHARS = ATOM_CHARS | {ord("%"), ord("*"), ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}
_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}


class _Cursor:
    """Walks the parts of a framed command."""

    def __init__(self, parts: list[bytes], tag: str | None = None) -> None:
        self.parts = parts
        self.i = 0  # index into parts (always a line piece)
        self.line = parts[0]
        self.pos = 0
        self.tag = tag
        self.utf8 = False  # mailbox names in UTF-8 (UTF8=ACCEPT / IMAP4rev2 enabled)
        self.enabled: frozenset | set = frozenset()  # what the session ENABLEd

    def error(self, message: str) -> ParseError:
        return ParseError(self.tag, message)

    def peek(self) -> int | None:
        return self.line[self.pos] if self.pos < len(self.line) else None

    def at_end(self) -> bool:
        return self.pos >= len(self.line) and self.i == len(self.parts) - 1

    def end(self) -> None:
        if not self.at_end():
            raise self.error("unexpected extra arguments")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.error("expected a space")
        self.pos += 1

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, ch: bytes) -> None:
        if self.peek() != ch[0]:
            raise self.error(f"expected {ch.decode()!r}")
        self.pos += 1

    def take(self, chars: frozenset) -> bytes:
        start = self.pos
        line = self.line
        n = len(line)
        while self.pos < n and line[self.pos] in chars:
            self.pos += 1
        return line[start:self.pos]

    def atom(self, what: str = "atom") -> str:
        a = self.take(ATOM_CHARS)
        if not a:
            raise self.error(f"expected {what}")
        return a.decode("ascii")

    def number(self, nz: bool = False) -> int:
        start = self.pos
        while self.pos < len(self.line) and 0x30 <= self.line[self.pos] <= 0x39:
            self.pos += 1
        digits = self.line[start:self.pos]
        if not digits or len(digits) > 10:
            raise self.error("expected a number")
        value = int(digits)
        if value > 0xFFFFFFFF or (nz and value == 0):
            raise self.error("number out of range")
        return value

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        line = self.line
        while True:
            if self.pos >= len(line):
                raise self.error("unterminated quoted string")
            c = line[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(line) or line[self.pos] not in (0x22, 0x5C):
                    raise self.error("bad escape in quoted string")
                out.append(line[self.pos])
                self.pos += 1
            elif c in (0x0D, 0x0A, 0x00):
                raise self.error("bad character in quoted string")
            else:
                out.append(c)

    def literal(self) -> bytes:
        m = LITERAL_RE.match(self.line, self.pos)
        if m is None or self.i + 2 >= len(self.parts):
            raise self.error("bad literal")
        data = self.parts[self.i + 1]
        if len(data) != int(m.group(1)):
            raise self.error("bad literal")
        self.i += 2
        self.line = self.parts[self.i]
        self.pos = 0
        return data

    def is_literal_here(self) -> bool:
        return self.peek() == 0x7B and self.i + 1 < len(self.parts) and \
            LITERAL_RE.match(self.line, self.pos) is not None

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            return self.literal()
        raise self.error("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        a = self.take(ASTRING_CHARS)
        if not a:
            raise self.error("expected a string or atom")
        return a

    def nstring_or_nil(self) -> bytes | None:
        if self.line[self.pos:self.pos + 3].upper() == b"NIL" and \
                (self.pos + 3 >= len(self.line) or self.line[self.pos + 3] not in ATOM_CHARS):
            self.pos += 3
            return None
        return self.string()

    def _name(self, raw: bytes) -> str:
        """A mailbox name or pattern off the wire: modified UTF-7, or UTF-8 once the client
        enabled UTF8=ACCEPT or IMAP4rev2 (RFC 6855 section 3, RFC 9051 section 5.1)."""
        if self.utf8:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ParseError(self.tag, "mailbox name is not valid UTF-8") from None
        return mutf7.decode(raw)

    def mailbox(self) -> str:
        raw = self.astring()
        try:
            name = self._name(raw)
        except mutf7.MUTF7Error:
            raise MailboxNameError(self.tag, "Mailbox name is not valid modified UTF-7",
                                   code="CANNOT") from None
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str | None:
        """A LIST pattern; None when it is not valid modified UTF-7 (it then matches nothing)."""
        c = self.peek()
        if c in (0x22, 0x7B):
            raw = self.string()
        else:
            raw = self.take(LIST_CHARS)
            if not raw:
                raise self.error("expected a mailbox pattern")
        try:
            return self._name(raw)
        except mutf7.MUTF7Error:
            return None

    def list_reference(self) -> str | None:
        """LIST's reference name; None when it is not valid modified UTF-7 (matches nothing)."""
        raw = self.astring()
        try:
            return self._name(raw)
        except mutf7.MUTF7Error:
            return None

    def flag(self) -> str:
        if self.peek() == 0x5C:
            self.pos += 1
            if self.peek() == 0x2A:  # "\*" is only valid in PERMANENTFLAGS; refuse in commands
                raise self.error("\\* is not a flag")
            name = self.atom("flag")
            canon = _SYSTEM_FLAGS.get(name.lower())
            if canon is None:
                raise self.error(f"unknown system flag \\{name}")
            return canon
        return self.atom("flag")

    def flag_list(self) -> list[str]:
        self.expect(b"(")
        flags: list[str] = []
        if self.peek() == 0x29:
            self.pos += 1
            return flags
        while True:
            flags.append(self.flag())
            if self.peek() == 0x29:
                self.pos += 1
                return flags
            self.sp()

    def sequence_set(self) -> "SequenceSet":
        if self.peek() == 0x24:  # "$": the saved search result (RFC 5182 SEARCHRES)
            self.pos += 1
            return SearchResult()
        # Numbers and ranges without "*" (a client's list of picked messages, "1,101,201,...")
        # in one regex match and a split, not a call per character; anything else (a "*", a
        # zero, a number too long or too big) takes the general loop below, which also says
        # what is wrong.
        m = _PLAIN_SET.match(self.line, self.pos)
        if m is not None and (m.end() == len(self.line) or self.line[m.end()] not in _SET_CHARS):
            plain = []
            for item in m[0].split(b","):
                a, _, b = item.partition(b":")
                lo = int(a)
                hi = int(b) if b else lo
                if not (0 < lo <= 0xFFFFFFFF and 0 < hi <= 0xFFFFFFFF):
                    break
                plain.append((lo, hi))
            else:
                self.pos = m.end()
                return SequenceSet(plain)
        ranges: list[tuple[int | None, int | None]] = []
        while True:
            a = self._seq_number()
            if self.peek() == 0x3A:
                self.pos += 1
                b = self._seq_number()
                ranges.append((a, b))
            else:
                ranges.append((a, a))
            if self.peek() != 0x2C:
                break
            self.pos += 1
        return SequenceSet(ranges)

    def _seq_number(self) -> int | None:
        if self.peek() == 0x2A:
            self.pos += 1
            return None
        return self.number(nz=True)

    def date(self) -> tuple[int, int, int]:
        quoted = self.peek() == 0x22
        if quoted:
            self.pos += 1
        m = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})").match(self.line, self.pos)
        if not m or m.group(2).decode().lower() not in _MONTHS:
            raise self.error("expected a date like 1-Feb-1994")
        self.pos = m.end()
        if quoted:
            self.expect(b'"')
        day, month, year = int(m.group(1)), _MONTHS[m.group(2).decode().lower()], int(m.group(3))
        if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
            raise self.error("no such date")
        return year, month, day

    def date_time(self) -> float:
        m = re.compile(rb'"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"').match(
            self.line, self.pos)
        if not m or m.group(2).decode().lower() not in _MONTHS:
            raise self.error('expected a date-time like "17-Jul-1996 02:44:25 -0700"')
        self.pos = m.end()
        day, year = int(m.group(1)), int(m.group(3))
        month = _MONTHS[m.group(2).decode().lower()]
        hh, mm, ss = int(m.group(4)), int(m.group(5)), int(m.group(6))
        if not (1 <= day <= calendar.monthrange(year, month)[1] and hh < 24 and mm < 60 and ss < 61
                and int(m.group(9)) < 60):
            raise self.error("no such date-time")
        off = (int(m.group(8)) * 60 + int(m.group(9))) * 60
        if m.group(7) == b"-":
            off = -off
        return calendar.timegm((year, month, day, hh, mm, min(ss, 59))) - off


_SYSTEM_FLAGS = {"seen": "\\Seen", "answered": "\\Answered", "flagged": "\\Flagged",
                 "deleted": "\\Deleted", "draft": "\\Draft", "recent": "\\Recent"}


class SequenceSet:
    """A sequence-set with "*" kept symbolic (None) until the mailbox size is known."""

    __slots__ = ("ranges", "_merged")

    def __init__(self, ranges: list[tuple[int | None, int | None]]) -> None:
        self.ranges = ranges
        self._merged: tuple[int, list[tuple[int, int]], list[int]] | None = None

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Ranges with "*" replaced by `largest` (the highest number in use), each low<=high,
        sorted and merged (so "1:9,1:9,1:9..." costs no more than "1:9")."""
        if self._merged is not None and self._merged[0] == largest:
            return self._merged[1]
        out: list[tuple[int, int]] = []
        for a, b in sorted((min(x, y), max(x, y)) for x, y in
                           ((largest if a is None else a, largest if b is None else b) for a, b in self.ranges)):
            if out and a <= out[-1][1] + 1:
                if b > out[-1][1]:
                    out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        self._merged = (largest, out, [a for a, _ in out])
        return out

    def contains(self, n: int, largest: int) -> bool:
        ranges = self.resolve(largest)
        starts = self._merged[2]  # type: ignore[index]
        i = bisect.bisect_right(starts, n) - 1
        return i >= 0 and ranges[i][0] <= n <= ranges[i][1]

    def __repr__(self) -> str:
        return f"SequenceSet({self.ranges!r})"


class SearchResult(SequenceSet):
    """"$" (RFC 5182): the UIDs the last SEARCH ... RETURN (SAVE) kept, which the session
    knows; as a plain sequence set it is empty."""

    def __init__(self) -> None:
        super().__init__([])
