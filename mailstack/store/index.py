"""The per-mailbox metadata index (what dovecot.index.cache is to Dovecot).

One file per mailbox, `mailstack-cache`:

    V<uidvalidity>\n                     the UIDVALIDITY the UID lines belong to
    <uid> <json>\n                       the entry of the message with that UID
    =<base> <json>\n                     the entry of the message file with that base name,
                                         written at delivery, before the UID is known

An entry is a JSON object: the rendered ENVELOPE and BODYSTRUCTURE, the header size, the
Date: day for SENT*, the decoded header fields that SEARCH uses ("hs"), the POP3 size...
(imap/fetch.py and pop3/sizes.py own the keys).  The store does not interpret them.
CONDSTORE's modification sequences are not here but in a log of their own (modseq.py says
why: they are state, not derived data).

Why it is never wrong:

* A Maildir file's content never changes under its base name (names are unique, and a
  flag change renames only the part after ":2,"), so an entry keyed by base is right for
  as long as a file has that base, wherever the UID list puts it.
* UID lines belong to one UIDVALIDITY (the header): a lost uidlist means new UIDs and a
  new UIDVALIDITY, and the whole file is ignored (rebuilt as messages are looked at).
  UIDs are never reused under one UIDVALIDITY, so a line of an expunged message is just
  never asked for again (and dropped at the next compaction).
* A line cut short by a crash (kill -9, power loss) is not valid JSON and is skipped;
  every append starts on a fresh line, so a torn line can never glue onto the next one.
* Messages added behind the server's back (mv into new/ or cur/) have no entry: they are
  computed from the file when first needed and appended; removed ones simply vanish
  from the listing.

Everything here that touches the disk is blocking and runs in worker threads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..fsutil import atomic_write

NAME = "mailstack-cache"
COMPACT_SLACK = 1000  # dead lines tolerated beyond twice the live ones before a rewrite


# What json.dumps(value, separators=(",", ":"), ensure_ascii=False, check_circular=False)
# gives, without building a JSONEncoder and its C encoder again for every line (that was
# two thirds of the cost of a line: a cold listing writes 10,000 of them)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode = None if _c_encoder is None else _c_encoder(
    None, json.JSONEncoder(check_circular=False).default, json.encoder.c_encode_basestring,
    None, ":", ",", False, False, True)


def _dumps(value: dict) -> bytes:
    keys = iter(value)
    if "env" in value and "v" in value and (next(keys, None) != "v" or next(keys, None) != "env"):
        # "v" and "env" lead the line: imap/fetch.py's cached_envelope reads the ENVELOPE from
        # there without parsing the rest
        value = {"v": value["v"], "env": value["env"], **value}
    if _encode is None:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "".join(_encode(value, 0)).encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def append_lines(path: Path, uidvalidity: int, lines: list[bytes]) -> None:
    """Blocking: append whole lines, creating the file (with its header) if missing.  Not
    fsynced: the index is derived data; a lost tail is recomputed, never misread."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        fresh = False
    except FileNotFoundError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fresh = True
        except FileExistsError:  # another writer made it meanwhile
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            fresh = False
    try:
        data = b"".join(lines)
        if fresh:
            data = b"V%d\n" % uidvalidity + data
        else:
            size = os.fstat(fd).st_size
            if size:
                rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    last = os.pread(rfd, 1, size - 1)
                finally:
                    os.close(rfd)
                if last != b"\n":  # a line torn by a crash: never glue onto it
                    data = b"\n" + data
        _write_all(fd, data)
    finally:
        os.close(fd)


def delivered_line(base: str, entry: dict) -> bytes:
    return b"=%s %s\n" % (base.encode("utf-8", "surrogateescape"), _dumps(entry))


