"""IMAP command parsing: framed commands in, `Command`s out, no I/O (the h11 way).

framer.py cuts the byte stream into commands (re-exported here);
`parse_command(parts)` turns one framed command into a `Command`, following the
  RFC 3501 grammar (plus IDLE, UIDPLUS, MOVE, NAMESPACE, ID, ENABLE, UNSELECT,
  LITERAL+, SASL-IR); any deviation raises `ParseError` carrying the tag, which the
  session answers with BAD.
"""
from __future__ import annotations

import bisect
import calendar
import re
from dataclasses import dataclass, field
from typing import Any

from . import mutf7, parse_list, parse_search
from . import compress as compress_grammar
from . import parse_condstore
from .framer import LITERAL_RE
from .framer import CommandFramer, Continuation, Frame, FrameError  # noqa: F401 - the framing half


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


@dataclass
class Command:
    tag: str
    name: str  # upper case; "UID FETCH" etc. keep name="FETCH" with uid=True
    uid: bool = False
    args: dict[str, Any] = field(default_factory=dict)


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


# ------------------------------------------------------------------ FETCH attributes

@dataclass(frozen=True)
class Section:
    part: tuple[int, ...] = ()
    text: str = ""  # "", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"
    fields: tuple[str, ...] = ()

    def spec(self) -> bytes:
        """As echoed in the response: BODY[<this>]."""
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
        if self.text.startswith("HEADER.FIELDS"):
            out += " (" + " ".join(self.fields) + ")"
        return out.encode("ascii")


@dataclass(frozen=True)
class FetchAtt:
    name: str  # ENVELOPE FLAGS INTERNALDATE RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT BODY
    #            BODYSTRUCTURE UID BODY[] (name "BODY[]" for sections; see section/peek/partial)
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None  # (offset, length)


_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SIMPLE_ATTS = {"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
                "RFC822.TEXT", "BODYSTRUCTURE", "UID", "BODY"}
_SIMPLE_ATTS.add("MODSEQ")  # RFC 7162
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def _fetch_att(c: _Cursor) -> FetchAtt:
    start = c.pos
    word = c.take(ATOM_CHARS - {ord("["), ord("<")}).decode("ascii").upper()
    if word in ("BODY", "BODY.PEEK") and c.peek() == 0x5B:
        c.pos += 1
        section = _section(c)
        c.expect(b"]")
        partial = None
        if c.peek() == 0x3C:
            c.pos += 1
            off = c.number()
            c.expect(b".")
            length = c.number(nz=True)
            c.expect(b">")
            partial = (off, length)
        return FetchAtt("BODY[]", section, peek=word == "BODY.PEEK", partial=partial)
    if word in _SIMPLE_ATTS:
        return FetchAtt(word)
    if word in ("BINARY", "BINARY.PEEK", "BINARY.SIZE") and c.peek() == 0x5B:
        return _binary_att(c, word)
    c.pos = start
    raise c.error(f"unknown FETCH attribute {word or c.line[c.pos:c.pos + 20]!r}")


def _binary_att(c: _Cursor, word: str) -> FetchAtt:
    """BINARY[part]<partial>, BINARY.PEEK[...], BINARY.SIZE[part] (RFC 3516): name
    "BINARY[]" or "BINARY.SIZE", the section holds the part numbers only."""
    c.pos += 1
    part: list[int] = []
    while c.peek() != 0x5D:
        if part:
            c.expect(b".")
        part.append(c.number(nz=True))
    c.pos += 1
    partial = None
    if word != "BINARY.SIZE" and c.peek() == 0x3C:
        c.pos += 1
        off = c.number()
        c.expect(b".")
        length = c.number(nz=True)
        c.expect(b">")
        partial = (off, length)
    name = "BINARY.SIZE" if word == "BINARY.SIZE" else "BINARY[]"
    return FetchAtt(name, Section(tuple(part)), peek=word == "BINARY.PEEK", partial=partial)


def _section(c: _Cursor) -> Section:
    part: list[int] = []
    while c.peek() is not None and 0x31 <= c.peek() <= 0x39:
        part.append(c.number(nz=True))
        if c.peek() == 0x2E:
            c.pos += 1
            continue
        if c.peek() != 0x5D:
            raise c.error("bad section")
        return Section(tuple(part))
    if c.peek() == 0x5D:
        if part:  # "1." then "]"
            raise c.error("bad section")
        return Section()
    word = c.take(ATOM_CHARS | {ord(".")} - {ord("]")}).decode("ascii").upper()
    if word in ("HEADER", "TEXT") or (word == "MIME" and part):
        return Section(tuple(part), word)
    if word in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        c.sp()
        c.expect(b"(")
        fields: list[str] = []
        while True:
            raw = c.astring()
            try:
                name = raw.decode("ascii")
            except UnicodeDecodeError:
                raise c.error("bad header field name") from None
            if not _FIELD_NAME.fullmatch(name):
                raise c.error("bad header field name")
            fields.append(name)
            if c.peek() == 0x29:
                c.pos += 1
                break
            c.sp()
        return Section(tuple(part), word, tuple(fields))
    raise c.error("bad section")


