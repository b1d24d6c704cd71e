"""SEARCH evaluation over one message at a time, with no I/O.

The session gives a `Candidate` per message; the key tree comes from parser._search_key.
`needs(key)` tells the session what to load first, so a search on flags or sizes reads
nothing from disk, one on Subject reads only the header, and only BODY/TEXT read bodies.
"""
from __future__ import annotations

import base64
import binascii
import email.errors
import email.header
import functools
import quopri
import time
from dataclasses import dataclass

from . import addresses, fetch


@dataclass
class Candidate:
    seq: int
    uid: int
    flags: set
    size: int
    internaldate: float
    recent: bool
    max_seq: int
    max_uid: int
    sent: int | None = None  # yyyymmdd of the Date: header (from the metadata cache)
    data: bytes | None = None  # the header (for HEADER keys) or whole message (BODY/TEXT)
    hs: dict | None = None  # the index's searchable header texts (header_index)
    modseq: int = 0  # RFC 7162
    _root: "fetch.Part | None" = None

    def root(self) -> "fetch.Part":
        if self._root is None:
            self._root = fetch.parse(self.data or b"")
        return self._root


# Header fields whose searchable texts the index keeps (SUBJECT/FROM/TO/CC/BCC and the
# HEADER names clients search most), so such searches read no message file.
INDEXED_HEADERS = ("subject", "from", "to", "cc", "bcc", "sender", "reply-to", "message-id",
                   "in-reply-to", "references", "list-id")


_INDEXED_NAMES = {n.encode("ascii"): n for n in INDEXED_HEADERS}


def header_index(root: "fetch.Part") -> dict:
    """name -> the case-folded texts a HEADER search of that field matches against (for
    the fields in INDEXED_HEADERS that the message has): what _header_matches computes."""
    out: dict[str, list[str]] = {}
    for k, v in root.headers:
        name = _INDEXED_NAMES.get(k)
        if name is None:
            continue
        # address fields repeat from message to message (a mailbox's own address is in
        # most To: fields, senders write often): their texts are remembered per raw value
        texts = _address_texts(v) if k in _ADDRESS_HEADERS else (_fold(_decode_words(fetch.unfold(v))),)
        have = out.get(name)
        if have is None:
            out[name] = list(texts)
        else:
            have.extend(texts)
    return out


def field_texts(value: bytes, address: bool) -> tuple[str, ...]:
    """The searchable texts of one raw header value: its decoded text and, for an address
    field, each address in its plain forms (_address_forms), all case-folded."""
    value = fetch.unfold(value)
    text = _fold(_decode_words(value))
    if not address:
        return (text,)
    # each text once: a search matches any of them, so a repeat adds nothing but index bytes
    # ("Bob <bob@x.test>" is its own only address form)
    return tuple(dict.fromkeys([text, *(_fold(form) for form in _address_forms(value))]))


@functools.lru_cache(maxsize=4096)
def _address_texts(value: bytes) -> tuple[str, ...]:
    return field_texts(value, True)


ORDER = ["none", "sent", "index", "header", "full"]


def needs(key: tuple) -> str:
    """"none", "sent" (cached Date), "index" (cached header texts), "header" or "full"."""
    op = key[0]
    if op in ("BODY", "TEXT"):
        return "full"
    if op == "HEADER":
        return "index" if key[1].lower() in INDEXED_HEADERS else "header"
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return "sent"
    order = ORDER
    subs: list = []
    if op == "AND":
        subs = key[1]
    elif op == "OR":
        subs = [key[1], key[2]]
    elif op == "NOT":
        subs = [key[1]]
    best = "none"
    for k in subs:
        n = needs(k)
        if order.index(n) > order.index(best):
            best = n
    return best


def uses_sequence_numbers(key: tuple) -> bool:
    op = key[0]
    if op == "SEQ":
        return True
    if op == "AND":
        return any(uses_sequence_numbers(k) for k in key[1])
    if op == "OR":
        return uses_sequence_numbers(key[1]) or uses_sequence_numbers(key[2])
    if op == "NOT":
        return uses_sequence_numbers(key[1])
    return False


def uses_modseq(key: tuple) -> bool:
    """The key has a MODSEQ criterion (RFC 7162: the SEARCH result then ends with (MODSEQ n))."""
    op = key[0]
    if op == "MODSEQ":
        return True
    subs = key[1] if op == "AND" else [key[1], key[2]] if op == "OR" else [key[1]] if op == "NOT" else []
    return any(uses_modseq(k) for k in subs)


def _ymd_local(ts: float) -> int:
    tm = time.localtime(ts)
    return tm.tm_year * 10000 + tm.tm_mon * 100 + tm.tm_mday


