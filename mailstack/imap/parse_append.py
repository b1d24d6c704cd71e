"""The APPEND grammar with its extensions, pure (parser.py's cursor over a framed command):

    append          = "APPEND" SP mailbox 1*append-message            ; MULTIAPPEND, RFC 3502
    append-message  = [SP flag-list] [SP date-time] SP append-data
    append-data     = literal / literal8                              ; literal8: BINARY, RFC 3516
                    / "CATENATE" SP "(" cat-part *(SP cat-part) ")"   ; RFC 4469
    cat-part        = "TEXT" SP (literal / literal8) / "URL" SP astring

A TEXT literal8 is accepted too (Dovecot does; RFC 4469 names only literal).  The result:
{"mailbox", "messages": [AppendMessage ...]}, plus "flags"/"date"/"message" of the first
message for code that knows only the one-message APPEND.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .framer import literal_at
from .parse_list import append_utf8_data
from .parser import _Cursor

MAX_CATENATE_PARTS = 256  # parts of one CATENATE message


@dataclass
class AppendMessage:
    flags: list[str]
    date: float | None
    # ("text", bytes) and ("url", str) in order; a plain APPEND has one ("text", message)
    parts: list[tuple[str, object]] = field(default_factory=list)
    catenate: bool = False
    binary: bool = False  # some data came as a literal8


def _literal_data(c: _Cursor, msg: AppendMessage) -> bytes:
    found = literal_at(c.line, c.pos)
    if found is None or c.i + 2 >= len(c.parts):
        raise c.error("expected a literal")
    size, is8 = found
    data = c.parts[c.i + 1]
    if len(data) != size:
        raise c.error("bad literal")
    c.i += 2
    c.line = c.parts[c.i]
    c.pos = 0
    msg.binary = msg.binary or is8
    return data


def _catenate(c: _Cursor, msg: AppendMessage) -> None:
    c.sp()
    c.expect(b"(")
    while True:
        word = c.atom("TEXT or URL").upper()
        c.sp()
        if word == "TEXT":
            msg.parts.append(("text", _literal_data(c, msg)))
        elif word == "URL":
            raw = c.astring()
            try:
                msg.parts.append(("url", raw.decode("utf-8")))
            except UnicodeDecodeError:
                raise c.error("URL is not UTF-8") from None
        else:
            raise c.error("expected TEXT or URL")
        if len(msg.parts) > MAX_CATENATE_PARTS:
            raise c.error(f"more than {MAX_CATENATE_PARTS} CATENATE parts")
        if c.peek() == 0x29:
            c.pos += 1
            return
        c.sp()


def _message(c: _Cursor) -> AppendMessage:
    c.sp()
    while c.peek() == 0x20:  # imapclient's multiappend() puts two spaces between messages;
        c.pos += 1           # Dovecot's parser skips runs of spaces too
    flags: list[str] = []
    date = None
    if c.peek() == 0x28:
        flags = c.flag_list()
        c.sp()
    if c.peek() == 0x22:
        date = c.date_time()
        c.sp()
    if "\\Recent" in flags:
        raise c.error("\\Recent cannot be set")
    msg = AppendMessage(flags, date)
    if c.line[c.pos:c.pos + 8].upper() == b"CATENATE":
        c.pos += 8
        msg.catenate = True
        _catenate(c, msg)
    elif (utf8_data := append_utf8_data(c)) is not None:  # UTF8=ACCEPT: UTF8 (~{n}...)
        msg.parts.append(("text", utf8_data))
    elif literal_at(c.line, c.pos) is not None:
        msg.parts.append(("text", _literal_data(c, msg)))
    else:
        raise c.error("APPEND needs the message as a literal")
    return msg


def parse_append(c: _Cursor) -> dict:
    c.sp()
    mailbox = c.mailbox()
    messages = [_message(c)]
    while not c.at_end():
        messages.append(_message(c))
    first = messages[0]
    message = first.parts[0][1] if not first.catenate else b""
    return {"mailbox": mailbox, "messages": messages, "flags": first.flags, "date": first.date,
            "message": message}
