"""SORT (RFC 5256 section 3, RFC 5957 DISPLAYFROM/DISPLAYTO) with no I/O.

`base_subject()` is the base subject extraction of RFC 5256 section 2.1; `fields()` turns a
message header into the sort-ready values the metadata index keeps under the key "sort"
(casemapped strings, the sent date as a UTC timestamp, and what THREAD needs: Message-ID
and the parent references); `order()` sorts messages by a list of sort criteria, and
`order_uids()` does the same from key columns (sort.Keys: a dict lookup per message in C
instead of a Python key function).  `envelope_head()` / `envelope_tail()` read the first /
last two items of a rendered ENVELOPE, enough for SUBJECT, DATE and THREAD without
parsing the address lists.

Strings compare as Dovecot compares them (i;unicode-casemap, RFC 5051: each character
title-cased, then decomposed), which for ASCII is the i;ascii-casemap of RFC 5256.
"""
from __future__ import annotations

import email.utils
import functools
import re
import unicodedata
from dataclasses import dataclass

from . import addresses

SORT_VERSION = 1  # bump when what fields() computes changes: old entries are recomputed
SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO")
MAX_REFERENCES = 100  # a References header longer than this keeps its last (closest) ids
MAX_ID = 998  # longest Message-ID kept (a header line's limit)


# --- string comparison ------------------------------------------------------------------------
def casemap(text: str) -> str:
    """i;unicode-casemap (RFC 5051) as Dovecot does it: title-case, then decompose."""
    if text.isascii():
        return text.upper()
    out = []
    for ch in text:
        t = ch.title()
        out.append(t if len(t) == 1 else ch)  # simple (one to one) mappings only
    return unicodedata.normalize("NFKD", "".join(out))