class MetadataIndex:
    """The loaded index of one mailbox.  Mutated on the event loop only (the state's
    cache_lock serialises writers); load() runs in a thread and returns a fresh object.

    Entries are kept as the JSON bytes of their line until first asked for (`get` parses
    and keeps the dict; `get_raw` hands the bytes out unparsed): loading a 10,000-entry
    file is a split, not 10,000 JSON parses, and a FETCH that needs one field of each
    entry (imap/fetch.py's `cached_envelope`) takes it without building the dicts at all."""

    def __init__(self, path: Path, uidvalidity: int) -> None:
        self.path = path
        self.uidvalidity = uidvalidity
        self.by_uid: dict[int, dict | bytes] = {}
        self.by_base: dict[str, dict | bytes] = {}  # delivered, UID not known when loaded
        self.lines = -1  # lines in the file; -1: missing or of another UIDVALIDITY
        # UIDs whose entry (a dict in by_uid) has no line in the file yet: a cold listing's,
        # kept in memory at once and written after the answer (put_later / take_unwritten).
        # Lost in a crash, they are only missing lines: made again when next needed.
        self.unwritten: set[int] = set()

    @classmethod
    def load(cls, path: Path, uidvalidity: int, uids: dict[str, int]) -> "MetadataIndex":
        """Blocking.  `uids` is the uidlist's base -> UID (to place delivery-time lines)."""
        idx = cls(path, uidvalidity)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return idx
        lines = data.split(b"\n")
        if lines[0] != b"V%d" % uidvalidity:
            return idx
        count = 0
        by_uid = idx.by_uid
        for line in lines[1:]:
            key, _, js = line.partition(b" ")
            if not js:
                continue
            count += 1
            # A line cut short by a crash does not end its object: skipped here, so an
            # earlier whole line of the same message stays.  Anything else that does not
            # parse is found by get() and recomputed.
            if not (js.startswith(b"{") and js.endswith(b"}")):
                continue
            if key.isdigit():
                by_uid[int(key)] = js
            elif key.startswith(b"="):
                base = key[1:].decode("utf-8", "surrogateescape")
                uid = uids.get(base)
                if uid is None:
                    idx.by_base[base] = js
                elif uid in by_uid:  # rare: merge with what is there
                    old, new = _parse(by_uid[uid]), _parse(js)
                    if new is not None:
                        by_uid[uid] = {**(old or {}), **new}
                else:
                    by_uid[uid] = js
        idx.lines = count
        return idx

    def get_raw(self, uid: int, base: str | None) -> dict | bytes | None:
        """The entry as held: a dict, or the JSON bytes of its line (not parsed: may be
        invalid, in which case the reader treats it as missing)."""
        value = self.by_uid.get(uid)
        if value is None and base is not None:
            value = self.by_base.pop(base, None)
            if value is not None:
                self.by_uid[uid] = value
        return value

    def get(self, uid: int, base: str | None) -> dict | None:
        value = self.get_raw(uid, base)
        if isinstance(value, bytes):
            value = _parse(value)
            if value is None:  # damaged: recomputed by the caller and put back
                del self.by_uid[uid]
            else:
                self.by_uid[uid] = value
        return value

    def note_delivered(self, base: str, entry: dict) -> None:
        """A line appended at delivery (by this process) is now in the file."""
        self.by_base[base] = entry
        if self.lines >= 0:
            self.lines += 1

    def put_later(self, entries: dict[int, dict]) -> None:
        """Keep `entries` (what a reload of their lines gives: index.Plain) in memory now;
        their lines are written by a later plan_put_raw of take_unwritten()."""
        self.by_uid.update(entries)
        self.unwritten.update(entries)

    def take_unwritten(self) -> dict[int, dict]:
        """The entries put_later kept that no write has covered since (and forget them)."""
        out = {uid: v for uid in self.unwritten if type(v := self.by_uid.get(uid)) is not bytes and v is not None}
        self.unwritten = set()
        return out

    def plan_put(self, entries: dict[int, dict], live=None) -> tuple[bool, bytes]:
        """Apply `entries` in memory; return (rewrite?, bytes to append or the whole file).
        `live` maps the UIDs of the messages that exist now to their base name (a str, or an
        object with `.base`); None: unknown, keep all.  Costs O(len(entries)) unless the
        file is compacted (then O(entries in the index))."""
        return self.plan_put_raw(serialize(entries), live)

    def plan_put_raw(self, raws: dict[int, bytes], live=None, values: dict[int, dict] | None = None
                     ) -> tuple[bool, bytes]:
        """plan_put with the entries already serialized (serialize(), in a worker thread).
        `values`: the entries whose dicts are what a reload gives (as_loaded()): kept as
        they are, so a SEARCH right after a first listing parses nothing."""
        values = values or {}
        if self.unwritten:
            self.unwritten.difference_update(raws)
        for uid, js in raws.items():
            # otherwise parsed again when asked: what a reload gives (tuples -> lists)
            self.by_uid[uid] = values.get(uid, js)
        added = len(raws)
        # Compact when dead lines (replaced entries, expunged messages) outnumber the live
        # ones by far.  len(live) bounds the live entries: no walk over the index per put.
        limit = 2 * len(live if live is not None else self.by_uid) + COMPACT_SLACK
        if self.lines >= 0 and self.lines + added <= limit:
            self.lines += added
            return False, b"".join(b"%d %s\n" % (uid, js) for uid, js in raws.items())
        return True, self._compacted(live, raws)

    def _compacted(self, live, made: dict[int, bytes] | None = None) -> bytes:
        """The whole file; `made`: lines of some entries made already (not encoded again:
        a cold listing's first batch compacts, on the loop)."""
        made = made or {}
        self.unwritten = set()  # every entry kept gets its line here
        if live is not None:
            bases = {uid: (b if isinstance(b, str) else b.base) for uid, b in live.items()}
            for uid, base in bases.items():  # delivered entries that now have their UID
                if uid not in self.by_uid and base in self.by_base:
                    self.by_uid[uid] = self.by_base.pop(base)
            self.by_uid = {u: v for u, v in self.by_uid.items() if u in bases}
            assigned = set(bases.values())  # keep delivered lines whose UID is not given yet
            self.by_base = {b: v for b, v in self.by_base.items() if b not in assigned}
        body = [b"V%d\n" % self.uidvalidity]
        body += [b"%d %s\n" % (uid, v if isinstance(v, bytes) else made.get(uid) or _dumps(v))
                 for uid, v in self.by_uid.items()]
        body += [b"=%s %s\n" % (b.encode("utf-8", "surrogateescape"), v if isinstance(v, bytes) else _dumps(v))
                 for b, v in self.by_base.items()]
        self.lines = len(body) - 1
        return b"".join(body)

    def write(self, rewrite: bool, data: bytes) -> None:
        """Blocking: carry out what plan_put decided."""
        if rewrite:
            atomic_write(self.path, data)
        elif data:
            append_lines(self.path, self.uidvalidity, [data])


