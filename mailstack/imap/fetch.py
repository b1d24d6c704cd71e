"""Message structure for FETCH, from message bytes, with no I/O.

`parse(data)` finds the MIME tree by byte offsets (no copies, no decoding), which gives
BODY[section] exactly as stored; `envelope()` and `bodystructure()` render the
RFC 3501 structures.  `cache_entry()` is what the session stores per message in the
store's metadata cache, so ENVELOPE/BODYSTRUCTURE never need the message again.
"""
from __future__ import annotations

import datetime
import email.utils
import functools
import json
import re
from json.decoder import scanstring as _scanstring
from dataclasses import dataclass, field

from . import addresses, sort
from .response import nstring, string

CACHE_VERSION = 5  # 4: envelopes parse comments/CFWS (addresses.py); 5: "hs" for SEARCH
MAX_DEPTH = 32  # MIME nesting we follow; deeper parts are treated as opaque
MAX_PARTS = 2000  # parts per message we enumerate


@dataclass
class Part:
    start: int  # first byte of this part's header
    body_start: int  # first byte of its body
    end: int  # one past its last body byte
    headers: list[tuple[bytes, bytes]]  # (lower-case name, raw value without the trailing CRLF)
    type: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list["Part"] = field(default_factory=list)  # multipart parts
    message: "Part | None" = None  # the enclosed message of message/rfc822
    _first: "dict[bytes, bytes] | None" = field(default=None, repr=False, compare=False)

    def header(self, name: bytes) -> bytes | None:
        """The first field of that name (a map made at the first look: an ENVELOPE looks
        up a dozen names)."""
        first = self._first
        if first is None:  # the first field of each name: the last one a reversed walk sets
            first = self._first = dict(reversed(self.headers))
        return first.get(name)


_BLANK = re.compile(rb"\r?\n\r?\n")


