"""IMAP command parsing: framed commands in, `Command`s out, no I/O (the h11 way).

framer.py cuts the byte stream into commands (re-exported here);
`parse_command(parts)` turns one framed command into a `Command`, following the
  RFC 3501 grammar (plus IDLE, UIDPLUS, MOVE, NAMESPACE, ID, ENABLE, UNSELECT,
  LITERAL+, SASL-IR); any deviation raises `ParseError` carrying the tag, which the
  session answers with BAD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import parse_list, parse_search
from . import compress as compress_grammar
from . import parse_condstore
from .framer import CommandFramer, Continuation, Frame, FrameError  # noqa: F401 - the framing half
# The cursor, errors and sequence sets (parse_cursor.py) and the FETCH attributes (parse_fetch.py)
# live beside this module; every name that was here before stays importable from here.
from .parse_cursor import (  # noqa: F401 - re-exported
    _MONTHS, _SYSTEM_FLAGS, ASTRING_CHARS, ATOM_CHARS, ATOM_SPECIALS, LIST_CHARS, TAG_CHARS,
    MailboxNameError, ParseError, SearchResult, SequenceSet, _Cursor)
from .parse_fetch import (  # noqa: F401 - re-exported
    _FIELD_NAME, _MACROS, _SIMPLE_ATTS, FetchAtt, Section, _binary_att, _fetch_att, _fetch_atts, _section)


@dataclass
class Command:
    tag: str
    name: str  # upper case; "UID FETCH" etc. keep name="FETCH" with uid=True
    uid: bool = False
    args: dict[str, Any] = field(default_factory=dict)



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