def serialize(entries: dict[int, dict]) -> dict[int, bytes]:
    """UID -> the JSON of its line (pure; costly for big batches: run it off the loop)."""
    return {int(uid): _dumps(value) for uid, value in entries.items()}


class Plain(dict):
    """An entry its maker knows to be what a reload gives (str keys; dicts, lists, str,
    int, bool, None inside): as_loaded takes it without walking it."""

    __slots__ = ()


def as_loaded(entries: dict[int, dict]) -> dict[int, dict]:
    """The entries that a reload of their lines gives back equal (only dicts with str
    keys, lists, str, int, float, bool, None in them): safe to keep as the loaded value."""
    return {uid: v for uid, v in entries.items() if type(v) is Plain or _json_plain(v)}


def _json_plain(value, depth: int = 0) -> bool:
    t = type(value)
    if t is str or t is int or value is None or t is bool or t is float:
        return True
    if depth > 20:
        return False
    if t is dict:
        return all(type(k) is str and _json_plain(v, depth + 1) for k, v in value.items())
    if t is list:
        return all(_json_plain(v, depth + 1) for v in value)
    return False  # tuples, bytes, other types: parse the line when asked


def _parse(js: "bytes | dict") -> dict | None:
    if isinstance(js, dict):
        return js
    try:
        value = json.loads(js)
    except ValueError:  # torn by a crash, or damaged
        return None
    return value if isinstance(value, dict) else None


def message_entry(data: bytes) -> dict:
    """The full index entry of a message from its bytes (at delivery or APPEND time)."""
    from ..imap import fetch  # the store stays importable without the protocol packages
    from ..pop3 import sizes
    entry = fetch.cache_entry(data)
    entry[sizes.CACHE_KEY] = sizes.size_entry(data)
    return entry
