"""Keeping another server's UIDs: messages placed into a Maildir mailbox under UIDs the caller
chooses, with the mailbox's UIDVALIDITY and UIDNEXT set to the caller's values.

This is what lets clients that were syncing against Dovecot keep their caches when the DNS
name moves to mailstack (RFC 3501 2.3.1.1: same UIDVALIDITY, same UIDs, nothing re-fetched).
It is a separate, small capability beside the store (used by `mailstack import maildir`), not
a change to how maildir.py gives out UIDs: it writes the same files maildir.py reads
(mailstack-uidlist, mailstack-keywords, cur/ names made by filename.py) under the same
flock, so a running server picks the result up like any other change on disk.

Order per message, so a crash at any instant neither loses nor duplicates anything:
  1. the message is written to tmp/ and fsynced (by the caller, place_tmp below);
  2. its "<uid> :<base>" line is appended to the uidlist and fsynced;
  3. tmp/ -> cur/ rename, then cur/ is fsynced.
A crash after 2 leaves a UID line without a file: a rerun sees the UID as "listed but
missing" and places the message again under the same UID and base (store scans ignore lines
without files).  A crash before 2 leaves only a tmp/ file (cleaned after 36 h).

A mailbox is taken over only when it is empty, or already carries the same UIDVALIDITY (a
rerun).  Otherwise UIDs cannot be kept without renumbering someone else's messages, and
begin() says so (the importer then appends with fresh UIDs).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..fsutil import atomic_write, fsync_dir
from . import filename as fn
from . import flags as fl
from . import uidlist as ulmod
from .maildir import KEYWORDS, UIDVALIDITY, _flock, _list

POP3_UIDL = "mailstack-pop3-uidl"


class Takeover:
    """What begin() found: the UIDs already placed (resume) and the keyword table in use."""

    def __init__(self, uidvalidity: int, present: dict[int, str], keywords: list[str]) -> None:
        self.uidvalidity = uidvalidity
        self.present = present  # uid -> base: listed in the uidlist
        self.keywords = keywords


def _files(mailbox_dir: Path) -> set[str]:
    return set(_list(mailbox_dir))


def begin(mailbox_dir: Path, account_dir: Path, uidvalidity: int, nextuid: int,
          keywords: list[str]) -> Takeover | None:
    """Take over the (existing) mailbox at `mailbox_dir` for UIDVALIDITY `uidvalidity`.
    None when it holds messages under another UIDVALIDITY.  Blocking (call in a thread)."""
    with _flock(mailbox_dir):
        path = mailbox_dir / ulmod.NAME
        try:
            ul = ulmod.parse(path.read_bytes())
        except FileNotFoundError:
            ul = None
        if ul is not None and ul.uidvalidity == uidvalidity:
            table = _merge_keywords(mailbox_dir, keywords)
            if ul.nextuid < nextuid:
                ul.nextuid = nextuid
                atomic_write(path, ulmod.format_all(ul))
            return Takeover(uidvalidity, {u: b for b, u in ul.uids.items()}, table)
        if _files(mailbox_dir):
            return None
        fresh = ulmod.UidList(uidvalidity, max(1, nextuid))
        atomic_write(path, ulmod.format_all(fresh))
        _bump_uidvalidity_counter(account_dir, uidvalidity)
        table = _merge_keywords(mailbox_dir, keywords)
        fsync_dir(mailbox_dir)
        return Takeover(uidvalidity, {}, table)


def _merge_keywords(mailbox_dir: Path, words: list[str]) -> list[str]:
    """The mailbox's keyword table with `words` added where missing (positions of existing
    keywords never change).  Words past the 26 letters are left out (the caller drops them)."""
    path = mailbox_dir / KEYWORDS
    try:
        table = fl.parse_keywords_file(path.read_bytes())
    except FileNotFoundError:
        table = []
    known = {k.lower() for k in table}
    added = False
    for w in words:
        if w.lower() in known or len(table) >= len(fl.KEYWORD_LETTERS):
            continue
        try:
            fl.check_keyword(w)
        except Exception:
            continue
        table.append(w)
        known.add(w.lower())
        added = True
    if added:
        atomic_write(path, fl.format_keywords_file(table))
    return table


def _bump_uidvalidity_counter(account_dir: Path, value: int) -> None:
    """maildir.py gives new mailboxes max(now, last + 1): make `last` at least `value` so a
    mailbox created later never reuses an imported UIDVALIDITY."""
    import fcntl
    fd = os.open(account_dir / UIDVALIDITY, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 64, 0).strip()
        last = int(raw) if raw.isdigit() else 0
        if value > last:
            data = b"%d\n" % value
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name() -> str:
    return f"import.{os.getpid()}.{time.monotonic_ns()}"


def place(mailbox_dir: Path, batch: list[tuple[int, str, int, float, str]]) -> None:
    """Place messages already written and fsynced to tmp/: batch of (uid, tmp name, size,
    internal date, flag letters as the mailbox's keyword table spells them).  Blocking."""
    if not batch:
        return
    named = []
    for uid, tmp, size, date, letters in batch:
        base = fn.new_base(date, size)
        named.append((uid, tmp, base, date, "".join(sorted(set(letters)))))
    lines = b"".join(ulmod.format_line(uid, base) for uid, _, base, _, _ in named)
    with _flock(mailbox_dir):
        path = mailbox_dir / ulmod.NAME
        data = path.read_bytes()
        if data.endswith(b"\n"):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, lines)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:  # torn last line from a crash: rewrite whole
            ul = ulmod.parse(data)
            if ul is None:
                raise OSError(f"{path}: unreadable uidlist")
            for uid, _, base, _, _ in named:
                ul.uids[base] = uid
            atomic_write(path, ulmod.format_all(ul))
    for uid, tmp, base, date, letters in named:
        src = mailbox_dir / "tmp" / tmp
        os.utime(src, (date, date))
        os.rename(src, mailbox_dir / "cur" / fn.join(base, letters))
    fsync_dir(mailbox_dir / "cur")