def _ymd(date: tuple[int, int, int]) -> int:
    return date[0] * 10000 + date[1] * 100 + date[2]


def _decode_words(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    return _decode_encoded(text)


@functools.lru_cache(maxsize=2048)
def _decode_encoded(text: str) -> str:
    """RFC 2047 words decoded, remembered: email.header is slow (a third of indexing a
    header), and mail repeats its senders' names (in the bench corpus 10,000 encoded values
    are 999 distinct ones)."""
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, binascii.Error, AssertionError,
            email.errors.HeaderParseError):  # "=?utf-8?b?bad=?utf-8?b?w6k=?=" raised this one
        return text


def _fold(s: str) -> str:
    return s.casefold()


def _header_matches(c: Candidate, name: str, needle: str) -> bool:
    needle = _fold(needle)
    if c.hs is not None and name.lower() in INDEXED_HEADERS:
        texts = c.hs.get(name.lower())
        return texts is not None and (not needle or any(needle in t for t in texts))
    root = c.root()
    lname = name.lower().encode("ascii", "replace")
    for k, v in root.headers:
        if k == lname:
            if not needle or any(needle in t for t in field_texts(v, lname in _ADDRESS_HEADERS)):
                return True
    return False


_ADDRESS_HEADERS = {b"from", b"to", b"cc", b"bcc", b"sender", b"reply-to"}


def _address_forms(value: bytes) -> list[str]:
    """What a FROM/TO/CC/BCC search matches besides the raw text: each address with its
    comments and folding white space taken out (RFC 5322 CFWS), as "name <local@domain>"."""
    out = []
    for a in addresses.parse_list_cached(value):
        spec = a.addr_spec()
        if a.name is not None:
            name = _decode_words(a.name)
            out.append(f"{name} <{spec}>" if spec else name)
        elif spec:
            out.append(spec)
    return out


def _decoded_body(data: bytes, part: "fetch.Part") -> str:
    return _decoded(*_payload(data, part))


def _decoded(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset, "replace")
    except LookupError:
        return raw.decode("utf-8", "replace")


def _payload(data: bytes, part: "fetch.Part") -> tuple[bytes, str]:
    """A text part's bytes, transfer encoding undone, and its charset."""
    raw = data[part.body_start:part.end]
    cte = fetch._cte(part)
    try:
        if cte == "base64":
            raw = base64.b64decode(b"".join(raw.split()), validate=False)
        elif cte == "quoted-printable":
            raw = quopri.decodestring(raw)
    except (binascii.Error, ValueError):
        pass
    return raw, dict((k.lower(), v) for k, v in part.params).get("charset", "utf-8")


def _walk_body(data: bytes, part: "fetch.Part", leaf):
    """The texts a BODY search looks at, in order: each text part as `leaf` gives it, and the
    decoded header fields of attached messages."""
    if part.children:
        for child in part.children:
            yield from _walk_body(data, child, leaf)
    elif part.message is not None:
        yield from (_decode_words(v) for _, v in part.message.headers)
        yield from _walk_body(data, part.message, leaf)
    elif part.type in ("text", "message"):
        yield leaf(data, part)


def _body_texts(data: bytes, part: "fetch.Part"):
    return _walk_body(data, part, _decoded_body)


# charsets whose text splits at the same places as its bytes: ASCII white space bytes are
# only ever those characters, and decoding (errors replaced) goes byte run by byte run
_SPLIT_AS_BYTES = {"utf-8": "utf-8", "utf8": "utf-8", "us-ascii": "ascii", "ascii": "ascii"}


def _body_piece(data: bytes, part: "fetch.Part"):
    raw, charset = _payload(data, part)
    codec = _SPLIT_AS_BYTES.get(charset.lower())
    return _decoded(raw, charset) if codec is None else (raw, codec)


def _body_pieces(data: bytes, part: "fetch.Part"):
    """_body_texts, but a UTF-8 or ASCII part as (its bytes, codec), not decoded: its
    distinct words are taken from the bytes (fewer, cheaper objects) and only they are
    decoded (store/fts.py)."""
    return _walk_body(data, part, _body_piece)


def _body_matches(c: Candidate, needle: str) -> bool:
    root = c.root()
    needle = _fold(needle)
    data = c.data or b""
    return any(needle in _fold(t) for t in _body_texts(data, root))


# --- full-text index (store/fts.py) ------------------------------------------------------
TEXT_SEP = "\uffff"  # store/fts.py's segment separator


def message_texts(data: bytes) -> tuple[str, str]:
    """What a TEXT / BODY scan compares, case-folded, as the full-text index stores it:
    (header names and decoded values, decoded body texts), segments joined by U+FFFF."""
    return scan_texts(data, True)


