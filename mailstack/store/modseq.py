"""Modification sequences of one mailbox (RFC 7162 CONDSTORE/QRESYNC).

Every message has a mod-sequence (its "modseq"), raised whenever its flags change; the
mailbox's HIGHESTMODSEQ is the highest one ever given out, expunges included, and only ever
grows for one UIDVALIDITY.  One file per mailbox, `mailstack-modseq`, an append-only log:

    V<uidvalidity> H<highest>\n     header: the UIDVALIDITY; no modseq at or below H is
                                    ever given out again
    F<modseq>\n                     expunges at or below this modseq are forgotten
    <uid> <modseq> <letters>\n      the message got this modseq; its flag letters then
    -<uid> <modseq>\n               the message was expunged at this modseq

Why a file of its own and not an "ms" key in the metadata index (index.py): that index is
derived data (entries are made lazily, when a message is first looked at; a lost tail is
recomputed; compaction drops the lines of expunged messages; it is released from memory
when no session holds the mailbox).  Modseqs are the opposite: state that cannot be
recomputed, needed for every message at once (HIGHESTMODSEQ, CHANGEDSINCE over 1:*), and
expunged UIDs must be remembered, which the index forgets on purpose.  A modseq line is
~20 bytes where an index entry is ~1 KiB of JSON: the log is cheap to read, append, compact.

How it stays right:

* Changes are found by comparing the flag letters of each message on disk with the letters
  recorded here (`observe`): new UIDs, flags changed by another program (a rename of the
  Maildir file), files removed behind the server's back.  Changes the server makes itself
  (STORE, EXPUNGE, MOVE) are recorded at once (`flags_changed`, `expunged`) before anyone
  is told of them.  All changes found at one time share one new modseq.
* Every writer appends under the mailbox's flock, after re-reading the file if another
  process (the importer, the CLI) wrote to it since: two processes never give out the same
  modseq.  An append is done (in the page cache) before the change is announced, so kill -9
  loses nothing announced; a change made on disk but not yet logged when the process died
  (a flag rename) is noticed at the next look and gets a modseq above every logged one.
* A line torn by a crash is skipped.  A log that is missing (deleted, or a mailbox from
  before CONDSTORE) restarts from the clock in milliseconds when the mailbox already has
  messages, so HIGHESTMODSEQ still does not go backwards for a client that saw the old one.
* Expunged UIDs are remembered for the last VANISHED_KEEP expunges of the mailbox (no age
  limit).  Asked about older ones, `vanished_since` answers None and the IMAP layer answers
  as RFC 7162 3.2.5.2 allows: every UID in the asked range that no longer exists.

Everything here that touches the disk is blocking and runs in worker threads, while the
caller holds the mailbox's asyncio lock (nothing else reads or changes the table then).
"""
from __future__ import annotations

import bisect
import fcntl
import logging
import os
import threading
import time
from array import array
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

log = logging.getLogger("mailstack.store")

NAME = "mailstack-modseq"
LOCK = "mailstack-lock"  # the mailbox's flock (maildir.py), shared with the UID list
VANISHED_KEEP = 20000  # expunged UIDs remembered per mailbox (16 bytes each in memory)
COMPACT_SLACK = 2000  # dead lines tolerated beyond the live ones before a rewrite
_MEANINGFUL = frozenset("DFRST" + "abcdefghijklmnopqrstuvwxyz")  # letters that are IMAP flags