def _fetch_atts(c: _Cursor) -> list[FetchAtt]:
    if c.peek() == 0x28:
        c.pos += 1
        atts = [_fetch_att(c)]
        while c.peek() != 0x29:
            c.sp()
            atts.append(_fetch_att(c))
        c.pos += 1
        return atts
    start = c.pos
    word = c.take(ATOM_CHARS).decode("ascii").upper()
    if word in _MACROS:
        return [FetchAtt(n) for n in _MACROS[word]]
    c.pos = start
    return [_fetch_att(c)]


# ------------------------------------------------------------------- SEARCH keys
# A search key is a tuple: (op, ...).  ops: ALL, AND [keys], OR a b, NOT a, FLAG name present,
# SEQ set, UID set, LARGER n, SMALLER n, BEFORE/ON/SINCE date (internal), SENTBEFORE/SENTON/
# SENTSINCE date, HEADER name value, BODY s, TEXT s, NEW, OLD, RECENT.

_FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True),
              "DRAFT": ("\\Draft", True), "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True),
              "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False),
              "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False),
              "UNSEEN": ("\\Seen", False)}
_HEADER_KEYS = {"BCC", "CC", "FROM", "SUBJECT", "TO"}
MAX_SEARCH_DEPTH = 64


def _search_key(c: _Cursor, charset: str, depth: int = 0) -> tuple:
    if depth > MAX_SEARCH_DEPTH:
        raise c.error("search key nested too deeply")
    if c.peek() == 0x28:
        c.pos += 1
        keys = [_search_key(c, charset, depth + 1)]
        while c.peek() != 0x29:
            c.sp()
            keys.append(_search_key(c, charset, depth + 1))
        c.pos += 1
        return ("AND", keys)
    if c.peek() in (0x2A, 0x24) or (c.peek() is not None and 0x30 <= c.peek() <= 0x39):
        return ("SEQ", c.sequence_set())
    word = c.atom("search key").upper()

    def text() -> str:
        c.sp()
        raw = c.astring()
        try:
            return raw.decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise ParseError(c.tag, "search string is not valid in the given charset",
                             code="BADCHARSET") from None

    if word == "ALL":
        return ("ALL",)
    if word in _FLAG_KEYS:
        return ("FLAG",) + _FLAG_KEYS[word]
    if word in ("KEYWORD", "UNKEYWORD"):
        c.sp()
        return ("FLAG", c.atom("keyword"), word == "KEYWORD")
    if word in ("NEW", "OLD", "RECENT"):
        return (word,)
    if word in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
        c.sp()
        return (word, c.date())
    if word in ("LARGER", "SMALLER"):
        c.sp()
        return (word, c.number())
    if word in ("OLDER", "YOUNGER"):  # RFC 5032 WITHIN: seconds before now
        c.sp()
        return (word, c.number(nz=True))
    if word in _HEADER_KEYS:
        return ("HEADER", word, text())
    if word == "HEADER":
        c.sp()
        name = c.astring().decode("ascii", "replace")
        return ("HEADER", name.upper(), text())
    if word in ("BODY", "TEXT"):
        return (word, text())
    if word == "NOT":
        c.sp()
        return ("NOT", _search_key(c, charset, depth + 1))
    if word == "OR":
        c.sp()
        a = _search_key(c, charset, depth + 1)
        c.sp()
        b = _search_key(c, charset, depth + 1)
        return ("OR", a, b)
    if word == "UID":
        c.sp()
        return ("UID", c.sequence_set())
    if word == "MODSEQ":  # RFC 7162
        return parse_condstore.search_modseq(c)
    raise c.error(f"unknown search key {word}")


def _search_program(c: _Cursor, charset_required: bool = False) -> dict:
    """[CHARSET astring SP] search-key *(SP search-key); SORT and THREAD name the charset
    without the word CHARSET (RFC 5256)."""
    charset = "us-ascii"
    c.sp()
    start = c.pos
    if charset_required or c.take(ATOM_CHARS).upper() == b"CHARSET":
        if "UTF8=ACCEPT" in c.enabled:  # RFC 6855 section 3: conflicting charset labels
            raise c.error("SEARCH CHARSET is not allowed after ENABLE UTF8=ACCEPT")
        if not charset_required:
            c.sp()
        name = c.astring().decode("ascii", "replace").lower()
        if c.at_end():  # "SORT (DATE) ALL": the charset is missing, not unknown
            raise c.error("missing search criteria")
        if name not in ("us-ascii", "utf-8", "utf8"):
            raise ParseError(c.tag, "charset not supported", code="BADCHARSET (US-ASCII UTF-8)")
        charset = "utf-8" if name.startswith("utf") else "us-ascii"
        c.sp()
    else:
        c.pos = start
    # us-ascii strings holding 8-bit: decode as UTF-8 anyway (clients often do this).
    keys = [_search_key(c, "utf-8" if charset == "us-ascii" else charset)]
    while not c.at_end():
        c.sp()
        keys.append(_search_key(c, "utf-8"))
    return {"key": keys[0] if len(keys) == 1 else ("AND", keys), "charset": charset}


