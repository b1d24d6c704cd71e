"""The FETCH attribute grammar, pure (parser.py's cursor in, `FetchAtt`s out): macros, BODY[...]
sections with partials, BINARY[...] (RFC 3516)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .parse_cursor import ATOM_CHARS, _Cursor


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