def _replace(path: Path, data: bytes) -> None:
    """Blocking: replace the file at once (a reader sees the old or the new one).  Not
    fsynced: kill -9 keeps what was written; a log lost to a power cut restarts from the
    clock (never backwards), as a missing one does."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def meaningful(letters: str) -> str:
    """The flag letters that mean an IMAP flag, sorted (others, e.g. "P" passed, do not
    change the modseq; the result is safe to write on a line)."""
    return "".join(sorted(c for c in letters if c in _MEANINGFUL))


class ModseqLog:
    """The modseqs of one mailbox under one UIDVALIDITY (see the module text)."""

    def __init__(self, path: Path, uidvalidity: int) -> None:
        self.path = path
        self.uidvalidity = uidvalidity
        self.highest = 0
        self.ms: dict[int, int] = {}  # uid -> modseq
        self.letters: dict[int, str] = {}  # uid -> letters last seen (raw or meaningful)
        self.gone_ms = array("Q")  # expunges in modseq order: their modseqs ...
        self.gone_uid = array("Q")  # ... and UIDs
        self.floor = 0  # expunges at or below this modseq are not remembered
        self.lines = -1  # lines in the file; -1: the file must be written whole
        self.sig: tuple | None = None  # (inode, size) after our last read or write
        self.pending: list[bytes] = []
        self.clean_end = True

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: Path, uidvalidity: int) -> "ModseqLog":
        """Blocking.  A missing file or one of another UIDVALIDITY gives an empty log
        (highest 0: the first observe() seeds it)."""
        out = cls(path, uidvalidity)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return out
        out._parse(data)
        if out.lines >= 0:
            out.sig = (st.st_ino, len(data))
        return out

    def _parse(self, data: bytes) -> None:
        lines = data.split(b"\n")
        head = lines[0].split()
        if len(head) != 2 or head[0] != b"V%d" % self.uidvalidity or not head[1].startswith(b"H"):
            return
        try:
            highest = int(head[1][1:])
        except ValueError:
            return
        ms, letters = self.ms, self.letters
        gone: list[tuple[int, int]] = []
        count = 0
        self.clean_end = data.endswith(b"\n")  # else: torn by a crash, never append to it
        if not self.clean_end:
            lines.pop()  # what a crash cut short: it could still parse, wrongly
        for line in lines[1:]:
            if not line:
                continue
            count += 1
            try:
                first = line[0]
                if first == 0x2D:  # "-<uid> <modseq>"
                    a, b = line[1:].split(b" ")
                    uid, m = int(a), int(b)
                    ms.pop(uid, None)
                    letters.pop(uid, None)
                    gone.append((m, uid))
                elif first == 0x46:  # "F<modseq>"
                    self.floor = max(self.floor, int(line[1:]))
                else:  # "<uid> <modseq> <letters>"
                    a, b, c = line.split(b" ")
                    uid = int(a)
                    ms[uid] = int(b)
                    letters[uid] = c.decode("ascii")
            except ValueError:  # torn by a crash (UnicodeDecodeError is one too)
                continue
        highest = max(highest, self.floor, max(ms.values(), default=0), max((m for m, _ in gone), default=0))
        gone.sort()
        self.gone_ms = array("Q", (m for m, _ in gone))
        self.gone_uid = array("Q", (u for _, u in gone))
        self.highest = highest
        self.lines = count

    def _catch_up(self) -> None:
        """Under the flock: if another process wrote since our last look, read it again."""
        try:
            st = os.stat(self.path)
            sig = (st.st_ino, st.st_size)
        except FileNotFoundError:
            sig = None
        if sig == self.sig:
            return
        fresh = ModseqLog.load(self.path, self.uidvalidity)
        if fresh.lines < 0:  # lost: keep what we know, write it whole (never backwards)
            self.lines = -1
            self.sig = None
            return
        keep_highest = max(self.highest, fresh.highest)
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "pending"})
        self.highest = keep_highest

    # ------------------------------------------------------------------ questions

    def vanished_since(self, modseq: int) -> list[int] | None:
        """UIDs expunged with a modseq above `modseq`, sorted; None when expunges that far
        back are no longer remembered."""
        if modseq < self.floor:
            return None
        i = bisect.bisect_right(self.gone_ms, modseq)
        return sorted(self.gone_uid[i:])

    # ------------------------------------------------------------------ changes (blocking)

    def observe(self, entries: Mapping[int, object], has_history: bool) -> None:
        """Record what a scan found: `entries` is uid -> an object with `.letters` (every
        message of the mailbox now).  New UIDs, changed flags and vanished UIDs get one new
        modseq.  `has_history`: the mailbox had UIDs before (its UID list's next UID is above
        1), which matters only when the log is empty."""
        with self._locked():
            if self.lines < 0 and self.highest == 0:
                self._seed(has_history or bool(entries))
            letters = self.letters
            changed = [uid for uid, e in entries.items() if letters.get(uid) != e.letters]  # type: ignore[attr-defined]
            ms = self.ms
            added = sum(1 for uid in changed if uid not in ms)
            gone = [uid for uid in ms if uid not in entries] if len(ms) + added > len(entries) else []
            if not changed and not gone:
                return self._save()
            new = self.highest + 1
            out = self.pending
            bumped = False
            whole = self.lines < 0  # written whole below: no lines one by one
            for uid in changed:
                raw = entries[uid].letters  # type: ignore[attr-defined]
                old = letters.get(uid)
                letters[uid] = raw
                if old is not None and meaningful(old) == meaningful(raw):
                    continue  # a letter of no meaning to IMAP changed: same modseq
                ms[uid] = new
                if not whole:
                    out.append(b"%d %d %s\n" % (uid, new, meaningful(raw).encode()))
                bumped = True
            if gone:
                self._forget(gone, new)
                bumped = True
            if bumped:
                self.highest = new
            self._save()

    def flags_changed(self, changes: Mapping[int, str]) -> int:
        """This server changed the flags of these messages (uid -> new letters): one new
        modseq for them all, returned."""
        with self._locked():
            new = self.highest + 1
            for uid, raw in changes.items():
                self.ms[uid] = new
                self.letters[uid] = raw
                self.pending.append(b"%d %d %s\n" % (uid, new, meaningful(raw).encode()))
            if changes:
                self.highest = new
            self._save()
            return new

    def expunged(self, uids: Iterable[int]) -> None:
        """This server expunged (or moved away) these messages."""
        uids = [u for u in uids if u in self.ms]
        if not uids:
            return
        with self._locked():
            uids = [u for u in uids if u in self.ms]
            if uids:
                new = self.highest + 1
                self._forget(uids, new)
                self.highest = new
            self._save()

    # ------------------------------------------------------------------ internals

    def _seed(self, has_messages: bool) -> None:
        """An empty log: 1 for a new mailbox; for one that has (had) messages, the clock in
        milliseconds, above any HIGHESTMODSEQ a lost log can have announced."""
        self.highest = max(1, int(time.time() * 1000)) if has_messages else 1
        self.floor = self.highest if has_messages else 0

    def _forget(self, uids: list[int], modseq: int) -> None:
        for uid in sorted(uids):
            self.ms.pop(uid, None)
            self.letters.pop(uid, None)
            self.gone_ms.append(modseq)
            self.gone_uid.append(uid)
            self.pending.append(b"-%d %d\n" % (uid, modseq))
        extra = len(self.gone_ms) - VANISHED_KEEP
        if extra > 0:
            self.floor = max(self.floor, self.gone_ms[extra - 1])
            del self.gone_ms[:extra]
            del self.gone_uid[:extra]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The mailbox's flock (shared with the UID list, and with other processes), and the
        log as other processes left it."""
        fd = os.open(self.path.parent / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._catch_up()
            yield
        finally:
            os.close(fd)  # releases the lock

    def _save(self) -> None:
        """Under the flock: append what is pending, or write the whole log when it is new,
        lost, or mostly dead lines.  On an error (a full disk) the lines stay pending and
        go with the next write."""
        live = len(self.ms) + len(self.gone_ms)
        if self.lines < 0 or not self.clean_end or self.lines + len(self.pending) > 2 * live + COMPACT_SLACK:
            self._rewrite()
            return
        if not self.pending:
            return
        data = b"".join(self.pending)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as e:  # a full disk: kept pending; the next write is a whole rewrite
            log.warning("modseq log %s not written: %s", self.path, e)
            self.lines = -1
            return
        self.lines += len(self.pending)
        self.pending.clear()
        self.sig = (st.st_ino, st.st_size)

    def _rewrite(self) -> None:
        body = [b"V%d H%d\n" % (self.uidvalidity, self.highest), b"F%d\n" % self.floor]
        body += [b"-%d %d\n" % (u, m) for m, u in zip(self.gone_ms, self.gone_uid)]
        letters = self.letters
        body += [b"%d %d %s\n" % (u, m, meaningful(letters.get(u, "")).encode()) for u, m in self.ms.items()]
        data = b"".join(body)
        try:
            _replace(self.path, data)
        except OSError as e:  # a full disk: still pending (kept in memory), tried again later
            log.warning("modseq log %s not written: %s", self.path, e)
            self.lines = -1
            return
        st = os.stat(self.path)
        self.sig = (st.st_ino, st.st_size)
        self.lines = len(body) - 1
        self.clean_end = True
        self.pending.clear()