def scan_texts(data: bytes, with_head: bool) -> tuple[str, str]:
    """message_texts, the head text left empty unless `with_head` (a BODY search never looks
    at it): what a plain scan of the message compares (store/fts.py `scan`)."""
    root = fetch.parse(data)
    return _head_text(root) if with_head else "", _fold(TEXT_SEP.join(_body_texts(data, root)))


def head_and_body(data: bytes) -> tuple[str, str]:
    """message_texts with the body not case-folded yet."""
    root = fetch.parse(data)
    return _head_text(root), TEXT_SEP.join(_body_texts(data, root))


def head_and_pieces(data: bytes) -> tuple[str, list]:
    """The folded head text, and the body texts as _body_pieces gives them: what the
    full-text index needs when the body's distinct words are all it needs (store/fts.py)."""
    root = fetch.parse(data)
    return _head_text(root), list(_body_pieces(data, root))


def _head_text(root: "fetch.Part") -> str:
    # folded once, joined: casefold maps each character alone, so this is each segment folded;
    # a loop with _decode_words inline, not a nested generator (~3 of ~12 µs a message)
    segments: list[str] = []
    append = segments.append
    for k, v in root.headers:
        append(k.decode("ascii", "replace"))
        text = v.decode("utf-8", "replace")
        append(text if "=?" not in text else _decode_encoded(text))
    return _fold(TEXT_SEP.join(segments))


def fulltext_keys(key: tuple) -> list[tuple[str, str]]:
    """The BODY / TEXT keys of a search, as (op, case-folded string)."""
    op = key[0]
    if op in ("BODY", "TEXT"):
        return [(op, _fold(key[1]))]
    if op == "AND":
        return [k for sub in key[1] for k in fulltext_keys(sub)]
    if op == "OR":
        return fulltext_keys(key[1]) + fulltext_keys(key[2])
    if op == "NOT":
        return fulltext_keys(key[1])
    return []


def substitute(key: tuple, answers: dict[tuple[str, str], frozenset]) -> tuple:
    """The key with each answered BODY / TEXT replaced by the set of UIDs that match it."""
    op = key[0]
    if op in ("BODY", "TEXT"):
        uids = answers.get((op, _fold(key[1])))
        return key if uids is None else ("INSET", uids)
    if op == "AND":
        return ("AND", [substitute(k, answers) for k in key[1]])
    if op == "OR":
        return ("OR", substitute(key[1], answers), substitute(key[2], answers))
    if op == "NOT":
        return ("NOT", substitute(key[1], answers))
    return key


def compile_indexed(key: tuple):
    """For a key made only of indexed HEADER fields, flags, UID sets of "$" and ALL, joined by
    AND / OR / NOT (what a mail client's quick search sends): a function (MessageInfo,
    header texts of the index) -> bool giving what matches() gives, without a Candidate
    per message.  None for any other key."""
    op = key[0]
    if op == "ALL":
        return lambda m, hs: True
    if op == "INSET":
        uids = key[1]
        return lambda m, hs: m.uid in uids
    if op == "HEADER":
        name = key[1].lower()
        if name not in INDEXED_HEADERS:
            return None
        needle = _fold(key[2])
        if not needle:
            return lambda m, hs: name in hs

        def header_has(m, hs) -> bool:  # a loop, not any() over a generator made per message
            for t in hs.get(name, ()):
                if needle in t:
                    return True
            return False
        return header_has
    if op == "FLAG":
        flag, want = key[1], key[2]
        if flag.startswith("\\"):
            return lambda m, hs: (flag in m.flags) == want
        lower = flag.lower()
        return lambda m, hs: any(f.lower() == lower for f in m.flags) == want
    if op == "NOT":
        inner = compile_indexed(key[1])
        return None if inner is None else (lambda m, hs: not inner(m, hs))
    if op in ("AND", "OR"):
        subs = [compile_indexed(k) for k in (key[1] if op == "AND" else key[1:3])]
        if any(f is None for f in subs):
            return None
        if op == "OR":
            a, b = subs
            return lambda m, hs: a(m, hs) or b(m, hs)
        if len(subs) == 1:
            return subs[0]
        return lambda m, hs: all(f(m, hs) for f in subs)
    return None


# --- the mailbox's header texts in memory ------------------------------------------------
JOIN = "\uffff"  # between a field's texts in a HeaderTexts column (no match runs across it)