def _blank(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(start, end) of what _BLANK.search(data, start, end) matches, by two finds (a
    regex scan of every header byte costs more than the rest of a header parse)."""
    k2 = data.find(b"\n\r\n", start, end)
    # a bare-LF blank line counts only before the first CRLF one: look no further (in CRLF
    # mail "\n\n" never occurs, and an unbounded search would scan the whole body)
    k1 = data.find(b"\n\n", start, end if k2 < 0 else min(end, k2 + 2))
    if k1 < 0 and k2 < 0:
        return None
    if k2 < 0 or 0 <= k1 < k2:
        k, stop = k1, k1 + 2
    else:
        k, stop = k2, k2 + 3
    return (k - 1 if k > start and data[k - 1] == 13 else k), stop


def split_header(data: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(end of the header block including its final line break, start of body)."""
    end = len(data) if end is None else end
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        n = 2 if data.startswith(b"\r\n", start) else 1
        return start, start + n  # empty header
    m = _blank(data, start, end)
    if m is None:
        return end, end
    # the header keeps its last line break; the blank line belongs to neither
    line_end = m[0] + (2 if data.startswith(b"\r\n", m[0]) else 1)
    return line_end, m[1]


_FIELD_SPLIT = re.compile(rb"\r?\n(?![ \t])").split


def parse_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    if b"\n " in block or b"\n\t" in block or len(block) > 30000:
        return _parse_headers(block)
    # No folded line (most headers a client lists): one split at every LF.  The same
    # fields as the regex split: a CR left before the LF goes with value.strip(), and
    # 30,000 bytes cannot hold more than the 10,001 fields the regex split keeps
    out: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


def _parse_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    """parse_headers for any block: fields split where a line break is not followed by
    white space (folding), at most 10,000 of them."""
    out: list[tuple[bytes, bytes]] = []
    for line in _FIELD_SPLIT(block):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        out.append((name.strip().lower(), value.strip()))
        if len(out) > 10000:
            break
    return out


_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def unfold(value: bytes) -> bytes:
    # most header values are one line: no regex call (indexing calls this ~10 times a message)
    return _FOLD.sub(b"", value) if b"\n" in value else value


# --- Content-Type and friends -------------------------------------------------------------
_TOKEN = re.compile(rb'[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f]+')


def _params(value: bytes, pos: int) -> list[tuple[str, str]]:
    """;name=value pairs after position `pos`, RFC 2231 continuations left as they are."""
    out: list[tuple[str, str]] = []
    n = len(value)
    while pos < n and len(out) < 64:
        semi = value.find(b";", pos)
        if semi < 0:
            break
        pos = semi + 1
        while pos < n and value[pos] in b" \t\r\n":
            pos += 1
        m = _TOKEN.match(value, pos)
        if not m:
            continue
        name = m.group().decode("ascii", "replace")
        pos = m.end()
        while pos < n and value[pos] in b" \t":
            pos += 1
        if pos >= n or value[pos] != 0x3D:
            continue
        pos += 1
        while pos < n and value[pos] in b" \t":
            pos += 1
        if pos < n and value[pos] == 0x22:
            pos += 1
            close = value.find(b'"', pos)
            close = n if close < 0 else close
            if value.find(b"\\", pos, close) < 0:  # no quoted-pair (a boundary, a name): a slice
                out.append((name, value[pos:close].decode("utf-8", "surrogateescape")))
                pos = close + 1
                continue
            buf = bytearray()
            while pos < n and value[pos] != 0x22:
                if value[pos] == 0x5C and pos + 1 < n:
                    pos += 1
                buf.append(value[pos])
                pos += 1
            pos += 1
            val = bytes(buf)
        else:
            m = _TOKEN.match(value, pos)
            val = m.group() if m else b""
            pos = m.end() if m else pos
        out.append((name, val.decode("utf-8", "surrogateescape")))
    return out


def content_type(value: bytes | None) -> tuple[str, str, list[tuple[str, str]]]:
    if value is None:
        return "text", "plain", [("charset", "us-ascii")]
    t, s, params = _content_type(value)
    return t, s, list(params)


def _content_type(value: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """content_type() with the params as a tuple: a value _part_type may remember."""
    value = unfold(value)
    m = _TYPE.match(value)
    # _TOKEN lets 8-bit bytes through, but a type is ASCII: "text/\x80" is as invalid as
    # "text/(" and gets RFC 2045's default (it raised UnicodeDecodeError at .decode)
    if (not m or not _TOKEN.fullmatch(m.group(1)) or not _TOKEN.fullmatch(m.group(2))
            or not m.group().isascii()):
        return "text", "plain", (("charset", "us-ascii"),)
    return (m.group(1).decode("ascii").lower(), m.group(2).decode("ascii").lower(),
            tuple(_params(value, m.end())))


_TYPE = re.compile(rb"\s*([^\s/;]+)\s*/\s*([^\s;]+)")
_TYPED_MAX = 256  # longer Content-Type values (rare) are parsed each time: the memo stays small


@functools.lru_cache(maxsize=1024)
def _typed(value: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """A part's (type, subtype, params) from its Content-Type value, a text part's
    charset defaulted, remembered: mail repeats these values (in the bench corpus 15,000
    of 20,000 are six distinct ones; a multipart's boundary makes it unique, and the LRU
    lets those pass).  Tuples, so a caller cannot change what the next one gets."""
    t, s, params = _content_type(value)
    if t == "text" and not any(k.lower() == "charset" for k, _ in params):
        params = (("charset", "us-ascii"), *params)
    return t, s, params


def part_type(value: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """_typed, remembered only for short values (a memo entry is bounded by the key)."""
    return _typed(value) if len(value) <= _TYPED_MAX else _typed.__wrapped__(value)


def _disposition(value: bytes | None) -> tuple[str, list[tuple[str, str]]] | None:
    if value is None:
        return None
    value = unfold(value)
    m = re.match(rb"\s*([^\s;]+)", value)
    if not m:
        return None
    return m.group(1).decode("ascii", "replace"), _params(value, m.end())


# --- MIME tree --------------------------------------------------------------------------
def parse(data: bytes) -> Part:
    counter = [0]
    return _parse_part(data, 0, len(data), "text", "plain", 0, counter)


def _parse_part(data: bytes, start: int, end: int, dtype: str, dsub: str, depth: int,
                counter: list[int]) -> Part:
    counter[0] += 1
    hend, bstart = split_header(data, start, end)
    headers = parse_headers(data[start:hend])
    part = Part(start, bstart, end, headers)
    ctv = part.header(b"content-type")
    if ctv is None:
        part.type, part.subtype = dtype, dsub
        part.params = [("charset", "us-ascii")] if dtype == "text" else []
    else:
        part.type, part.subtype, params = part_type(ctv)
        part.params = list(params)  # the Part's own list: the memo keeps the tuple
    if depth >= MAX_DEPTH or counter[0] >= MAX_PARTS:
        if part.type == "multipart" or (part.type, part.subtype) == ("message", "rfc822"):
            part.type, part.subtype, part.params = "application", "octet-stream", []
        return part
    if part.type == "multipart":
        boundary = dict((k.lower(), v) for k, v in part.params).get("boundary")
        if not boundary:
            # RFC 2046 requires a boundary; treat the part as opaque text
            part.type, part.subtype, part.params = "text", "plain", [("charset", "us-ascii")]
            return part
        child_default = ("message", "rfc822") if part.subtype == "digest" else ("text", "plain")
        for s, e in _split_multipart(data, bstart, end, boundary.encode("utf-8", "surrogateescape")):
            if counter[0] >= MAX_PARTS:
                break
            part.children.append(_parse_part(data, s, e, *child_default, depth + 1, counter))
        if not part.children:  # no boundary found: RFC 3501 wants at least one part
            part.children.append(Part(bstart, bstart, bstart, [], "text", "plain", [("charset", "us-ascii")]))
    elif (part.type, part.subtype) == ("message", "rfc822"):
        # parsed even when (wrongly) transfer-encoded: the BODYSTRUCTURE grammar needs an
        # envelope and a body for every message/rfc822 part
        part.message = _parse_part(data, bstart, end, "text", "plain", depth + 1, counter)
    return part


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the body parts between the delimiter lines of `boundary`.

    bytes.find, not a regular expression: a pattern anchored at line starts is tried at every
    byte of a large base64 attachment, and that was most of the cost of a first FETCH."""
    delim = b"--" + boundary
    parts: list[tuple[int, int]] = []
    current = None
    pos = floor = start  # floor: where the current search began (the CRLF cannot lie before it)
    while True:
        i = data.find(delim, pos, end)
        if i < 0:
            if current is not None:  # missing close delimiter: the part runs to the end
                parts.append((current, end))
            return parts
        pos = i + 1
        if i > 0 and data[i - 1] != 0x0A:  # a delimiter starts a line
            continue
        k = i + len(delim)
        closing = data.startswith(b"--", k, end)
        if closing:
            k += 2
        while k < end and data[k] in (0x20, 0x09):  # transport padding
            k += 1
        if k < end and not data.startswith(b"\n", k, end) and not data.startswith(b"\r\n", k, end):
            continue  # "--boundary" followed by more text: a longer boundary, or content
        line_start = i
        if i - 1 >= floor:  # the CRLF before the delimiter belongs to the delimiter (RFC 2046 5.1.1)
            line_start = i - 2 if i - 2 >= floor and data[i - 2] == 0x0D else i - 1
        if current is not None:
            parts.append((current, line_start))
        if closing:
            return parts
        current = k + (2 if data.startswith(b"\r\n", k, end) else 1 if k < end else 0)
        pos = floor = current
        if len(parts) >= MAX_PARTS:
            return parts


def _cte(part: Part) -> str:
    v = part.header(b"content-transfer-encoding")
    return unfold(v).strip().decode("ascii", "replace").lower() if v else "7bit"


# --- ENVELOPE -------------------------------------------------------------------------
def address_list(value: bytes | None) -> bytes:
    """An ENVELOPE address list (RFC 3501 7.4.2) from a raw header value (addresses.py parses)."""
    if value is None:
        return b"NIL"
    return _address_list(value)


@functools.lru_cache(maxsize=4096)
def _address_list(value: bytes) -> bytes:
    """address_list, remembered: mail repeats its senders and recipients (a mailbox's own
    address is in most To: fields), and indexing renders thousands in a row."""
    out = [b"(" + nstring(a.name) + b" " + nstring(a.route) + b" " + nstring(a.mailbox) + b" " +
           nstring(a.host) + b")" for a in addresses.parse_list_cached(unfold(value))]
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def _first_fields(part: Part) -> dict:
    """part.header's map (the first field of each name), for many look-ups without a call each."""
    first = part._first
    if first is None:
        first = part._first = dict(reversed(part.headers))
    return first


def envelope(part: Part) -> bytes:
    get = _first_fields(part).get
    date, subject, in_reply_to, message_id = get(b"date"), get(b"subject"), get(b"in-reply-to"), get(b"message-id")
    frm = address_list(get(b"from"))
    sender = get(b"sender")
    reply_to = get(b"reply-to")
    # RFC 3501: sender and reply-to default to from (rendered once, the common case)
    items = [b"NIL" if date is None else string(unfold(date)),
             b"NIL" if subject is None else string(unfold(subject)), frm,
             address_list(sender) if sender else frm, address_list(reply_to) if reply_to else frm,
             address_list(get(b"to")), address_list(get(b"cc")), address_list(get(b"bcc")),
             b"NIL" if in_reply_to is None else string(unfold(in_reply_to)),
             b"NIL" if message_id is None else string(unfold(message_id))]
    return b"(" + b" ".join(items) + b")"


# --- BODYSTRUCTURE ----------------------------------------------------------------------
def _plist(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(string(k.upper() if k.lower() != "charset" else k.upper()) + b" " +
                            string(v.encode("utf-8", "surrogateescape")) for k, v in params) + b")"


def _body_ext_1part(data: bytes, part: Part) -> bytes:
    md5 = part.header(b"content-md5")
    disp = _disposition(part.header(b"content-disposition"))
    dsp = b"NIL" if disp is None else b"(" + string(disp[0].upper()) + b" " + _plist(disp[1]) + b")"
    lang = part.header(b"content-language")
    lng = b"NIL"
    if lang:
        langs = [x.strip() for x in unfold(lang).split(b",") if x.strip()]
        lng = string(langs[0]) if len(langs) == 1 else (b"(" + b" ".join(string(x) for x in langs) + b")"
                                                          if langs else b"NIL")
    loc = part.header(b"content-location")
    return b" ".join([nstring(unfold(md5).strip() if md5 else None), dsp, lng,
                      nstring(unfold(loc).strip() if loc else None)])


def bodystructure(data: bytes, part: Part, extended: bool = True) -> bytes:
    if part.type == "multipart":
        inner = b"".join(bodystructure(data, c, extended) for c in part.children)
        out = inner + b" " + string(part.subtype.upper())
        if extended:
            disp = _disposition(part.header(b"content-disposition"))
            dsp = b"NIL" if disp is None else b"(" + string(disp[0].upper()) + b" " + _plist(disp[1]) + b")"
            lang = part.header(b"content-language")
            loc = part.header(b"content-location")
            out += b" " + _plist(part.params) + b" " + dsp + b" " + \
                (string(unfold(lang).strip()) if lang else b"NIL") + b" " + \
                nstring(unfold(loc).strip() if loc else None)
        return b"(" + out + b")"
    size = part.end - part.body_start
    cid = part.header(b"content-id")
    desc = part.header(b"content-description")
    enc = _cte(part).upper()
    fields = [string(part.type.upper()), string(part.subtype.upper()), _plist(part.params),
              nstring(unfold(cid).strip() if cid else None), nstring(unfold(desc).strip() if desc else None),
              string(enc.encode("ascii", "replace")), str(size).encode()]
    if part.type == "text":
        fields.append(str(data.count(b"\n", part.body_start, part.end)).encode())
    elif part.message is not None:
        fields.append(envelope(part.message))
        fields.append(bodystructure(data, part.message, extended))
        fields.append(str(data.count(b"\n", part.body_start, part.end)).encode())
    if extended:
        fields.append(_body_ext_1part(data, part))
    return b"(" + b" ".join(fields) + b")"


# --- BODY[section] ------------------------------------------------------------------------
def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """Part by section number (RFC 3501 6.4.5): a non-multipart message has part 1 = itself.

    The numbers after a message/rfc822 part are those of the message it encloses; the
    first number never enters one: a top-level message/rfc822 body is part 1 (so BODY[1]
    is the whole enclosed message, BODY[1.1] its first part), as Dovecot answers."""
    part = root
    for i, n in enumerate(numbers):
        if i and part.message is not None and part.type == "message":
            part = part.message
        if part.type == "multipart":
            if not 1 <= n <= len(part.children):
                return None
            part = part.children[n - 1]
        elif n == 1:
            continue  # part 1 of a single-part body is its body
        else:
            return None
    return part


def header_fields(block: bytes, names: tuple[str, ...], exclude: bool) -> bytes:
    """The named header fields (or all others), as they appear, plus the blank line."""
    wanted = {n.lower().encode("ascii") for n in names}
    out = bytearray()
    for line in re.split(rb"(?<=\n)(?![ \t])", block):
        if not line or line in (b"\r\n", b"\n"):
            continue
        name = line.split(b":", 1)[0].strip().lower()
        if (name in wanted) != exclude:
            out += line if line.endswith(b"\n") else line + b"\r\n"
    out += b"\r\n"
    return bytes(out)


def section_bytes(data: bytes, root: Part, section) -> bytes:
    """The bytes of BODY[section] (empty when the part does not exist, as Dovecot answers)."""
    text = section.text
    if not section.part:
        part = root
    else:
        part = find_part(root, section.part)
        if part is None:
            return b""
    if text == "MIME":
        hend, _ = split_header(data, part.start, part.end)
        return data[part.start:part.body_start] if part.start != part.body_start else b"\r\n"
    if section.part and text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"):
        # these apply to an enclosed message/rfc822
        if part.message is None:
            return b""
        part = part.message
    if text == "":
        if not section.part:
            return data
        return data[part.body_start:part.end]
    if text == "TEXT":
        return data[part.body_start:part.end]
    hend, bstart = split_header(data, part.start, part.end)
    block = data[part.start:bstart]
    if text == "HEADER":
        return block
    return header_fields(data[part.start:hend], section.fields, text == "HEADER.FIELDS.NOT")


def header_only(section) -> bool:
    """Does this section need only the top-level header (so the body need not be read)?"""
    return not section.part and section.text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT")


# --- the cache entry ------------------------------------------------------------------------
def cache_entry(data: bytes) -> dict:
    """Everything FETCH and SEARCH need that is costly to recompute (JSON-able)."""
    root = parse(data)
    sent = _sent_date(root)
    return {
        "v": CACHE_VERSION,
        # latin-1 maps bytes to str one to one, so 8-bit header bytes survive JSON intact
        "env": envelope(root).decode("latin-1"),
        "bs": bodystructure(data, root, True).decode("latin-1"),
        "body": bodystructure(data, root, False).decode("latin-1"),
        "sent": sent,
        "hsize": root.body_start,
        "hs": _header_index(root),
        "sort": _sort_fields(root),
    }


def _references(root: "Part") -> str:
    refs = root.header(b"references")
    return unfold(refs)[-8192:].decode("latin-1") if refs else ""


def header_entry(header: bytes, search_fields: bool = True) -> dict:
    """The part of a cache entry that the header alone gives (ENVELOPE, the Date: for SENT*
    searches): what a client's first listing asks for, at a fraction of a full parse.
    `header` must hold the whole header block; BODYSTRUCTURE is added when first asked for."""
    hend, bstart = split_header(header)
    root = Part(0, bstart, bstart, parse_headers(header[:hend]))
    sent, seconds = _date_keys(root)
    entry = {"v": CACHE_VERSION, "env": envelope(root).decode("latin-1"),
             "sent": sent, "hsize": bstart}
    if search_fields:
        entry["hs"] = _header_index(root)
    # with the envelope, all SORT / THREAD need (sort.fields_from_envelope); the whole sort
    # fields are computed at the first SORT that needs them, not for every first listing,
    # but the SUBJECT and DATE keys cost little here (the Date: is parsed already)
    entry["refs"] = _references(root)
    entry["sl"] = _sort_light(root, seconds)
    return entry


def _sort_light(root: "Part", seconds: int | None) -> list:
    # sort.py owns these keys
    subject, reply = sort.subject_and_reply(root.header(b"subject"))
    return [sort.SORT_VERSION, subject, seconds, int(reply)]


_search_header_index = None  # search.header_index, bound at the first call (search.py imports this module)


def _header_index(root: "Part") -> dict:
    global _search_header_index
    if _search_header_index is None:
        from .search import header_index
        _search_header_index = header_index
    return _search_header_index(root)


def _sort_fields(root: "Part") -> dict:
    return sort.fields(root.headers)  # SORT / THREAD keys (sort.py owns the "sort" value)


_MONTH_NUMBERS = {m: i + 1 for i, m in enumerate((b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul",
                                                    b"aug", b"sep", b"oct", b"nov", b"dec"))}
# The usual RFC 5322 form, "Tue, 1 Apr 2025 10:00:00 +0200": read without the email
# package (a third of a header parse); anything else goes the long way.
_PLAIN_DATE = re.compile(rb"[ \t]*(?:[A-Za-z]{3},[ \t]*)?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) "
                         rb"(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)[ \t]*")
_ZONES: dict[int, datetime.timezone] = {}  # UTC offset in minutes -> its tzinfo, made once


def _month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _sent_date(root: "Part") -> int | None:
    return _ymd(_date(root))


def _plain_date(date: bytes) -> tuple | None:
    """(year, month, day, hour, minute, second, UTC offset in minutes) of a Date: value in
    the usual RFC 5322 form with every field in range, else None (the long way)."""
    m = _PLAIN_DATE.fullmatch(date)
    if m is None:
        return None
    d, mon, y, hh, mi, ss, sign, zh, zm = m.groups()  # one call, not nine
    month = _MONTH_NUMBERS.get(mon.lower())
    day, year, hour, minute, second, zh, zm = int(d), int(y), int(hh), int(mi), int(ss), int(zh), int(zm)
    # in range as email.utils checks; the 29th to the 31st of the months that have them
    # too (a tenth of all dates: the long way costs four times this one)
    if month and 1 <= day and (day <= 28 or day <= _month_days(year, month)) and hour < 24 \
            and minute < 60 and second < 60 and zh < 24 and zm < 60 and year >= 1000:
        return year, month, day, hour, minute, second, (zh * 60 + zm) * (-1 if sign == b"-" else 1)
    return None


def _date(root: "Part"):
    date = root.header(b"date")
    if not date:
        return None
    plain = _plain_date(date)
    if plain is not None:
        year, month, day, hour, minute, second, offset = plain
        zone = _ZONES.get(offset)
        if zone is None:
            zone = _ZONES[offset] = datetime.timezone(datetime.timedelta(minutes=offset))
        # "-0000" (zone unknown): email.utils gives a naive time, which SORT reads as UTC
        return datetime.datetime(year, month, day, hour, minute, second, tzinfo=zone)
    try:
        return email.utils.parsedate_to_datetime(unfold(date).decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def _date_keys(root: "Part") -> tuple[int | None, int | None]:
    """(_ymd(_date(root)), sort.seconds(_date(root))): what the first listing keeps of the
    Date:, for the usual form by arithmetic (no datetime, no timezone object, no
    timestamp(): ~2 µs of a cold listing's ~35 µs a message); tested equal."""
    date = root.header(b"date")
    plain = _plain_date(date) if date else None
    if plain is None:
        dt = _date(root)
        return _ymd(dt), sort.seconds(dt)
    year, month, day, hour, minute, second, offset = plain
    days = datetime.date(year, month, day).toordinal() - _EPOCH_ORDINAL
    return (year * 10000 + month * 100 + day,
            days * 86400 + hour * 3600 + minute * 60 + second - offset * 60)


def _ymd(dt) -> int | None:
    # SENT* keys compare dates in the sender's zone (RFC 3501: "disregarding time and timezone")
    return None if dt is None else dt.year * 10000 + dt.month * 100 + dt.day


_ENVELOPE_LINE = b'{"v":%d,"env":"' % CACHE_VERSION  # how an index line starts (store/index.py)


def cached_envelope(entry: "dict | bytes | None") -> bytes | None:
    """b"ENVELOPE (...)" from an entry, or from the JSON bytes of its index line: those
    start with the version and the envelope (store/index.py writes them so), which is
    read off the front without parsing the rest.  None when not there or not ours."""
    if isinstance(entry, bytes):
        if not entry.startswith(_ENVELOPE_LINE):
            entry = parse_entry(entry)
        else:
            try:
                value, _ = _scanstring(entry.decode("utf-8"), len(_ENVELOPE_LINE))
                return b"ENVELOPE " + value.encode("latin-1")
            except (ValueError, UnicodeError):  # damaged: recomputed
                return None
    value = cached(entry, "env")
    return None if value is None else b"ENVELOPE " + value


def parse_entry(entry: "dict | bytes | None") -> dict | None:
    """An entry as a dict (the JSON of an index line parsed); None if it does not parse."""
    if not isinstance(entry, bytes):
        return entry
    try:
        value = json.loads(entry)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def cached(entry: "dict | bytes | None", key: str) -> bytes | None:
    if isinstance(entry, bytes):  # an index line (cache_get_many(raw=True)) or a rendered ENVELOPE
        if entry.startswith(b"ENVELOPE "):
            return entry[9:] if key == "env" else None
        entry = parse_entry(entry)
    if not entry or entry.get("v") != CACHE_VERSION:
        return None
    v = entry.get(key)
    try:
        return v.encode("latin-1") if isinstance(v, str) else None
    except UnicodeEncodeError:  # not written by us: recompute
        return None