# -- appending many messages at once ------------------------------------------------------------

_NEXT_CACHE: dict[str, tuple[tuple, int]] = {}  # uidlist path -> (stat signature, next UID)


def _sig(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def append_new(mailbox_dir: Path, batch: list[tuple[str, int, float, set[str]]]) -> tuple[int, list[int], list[str]]:
    """Give the next UIDs to messages already written and fsynced to tmp/ and move them into
    cur/: batch of (tmp name, size, internal date, flags).  Returns (UIDVALIDITY, UIDs in batch
    order, keywords that found no letter).  Blocking.

    What store.append does for one message, done for a batch under one flock, because
    store.append re-reads the whole uidlist for every message (33 ms per message at 20,000
    messages in the folder: hours for a 100,000-message INBOX).  Here the next UID is taken
    from the previous batch's answer when the uidlist has not changed since (stat signature),
    so the cost per message does not grow with the folder.  Same order as place(): uidlist
    lines (fsynced) before the renames, then cur/ fsynced."""
    if not batch:
        return 0, [], []
    words: list[str] = []
    for _, _, _, flags in batch:
        words += [f for f in flags if not f.startswith("\\") and f not in words]
    path = mailbox_dir / ulmod.NAME
    key = str(path)
    with _flock(mailbox_dir):
        table = _merge_keywords(mailbox_dir, words) if words else _read_keywords(mailbox_dir)
        index = {k.lower(): fl.KEYWORD_LETTERS[i] for i, k in enumerate(table)}
        try:
            sig = _sig(path)
        except FileNotFoundError:
            sig = None
        cached = _NEXT_CACHE.get(key)
        uidvalidity = 0
        if cached is not None and sig is not None and cached[0][0] == sig:
            nextuid, uidvalidity = cached[1], cached[0][1]
            clean = True
        else:
            data = path.read_bytes() if sig is not None else b""
            ul = ulmod.parse(data) if data else None
            if ul is None:  # lost or never made: a new UIDVALIDITY, as maildir.py would
                from .maildir import _new_uidvalidity
                ul = ulmod.UidList(_new_uidvalidity(mailbox_dir.parent if mailbox_dir.name.startswith(".")
                                                    else mailbox_dir), 1, clean_end=False)
            nextuid, uidvalidity, clean = ul.nextuid, ul.uidvalidity, ul.clean_end and bool(data)
        named = []
        dropped: list[str] = []
        for tmp, size, date, flags in batch:
            letters = "".join(fl.LETTER_OF[f] for f in flags if f in fl.LETTER_OF)
            for f in flags:
                if f.startswith("\\"):
                    continue
                if f.lower() in index:
                    letters += index[f.lower()]
                elif f not in dropped:
                    dropped.append(f)
            named.append((nextuid, tmp, fn.new_base(date, size), date, "".join(sorted(set(letters)))))
            nextuid += 1
        lines = b"".join(ulmod.format_line(uid, base) for uid, _, base, _, _ in named)
        if clean:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        else:  # first write, or a torn last line left by a crash: rewrite the whole list
            ul = ulmod.parse(path.read_bytes()) if sig is not None else None
            if ul is None or ul.uidvalidity != uidvalidity:
                ul = ulmod.UidList(uidvalidity, 1)
            for uid, _, base, _, _ in named:
                ul.uids[base] = uid
            ul.nextuid = max(ul.nextuid, nextuid)
            atomic_write(path, ulmod.format_all(ul))
        _NEXT_CACHE[key] = ((_sig(path), uidvalidity), nextuid)
    for uid, tmp, base, date, letters in named:
        src = mailbox_dir / "tmp" / tmp
        os.utime(src, (date, date))
        os.rename(src, mailbox_dir / "cur" / fn.join(base, letters))
    fsync_dir(mailbox_dir / "cur")
    return uidvalidity, [n[0] for n in named], dropped


def _read_keywords(mailbox_dir: Path) -> list[str]:
    try:
        return fl.parse_keywords_file((mailbox_dir / KEYWORDS).read_bytes())
    except FileNotFoundError:
        return []


def write_tmp(mailbox_dir: Path, data: bytes) -> str:
    """Write a message to tmp/ under a fresh name, fsynced; returns the name.  Blocking."""
    name = tmp_name()
    fd = os.open(mailbox_dir / "tmp" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return name


def forget_missing(mailbox_dir: Path, uids: set[int]) -> None:
    """Drop uidlist lines of `uids` (listed, file never placed) so they can be placed again."""
    if not uids:
        return
    with _flock(mailbox_dir):
        path = mailbox_dir / ulmod.NAME
        ul = ulmod.parse(path.read_bytes())
        if ul is None:
            return
        for base in [b for b, u in ul.uids.items() if u in uids]:
            del ul.uids[base]
            ul.extra.pop(base, None)
        atomic_write(path, ulmod.format_all(ul))


def present_files(mailbox_dir: Path) -> set[str]:
    return _files(mailbox_dir)


# -- POP3 UIDL continuity -------------------------------------------------------------------

def write_pop3_uidl(mailbox_dir: Path, fmt: str, explicit: dict[int, str]) -> None:
    """Record how the previous server spelled this mailbox's POP3 UIDLs: a format (Dovecot's
    pop3_uidl_format, e.g. "%08Xu%08Xv") and per-UID values it had saved (uidlist P fields)."""
    lines = [f"format {fmt}\n"] + [f"{uid} {v}\n" for uid, v in sorted(explicit.items())]
    atomic_write(mailbox_dir / POP3_UIDL, "".join(lines).encode("utf-8"))


def read_pop3_uidl(mailbox_dir: Path) -> tuple[str, dict[int, str]] | None:
    try:
        text = (mailbox_dir / POP3_UIDL).read_text("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    fmt = ""
    explicit: dict[int, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "format":
            fmt = value
        elif key.isdigit() and value:
            explicit[int(key)] = value
    return fmt, explicit