def _search(c: _Cursor) -> dict:
    return parse_search.search(c, _search_program)


def _sort(c: _Cursor) -> dict:
    return parse_search.sort(c, _search_program)


def _thread(c: _Cursor) -> dict:
    return parse_search.thread(c, _search_program)


# ------------------------------------------------------------------- commands

def _no_args(c: _Cursor) -> dict:
    return {}


def _one_mailbox(c: _Cursor) -> dict:
    c.sp()
    return {"mailbox": c.mailbox()}


def _select(c: _Cursor) -> dict:
    c.sp()
    out = {"mailbox": c.mailbox()}
    out.update(parse_condstore.select_params(c))  # select-params (RFC 4466, RFC 7162)
    return out


def _create(c: _Cursor) -> dict:
    c.sp()
    out = {"mailbox": c.mailbox()}
    if c.maybe_sp():  # CREATE-SPECIAL-USE (RFC 6154): (USE (\\Archive))
        out["use"] = parse_list.create_params(c)
    return out


def _rename(c: _Cursor) -> dict:
    c.sp()
    old = c.mailbox()
    c.sp()
    return {"old": old, "new": c.mailbox()}


def _list(c: _Cursor) -> dict:
    c.sp()
    reference = c.list_reference()  # None (not valid modified UTF-7) matches nothing
    c.sp()
    return {"reference": reference, "pattern": c.list_mailbox()}


def _list_extended(c: _Cursor) -> dict:  # LIST-EXTENDED, LIST-STATUS (parse_list.py)
    return parse_list.list_command(c, frozenset(_STATUS_ITEMS))