class HeaderTexts:
    """The searchable header texts (the index entries' "hs", header_index) of one mailbox's
    messages by UID, kept in memory for all its sessions (in Mailbox.derived(), which is
    dropped when UIDVALIDITY changes): a message never changes under its UID, so a header
    SEARCH needs no index entry looked up, checked and decoded per message.  The first
    listing hands them over (note_listed), as it does sort keys.  `columns` holds, for the
    field names searched so far, each message's texts of that field joined by JOIN (""
    when it has none), so a lone SUBJECT / FROM / ... search is one `in` per message.
    Expunged messages are only left out of the view (UIDs never come back); forget()
    trims them when they pile up.  Mutated on the event loop only."""

    def __init__(self) -> None:
        self.hs: dict[int, dict] = {}
        # SUBJECT's column is made as texts come (by the listing, ~0.3 µs a message): the
        # search clients send most, and made at its first search it would cost that search
        # more than the rest of it
        self.columns: dict[str, dict[int, str]] = {"subject": {}}

    def note(self, entries: dict) -> None:
        """Keep the texts of these index entries (UID -> entry) that hold them."""
        hs, version, join = self.hs, fetch.CACHE_VERSION, JOIN.join
        columns = list(self.columns.items())
        for uid, e in entries.items():
            if type(e) is not bytes and e.get("v") == version:
                texts = e.get("hs")
                if type(texts) is dict:
                    hs[uid] = texts
                    for name, col in columns:
                        col[uid] = join(texts.get(name, ()))

    def column(self, name: str) -> dict[int, str]:
        """UID -> the joined texts of field `name`, for every message in `hs`."""
        col = self.columns.get(name)
        if col is None:
            col = self.columns[name] = {}
        if len(col) != len(self.hs):  # its keys are a subset of hs's: the new ones are missing
            join = JOIN.join
            for uid, texts in self.hs.items():
                if uid not in col:
                    col[uid] = join(texts.get(name, ()))
        return col

    def forget(self, uids: set[int]) -> None:
        """Keep only the messages in `uids`."""
        self.hs = {u: t for u, t in self.hs.items() if u in uids}
        self.columns = {n: {u: t for u, t in c.items() if u in uids} for n, c in self.columns.items()}


def header_texts(derived: dict) -> HeaderTexts:
    """The mailbox's HeaderTexts in its Mailbox.derived() dict (made there when missing)."""
    memo = derived.get("hs")
    if not isinstance(memo, HeaderTexts):
        memo = derived["hs"] = HeaderTexts()
    return memo


def note_listed(derived: dict, entries: dict[int, dict]) -> None:
    """Keep the header texts of index entries a listing has just made."""
    header_texts(derived).note(entries)


def lone_header(key: tuple) -> tuple[str, str] | None:
    """(field name, case-folded needle) when the key is one HEADER test of an indexed field
    with a needle that a HeaderTexts column answers exactly (not empty: that asks whether
    the field is there at all; no JOIN in it: it could match across two texts)."""
    if key[0] != "HEADER":
        return None
    name, needle = key[1].lower(), _fold(key[2])
    if name not in INDEXED_HEADERS or not needle or JOIN in needle:
        return None
    return name, needle


def matches(key: tuple, c: Candidate) -> bool:
    op = key[0]
    if op == "ALL":
        return True
    if op == "INSET":
        return c.uid in key[1]
    if op == "AND":
        return all(matches(k, c) for k in key[1])
    if op == "OR":
        return matches(key[1], c) or matches(key[2], c)
    if op == "NOT":
        return not matches(key[1], c)
    if op == "FLAG":
        return (key[1] in c.flags) == key[2] if key[1].startswith("\\") else \
            (any(f.lower() == key[1].lower() for f in c.flags) == key[2])
    if op == "SEQ":
        return key[1].contains(c.seq, c.max_seq)
    if op == "UID":
        return key[1].contains(c.uid, c.max_uid)
    if op == "NEW":
        return c.recent and "\\Seen" not in c.flags
    if op == "OLD":
        return not c.recent
    if op == "RECENT":
        return c.recent
    if op == "MODSEQ":  # RFC 7162 3.1.5
        return c.modseq >= key[1]
    if op == "LARGER":
        return c.size > key[1]
    if op == "SMALLER":
        return c.size < key[1]
    if op in ("BEFORE", "ON", "SINCE"):
        d, want = _ymd_local(c.internaldate), _ymd(key[1])
        return d < want if op == "BEFORE" else d == want if op == "ON" else d >= want
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        d = c.sent if c.sent is not None else _ymd_local(c.internaldate)
        want = _ymd(key[1])
        return d < want if op == "SENTBEFORE" else d == want if op == "SENTON" else d >= want
    if op == "HEADER":
        return _header_matches(c, key[1], key[2])
    if op == "BODY":
        return _body_matches(c, key[1])
    if op == "TEXT":
        needle = _fold(key[1])
        return any(needle in _fold(_decode_words(v)) or needle in k.decode("ascii", "replace").lower()
                   for k, v in c.root().headers) or _body_matches(c, key[1])
    raise ValueError(f"unknown search key {op}")