# --- base subject (RFC 5256 section 2.1) ------------------------------------------------------
_BLOB = r"\[[^\[\]]*\] *"  # subj-blob: "[" *BLOBCHAR "]" *WSP
_LEADER = re.compile(r"(?:%s)*(?:re|fwd?) *(?:%s)?:" % (_BLOB, _BLOB), re.IGNORECASE | re.ASCII)
_BLOB_RE = re.compile(_BLOB)
_TRAILER = "(fwd)"
_SPACES = re.compile(r"[ \t]+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def base_subject(subject: str) -> tuple[str, bool]:
    """(base subject, is a reply or forward) of a decoded Subject: text.

    The reply-or-forward flag is what THREAD=REFERENCES step 5 asks: true when the
    extraction removed a "re:"/"fw:"/"fwd:" leader, a "(fwd)" trailer or a "[fwd: ...]"
    wrapper.  The result keeps its case; compare with casemap()."""
    # (1) tabs and continuations to a space, runs of spaces to one
    s = _SPACES.sub(" ", _FOLD.sub("", subject).replace("\r", " ").replace("\n", " "))
    reply = False
    while True:
        # (2) subj-trailer = "(fwd)" / WSP, repeatedly
        while True:
            if s.endswith(" "):
                s = s.rstrip(" ")
            elif s[-5:].lower() == _TRAILER:
                s = s[:-5]
                reply = True
            else:
                break
        # (3), (4), repeated (5)
        while True:
            changed = False
            # (3) subj-leader = (*subj-blob subj-refwd) / WSP
            if s.startswith(" "):
                s = s[1:]
                changed = True
            else:
                m = _LEADER.match(s)
                if m:
                    s = s[m.end():]
                    reply = True
                    changed = True
            # (4) a subj-blob prefix, when what remains is a non-empty subj-base
            m = _BLOB_RE.match(s)
            if m and m.end() < len(s):
                s = s[m.end():]
                changed = True
            if not changed:
                break
        # (6) subj-fwd-hdr "[fwd:" ... subj-fwd-trl "]": unwrap and start over at (2)
        if s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            reply = True
            continue
        return s, reply


# --- the index fields -------------------------------------------------------------------------
def _decode_words(value: bytes) -> str:
    if b"=?" not in value:
        return value.decode("utf-8", "replace")
    from .search import _decode_words as decode  # search.py decodes RFC 2047 the same way
    return decode(value)


_CONTINUATION = re.compile(rb"\r?\n(?=[ \t])")
_COMMENT = re.compile(rb"\([^()]*\)")


def _unfold(value: bytes) -> bytes:
    return _CONTINUATION.sub(b"", value) if b"\n" in value else value


def _first_address(value: bytes | None) -> addresses.Address | None:
    if not value:
        return None
    for a in addresses.parse_list_cached(_unfold(value)):
        if a.mailbox is not None or a.name is not None:
            return a
    return None


def _mailbox(a: addresses.Address | None) -> str:
    """RFC 5256 FROM/TO/CC: the addr-mailbox (local part) of the first address."""
    if a is None or a.mailbox is None:
        return ""
    return a.mailbox.decode("utf-8", "replace")


def _display(a: addresses.Address | None) -> str:
    """RFC 5957: the decoded display name of the first address, else its addr-spec."""
    if a is None:
        return ""
    if a.name:
        name = _decode_words(a.name).strip()
        if name:
            return name
    if a.mailbox is not None and a.host is not None:
        return (a.mailbox + b"@" + a.host).decode("utf-8", "replace")
    return a.mailbox.decode("utf-8", "replace") if a.mailbox is not None else ""


_MSGID = re.compile(rb"<([^<>\s]+)>")


def message_ids(value: bytes | None) -> list[str]:
    """The valid-looking msg-ids of a Message-ID/References/In-Reply-To value, in order,
    without their angle brackets (compared case-sensitively, RFC 5256 section 4)."""
    if not value:
        return []
    value = _unfold(value)
    if b"(" in value:
        value = _COMMENT.sub(b" ", value)  # comments
    return [m.group(1).decode("utf-8", "replace")[:MAX_ID] for m in _MSGID.finditer(value)
            if b"@" in m.group(1)]


def sent_date(value: bytes | None) -> int | None:
    """RFC 5256 2.2: the Date: in UTC seconds; None when missing or unparseable (the caller
    then uses the internal date)."""
    if not value:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(_unfold(value).decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return seconds(dt)


def seconds(dt) -> int | None:
    """A parsed Date: as UTC seconds (sent_date's value); None for None."""
    if dt is None:
        return None
    try:
        if dt.tzinfo is None:  # "-0000" or an unknown zone: treated as UTC
            return int(dt.replace(tzinfo=email.utils.datetime.timezone.utc).timestamp())
        return int(dt.timestamp())
    except (ValueError, OverflowError, OSError):
        return None


def fields(headers: list[tuple[bytes, bytes]]) -> dict:
    """The index entry's "sort" value from a parsed header ((lower-case name, raw value))."""
    first: dict[bytes, bytes] = {}
    for k, v in headers:
        first.setdefault(k, v)
    frm, to, cc = (_first_address(first.get(h)) for h in (b"from", b"to", b"cc"))
    return _fields(first.get(b"subject"), frm, to, cc, first.get(b"date"), first.get(b"message-id"),
                   first.get(b"references"), first.get(b"in-reply-to"))


def fields_from_envelope(envelope: bytes, references: bytes | None) -> dict | None:
    """The same value from what the index already holds: the rendered ENVELOPE (date,
    subject, addresses, In-Reply-To, Message-ID as the header had them) and the raw
    References; None when the envelope does not parse."""
    try:
        items = _parse_data(envelope)
    except (ValueError, IndexError):
        return None
    if not isinstance(items, list) or len(items) != 10:
        return None
    date, subject, frm, _, _, to, cc, _, irt, mid = items
    return _fields(subject, _first_listed(frm), _first_listed(to), _first_listed(cc), date, mid,
                   references or None, irt)


def _subject(subject: bytes | None) -> tuple[str, bool]:
    """(SUBJECT sort key, a reply or forward?) of a raw Subject: value."""
    text, reply = base_subject(_decode_words(_unfold(subject or b"")))
    return casemap(text), reply


_subject_cached = functools.lru_cache(maxsize=4096)(_subject)  # a thread's messages share subjects


def subject_and_reply(subject: bytes | None) -> tuple[str, bool]:
    """(SUBJECT sort key, a reply or forward?) of a raw Subject: value."""
    return _subject_cached(subject)


def subject_key(subject: bytes | None) -> str:
    """The SUBJECT sort key of a raw Subject: value."""
    return _subject_cached(subject)[0]


def envelope_head(envelope: bytes) -> tuple[bytes | None, bytes | None] | None:
    """(Date, Subject) as the rendered ENVELOPE's first two items hold them: what SORT by
    SUBJECT and DATE need (subject_key, sent_date), without parsing the address lists.
    None when those two items do not parse."""
    if not envelope.startswith(b"("):
        return None
    got: list = []
    i = 1
    for _ in range(2):
        m = _TOKEN.match(envelope, i)
        if m is None:
            return None
        i = m.end()
        kind = m.lastindex
        if kind == 3:
            text = m.group(3)
            got.append(_ESCAPED.sub(rb"\1", text) if b"\\" in text else text)
        elif kind == 4:
            size = int(m.group(4))
            got.append(envelope[i:i + size])
            i += size
        elif kind == 5 and m.group(5).upper() == b"NIL":
            got.append(None)
        else:
            return None
    return got[0], got[1]


@functools.lru_cache(maxsize=4096)
def _address_keys(a: addresses.Address | None) -> tuple[str, str]:
    """(FROM/TO/CC key, DISPLAYFROM/DISPLAYTO key) of a first address, remembered (mail
    repeats its correspondents)."""
    return casemap(_mailbox(a)), casemap(_display(a))


def envelope_tail(envelope: bytes) -> tuple[bytes | None, bytes | None] | None:
    """(In-Reply-To, Message-ID) as the rendered ENVELOPE's last two items hold them, read
    backwards from its end without parsing the address lists; None when the envelope has
    a literal or the items are not NIL or quoted strings (the caller parses it whole)."""
    if not envelope.endswith(b")") or b"}\r\n" in envelope:
        return None
    got: list = []
    end = len(envelope) - 1  # one past the item's last byte
    for _ in range(2):
        if envelope[end - 3:end] == b"NIL":
            start = end - 3
            got.append(None)
        elif envelope[end - 1:end] == b'"':
            start = end - 1
            while True:  # the opening quote: every quote inside is escaped (odd backslashes)
                start = envelope.rfind(b'"', 0, start)
                if start < 0:
                    return None
                slashes = start - len(envelope[:start].rstrip(b"\\"))
                if slashes % 2 == 0:
                    break
            text = envelope[start + 1:end - 1]
            got.append(_ESCAPED.sub(rb"\1", text) if b"\\" in text else text)
        else:
            return None
        if envelope[start - 1:start] != b" ":
            return None
        end = start - 1
    return got[1], got[0]


def thread_fields_from_envelope(envelope: bytes, references: bytes | None, light: list | None = None
                                ) -> dict | None:
    """What THREAD needs of fields_from_envelope's value ("s", "rf", "d", "id", "r"), from
    the envelope's first and last two items alone (the first two not even parsed when the
    listing's `light` value [SORT_VERSION, subject key, date, reply?] is given); None when
    they do not parse."""
    tail = envelope_tail(envelope)
    if tail is None:
        return None
    if light is not None:
        _, key, date, reply = light
    else:
        head = envelope_head(envelope)
        if head is None:
            return None
        (key, reply), date = _subject_cached(head[1]), sent_date(head[0])
    out = {"s": key, "d": date}
    if reply:
        out["rf"] = 1
    irt, mid = tail
    ids = message_ids(mid)
    if ids:
        out["id"] = ids[0]
    refs = message_ids(references or None) or message_ids(irt)[:1]
    if refs:
        out["r"] = refs[-MAX_REFERENCES:]
    return out


THREAD_KEYS = ("s", "rf", "d", "id", "r")


def _fields(subject, frm, to, cc, date, mid, references, irt) -> dict:
    key, reply = _subject_cached(subject)
    (f, df), (t, dt), (c, _) = _address_keys(frm), _address_keys(to), _address_keys(cc)
    out = {"v": SORT_VERSION, "s": key, "f": f, "t": t, "c": c, "df": df, "dt": dt, "d": sent_date(date)}
    if reply:
        out["rf"] = 1
    ids = message_ids(mid)
    if ids:
        out["id"] = ids[0]
    # RFC 5256 4 (1): the References, or else the first In-Reply-To id, as the only parent
    refs = message_ids(references) or message_ids(irt)[:1]
    if refs:
        out["r"] = refs[-MAX_REFERENCES:]
    return out


def _first_listed(value) -> addresses.Address | None:
    """The first address of an ENVELOPE address list, as _first_address picks it."""
    if not isinstance(value, list):
        return None
    for a in value:
        if isinstance(a, list) and len(a) == 4:
            addr = addresses.Address(*a)
            if addr.mailbox is not None or addr.name is not None:
                return addr
    return None


_TOKEN = re.compile(rb'[ ]*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\}\r\n|([^\s()"{]+))')
_ESCAPED = re.compile(rb"\\(.)")


def _parse_data(data: bytes):
    """IMAP response data (lists, NIL, quoted strings, literals) as nested lists of bytes/None."""
    if b"}\r\n" not in data:  # no literal: tokenised in one call (what most envelopes are)
        return _parse_tokens(data)
    stack: list[list] = [[]]
    i, n = 0, len(data)
    while i < n:
        m = _TOKEN.match(data, i)
        if m is None:
            raise ValueError("bad data")
        i = m.end()
        kind = m.lastindex
        if kind == 1:
            stack.append([])
        elif kind == 2:
            done = stack.pop()
            stack[-1].append(done)
        elif kind == 3:
            text = m.group(3)
            stack[-1].append(_ESCAPED.sub(rb"\1", text) if b"\\" in text else text)
        elif kind == 4:
            size = int(m.group(4))
            stack[-1].append(data[i:i + size])
            i += size
        else:
            word = m.group(5)
            stack[-1].append(None if word.upper() == b"NIL" else word)
    if len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("unbalanced")
    return stack[0][0]


def _parse_tokens(data: bytes):
    stack: list[list] = [[]]
    end = 0
    for m in _TOKEN.finditer(data):
        if m.start() != end:
            raise ValueError("bad data")
        end = m.end()
        opening, closing, text, _, word = m.groups()
        if opening:
            stack.append([])
        elif closing:
            done = stack.pop()
            stack[-1].append(done)
        elif text is not None:
            stack[-1].append(_ESCAPED.sub(rb"\1", text) if b"\\" in text else text)
        else:
            stack[-1].append(None if word is None or word.upper() == b"NIL" else word)
    if end != len(data) or len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("unbalanced")
    return stack[0][0]


def light_valid(light) -> bool:
    """Is an entry's "sl" value ([SORT_VERSION, SUBJECT key, sent seconds, reply?], what a
    listing keeps: fetch.header_entry) current?"""
    return isinstance(light, list) and len(light) == 4 and light[0] == SORT_VERSION


def valid(entry: dict | None) -> bool:
    """Does an index entry hold current sort fields?"""
    value = entry.get("sort") if entry else None
    return isinstance(value, dict) and value.get("v") == SORT_VERSION


# --- sorting ----------------------------------------------------------------------------------
@dataclass
class Item:
    """One message to sort or thread: its number in the answer (sequence number or UID),
    its sequence number (the tie-breaker), size, internal date and index sort fields."""

    n: int
    seq: int
    size: int
    internaldate: float
    f: dict

    def date(self) -> float:
        d = self.f.get("d")
        return self.internaldate if d is None else d


_KEYS = {
    "ARRIVAL": lambda it: it.internaldate,
    "CC": lambda it: it.f.get("c", ""),
    "DATE": Item.date,
    "FROM": lambda it: it.f.get("f", ""),
    "SIZE": lambda it: it.size,
    "SUBJECT": lambda it: it.f.get("s", ""),
    "TO": lambda it: it.f.get("t", ""),
    "DISPLAYFROM": lambda it: it.f.get("df", ""),
    "DISPLAYTO": lambda it: it.f.get("dt", ""),
}


# Criteria answered from the envelope's first items (envelope_head) and the message list.
LIGHT = frozenset({"ARRIVAL", "DATE", "SIZE", "SUBJECT"})


class Keys:
    """The sort keys of one mailbox's messages by UID, kept in memory for every session
    (Mailbox.derived()): a message never changes under its UID, so they are computed once.
    `full` holds the index's "sort" values; `subject` and `date` the SUBJECT key and sent
    date of every message in `full` and of others (from envelope_head).
    Mutated on the event loop only."""

    def __init__(self) -> None:
        self.full: dict[int, dict] = {}
        self.subject: dict[int, str] = {}
        self.date: dict[int, int | None] = {}
        self.thread: dict[int, dict] = {}  # THREAD's fields only (thread_fields_from_envelope)
        self.threads: dict = {}  # (algorithm, answer key) -> rendered THREAD data (thread.py)

    def keep(self, uids: set[int]) -> None:
        """Forget the messages not in `uids` (expunged: their UIDs never come back)."""
        for column in (self.full, self.subject, self.date, self.thread):
            for uid in [u for u in column if u not in uids]:
                del column[uid]

    def add_full(self, uid: int, f: dict) -> None:
        self.full[uid] = f
        self.subject[uid] = f.get("s", "")
        self.date[uid] = f.get("d")


def keys_of(derived: dict) -> Keys:
    """The mailbox's Keys in its Mailbox.derived() dict (made there when missing)."""
    keys = derived.get("sort")
    if not isinstance(keys, Keys):
        keys = derived["sort"] = Keys()
    return keys


def note_listed(derived: dict, entries: dict[int, dict]) -> None:
    """Keep the SUBJECT keys and sent dates of index entries a listing has just made (their
    "sl", fetch.header_entry) in the mailbox's Keys: a first SORT (SUBJECT / DATE) after a
    first listing then looks at no entry.  The same values _sort_keys would take from
    those entries; a message never changes under its UID."""
    keys = keys_of(derived)
    subject, date = keys.subject, keys.date
    for uid, e in entries.items():
        light = e.get("sl")
        if light_valid(light) and uid not in subject:
            subject[uid], date[uid] = light[1], light[2]



_FULL_FIELD = {"CC": "c", "FROM": "f", "TO": "t", "DISPLAYFROM": "df", "DISPLAYTO": "dt"}


def order_uids(uids: list[int], criteria: list[tuple[str, bool]], keys: Keys,
               sizes: dict[int, int], dates: dict[int, float]) -> list[int]:
    """What order() gives, for UIDs in mailbox order, from precomputed key columns: each
    stable sort's key is a dict lookup in C, no Python call per comparison or message.
    Every UID must be in `keys` (full for criteria outside LIGHT)."""
    out = list(uids)
    for key, reverse in reversed(criteria):
        if key == "SUBJECT":
            column = keys.subject
        elif key == "SIZE":
            column = sizes
        elif key == "ARRIVAL":
            column = dates
        elif key == "DATE":
            sent = keys.date
            column = {u: dates[u] if sent[u] is None else sent[u] for u in out}
        else:
            field, full = _FULL_FIELD[key], keys.full
            column = {u: full[u].get(field, "") for u in out}
        out.sort(key=column.__getitem__, reverse=reverse)
    return out


def order(items: list[Item], criteria: list[tuple[str, bool]]) -> list[Item]:
    """Sort by the criteria ((key, reverse) in priority order); messages that compare equal
    stay in mailbox order (RFC 5256 section 3), also under REVERSE."""
    out = sorted(items, key=lambda it: it.seq)
    for key, reverse in reversed(criteria):  # stable sorts, least significant key first
        out.sort(key=_KEYS[key], reverse=reverse)
    return out