_STATUS_ITEMS = {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"}
_STATUS_ITEMS.add("APPENDLIMIT")  # RFC 7889
_STATUS_ITEMS |= {"SIZE", "DELETED"}  # STATUS=SIZE (RFC 8438), DELETED (RFC 9051)
_STATUS_ITEMS |= {"DELETED", "DELETED-STORAGE"}  # RFC 9208 3.2/3.3: with QUOTA=RES-MESSAGE/RES-STORAGE
_STATUS_ITEMS.add("HIGHESTMODSEQ")  # RFC 7162


def _status(c: _Cursor) -> dict:
    c.sp()
    mailbox = c.mailbox()
    c.sp()
    c.expect(b"(")
    items = []
    while True:
        item = c.atom("status item").upper()
        if item not in _STATUS_ITEMS:
            raise c.error(f"unknown STATUS item {item}")
        items.append(item)
        if c.peek() == 0x29:
            c.pos += 1
            break
        c.sp()
    return {"mailbox": mailbox, "items": items}


def _append(c: _Cursor) -> dict:
    from .parse_append import parse_append  # MULTIAPPEND, CATENATE, literal8: see there
    return parse_append(c)


def _login(c: _Cursor) -> dict:
    c.sp()
    user = c.astring()
    c.sp()
    return {"user": user, "password": c.astring()}


def _authenticate(c: _Cursor) -> dict:
    c.sp()
    mech = c.atom("mechanism").upper()
    initial = None
    if c.maybe_sp():
        # SASL-IR: base64 or "=" (empty)
        initial = c.take(ATOM_CHARS)
        if not initial:
            raise c.error("bad initial response")
    return {"mechanism": mech, "initial": initial}


def _fetch(c: _Cursor) -> dict:
    c.sp()
    seq = c.sequence_set()
    c.sp()
    atts = _fetch_atts(c)
    mods = parse_condstore.fetch_modifiers(c)  # fetch-modifiers (RFC 4466, RFC 7162)
    return {"set": seq, "atts": atts, **mods}


def _store(c: _Cursor) -> dict:
    c.sp()
    seq = c.sequence_set()
    c.sp()
    unchanged_since = parse_condstore.store_modifiers(c)  # RFC 7162
    mode = "="
    if c.peek() in (0x2B, 0x2D):
        mode = chr(c.peek())
        c.pos += 1
    word = c.atom("FLAGS").upper()
    if word not in ("FLAGS", "FLAGS.SILENT"):
        raise c.error("expected FLAGS or FLAGS.SILENT")
    c.sp()
    if c.peek() == 0x28:
        flags = c.flag_list()
    else:
        flags = [c.flag()]
        while c.maybe_sp():
            flags.append(c.flag())
    if "\\Recent" in flags:
        raise c.error("\\Recent cannot be stored")
    out = {"set": seq, "mode": mode, "silent": word.endswith(".SILENT"), "flags": flags}
    if unchanged_since is not None:
        out["unchanged_since"] = unchanged_since
    return out


def _copy(c: _Cursor) -> dict:
    c.sp()
    seq = c.sequence_set()
    c.sp()
    return {"set": seq, "mailbox": c.mailbox()}


def _uid_expunge(c: _Cursor) -> dict:
    c.sp()
    return {"set": c.sequence_set()}


def _id(c: _Cursor) -> dict:
    c.sp()
    if c.peek() != 0x28:
        if c.nstring_or_nil() is not None:
            raise c.error("ID takes a list or NIL")
        return {"params": None}
    c.pos += 1
    params = {}
    if c.peek() == 0x29:
        c.pos += 1
        return {"params": params}
    while True:
        k = c.string()
        c.sp()
        v = c.nstring_or_nil()
        if len(params) < 30:
            params[k.decode("utf-8", "replace")[:30]] = None if v is None else v.decode("utf-8", "replace")[:1024]
        if c.peek() == 0x29:
            c.pos += 1
            return {"params": params}
        c.sp()


def _enable(c: _Cursor) -> dict:
    caps = []
    while c.maybe_sp():
        caps.append(c.atom("capability").upper())
    if not caps:
        raise c.error("ENABLE needs a capability")
    return {"capabilities": caps}


COMMANDS = {
    "CAPABILITY": _no_args, "NOOP": _no_args, "LOGOUT": _no_args, "STARTTLS": _no_args,
    "AUTHENTICATE": _authenticate, "LOGIN": _login,
    "SELECT": _select, "EXAMINE": _select, "CREATE": _create, "DELETE": _one_mailbox,
    "RENAME": _rename, "SUBSCRIBE": _one_mailbox, "UNSUBSCRIBE": _one_mailbox,
    "LIST": _list_extended, "LSUB": _list, "STATUS": _status, "APPEND": _append,
    "CHECK": _no_args, "CLOSE": _no_args, "EXPUNGE": _no_args, "UNSELECT": _no_args,
    "SEARCH": _search, "FETCH": _fetch, "STORE": _store, "COPY": _copy, "MOVE": _copy,
    "IDLE": _no_args, "NAMESPACE": _no_args, "ID": _id, "ENABLE": _enable,
    "SORT": _sort, "THREAD": _thread,
}
COMMANDS["COMPRESS"] = compress_grammar.parse_compress  # RFC 4978


def _notify(c: _Cursor) -> dict:  # RFC 5465; the grammar lives in notify.py (it imports this module)
    from .notify import parse_notify  # noqa: PLC0415
    return parse_notify(c)


COMMANDS["NOTIFY"] = _notify
UID_COMMANDS = {"FETCH": _fetch, "STORE": _store, "SEARCH": _search, "COPY": _copy, "MOVE": _copy,
                "EXPUNGE": _uid_expunge, "SORT": _sort, "THREAD": _thread}
from .parse_quota import QUOTA_COMMANDS  # noqa: E402 - GETQUOTA, GETQUOTAROOT, SETQUOTA (RFC 9208)
COMMANDS.update(QUOTA_COMMANDS)


def parse_tag(parts: list[bytes]) -> str | None:
    """The tag of a framed command, or None when there is no valid one (answer "* BAD")."""
    line = parts[0]
    i = 0
    while i < len(line) and line[i] in TAG_CHARS:
        i += 1
    if i == 0 or i > 64 or (i < len(line) and line[i] != 0x20):
        return None
    return line[:i].decode("ascii")


def parse_command(parts: list[bytes], enabled: frozenset | set = frozenset()) -> Command:
    """`enabled`: what the session ENABLEd; with UTF8=ACCEPT or IMAP4rev2 mailbox names
    are UTF-8, not modified UTF-7 (RFC 6855 section 3, RFC 9051 section 5.1)."""
    tag = parse_tag(parts)
    if tag is None:
        raise ParseError(None, "missing or invalid tag")
    c = _Cursor(parts, tag)
    c.enabled = enabled
    c.utf8 = "UTF8=ACCEPT" in enabled or "IMAP4REV2" in enabled
    c.pos = len(tag)
    c.sp()
    name = c.atom("command").upper()
    uid = False
    if name == "UID":
        c.sp()
        name = c.atom("command").upper()
        handler = UID_COMMANDS.get(name)
        uid = True
    else:
        handler = COMMANDS.get(name)
    if handler is None:
        raise ParseError(tag, f"unknown command {'UID ' if uid else ''}{name}"[:80])
    args = handler(c)
    c.end()
    return Command(tag, name, uid, args)
