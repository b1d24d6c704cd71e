"""IMAP URLs (RFC 5092) as CATENATE (RFC 4469) uses them: a pure parser, text in, a
`MessageURL` out, `URLError` for anything else.

RFC 4469 3: only relative URLs naming a message or a part of one on this server, for the
logged-in user, are in scope: "/" enc-mailbox [";UIDVALIDITY=" n] "/;UID=" n
["/;SECTION=" enc-section] ["/;PARTIAL=" offset ["." length]], and, in the selected
state, the same from ";UID=" on, relative to the selected mailbox (the base URL RFC 4469
gives then; Dovecot resolves those too).  Absolute URLs (a scheme,
an iserver: another user or server), message lists, searches and URLAUTH are refused:
the server answers NO [BADURL ...] for them.  The keywords match without regard to case
(the RFC's examples write ";section="); the mailbox is percent-decoded, then read as
modified UTF-7 (the IMAP form) when it is ASCII, else as UTF-8 (RFC 5092 3.3 / 6).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from . import mutf7
from .parser import ParseError, Section, _Cursor, _section

MAX_URL = 4096
_NUMBER = re.compile(r"[1-9][0-9]{0,9}\Z")
_BCHARS = re.compile(r"[A-Za-z0-9\-._~!$'()*+,&=:@/%]*\Z")  # RFC 5092 bchar, ";" apart


class URLError(ValueError):
    """Not a URL this server can resolve (the message says why)."""


@dataclass(frozen=True)
class MessageURL:
    mailbox: str
    uidvalidity: int | None
    uid: int
    section: Section | None  # None: the whole message
    partial: tuple[int, int | None] | None  # (offset, length or None for the rest)


def _nz_number(text: str, what: str) -> int:
    if not _NUMBER.match(text) or int(text) > 0xFFFFFFFF:
        raise URLError(f"bad {what}")
    return int(text)


def _decode_mailbox(enc: str) -> str:
    if not enc or not _BCHARS.match(enc):
        raise URLError("bad mailbox name")
    raw = unquote_to_bytes(enc)
    try:
        if raw.isascii():
            name = mutf7.decode(raw)
        else:
            name = raw.decode("utf-8")
    except (mutf7.MUTF7Error, UnicodeDecodeError):
        raise URLError("bad mailbox name") from None
    return "INBOX" if name.upper() == "INBOX" else name


def _decode_section(enc: str) -> Section:
    if not enc or not _BCHARS.match(enc):
        raise URLError("bad section")
    raw = unquote_to_bytes(enc)
    c = _Cursor([raw + b"]"])
    try:
        sec = _section(c)
        c.expect(b"]")
    except ParseError:
        raise URLError("bad section") from None
    if not c.at_end():
        raise URLError("bad section")
    return sec


def parse(url: str, selected: str | None = None) -> MessageURL:
    """The message (part) a CATENATE URL names; URLError for anything else.  `selected`:
    the selected mailbox, the base of URLs that start at ";UID=" """
    if len(url) > MAX_URL:
        raise URLError("URL too long")
    if url[:5].upper() == ";UID=":
        if selected is None:
            raise URLError("mailbox-relative URL, but no mailbox is selected")
        url = "/" + quote(mutf7.encode(selected), safe="&/") + "/" + url
    if not url.startswith("/") or url.startswith("//"):
        raise URLError("only URLs relative to this server and user are supported")
    if "?" in url or "#" in url:
        raise URLError("not a message URL")
    # "/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s][/;PARTIAL=p]": the mailbox may hold "/",
    # so cut at the first "/;" (";" is never part of an encoded mailbox name).
    head, sep, rest = url[1:].partition("/;")
    if not sep:
        raise URLError("no UID in the URL")
    mailbox_enc, _, params = head.partition(";")
    uidvalidity = None
    if params:
        key, eq, value = params.partition("=")
        if key.upper() != "UIDVALIDITY" or not eq:
            raise URLError("bad mailbox parameter")
        uidvalidity = _nz_number(value, "UIDVALIDITY")
    mailbox = _decode_mailbox(mailbox_enc)
    fields = rest.split("/;")
    found: dict[str, str] = {}
    order = ("UID", "SECTION", "PARTIAL")
    last = -1
    for f in fields:
        key, eq, value = f.partition("=")
        key = key.upper()
        if not eq or key not in order or order.index(key) <= last:
            raise URLError("bad URL component")
        last = order.index(key)
        found[key] = value
    if "UID" not in found:
        raise URLError("no UID in the URL")
    uid = _nz_number(found["UID"], "UID")
    section = _decode_section(found["SECTION"]) if "SECTION" in found else None
    partial = None
    if "PARTIAL" in found:
        m = re.fullmatch(r"([0-9]{1,10})(?:\.([1-9][0-9]{0,9}))?", found["PARTIAL"])
        if not m or int(m.group(1)) > 0xFFFFFFFF or (m.group(2) and int(m.group(2)) > 0xFFFFFFFF):
            raise URLError("bad PARTIAL")
        partial = (int(m.group(1)), int(m.group(2)) if m.group(2) else None)
    return MessageURL(mailbox, uidvalidity, uid, section, partial)
