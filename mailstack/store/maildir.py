"""The Maildir++ backend of the store.

On disk (see names.py for the directory of a mailbox):

    <root>/<domain>/<local>/            INBOX (cur/ new/ tmp/) and the account's files:
        subscriptions                   subscribed names, one per line (UTF-8)
        mailstack-uidvalidity           last UIDVALIDITY given out (so values never repeat)
        .Sent/ .Archive.2024/ ...       the other mailboxes (each with cur/ new/ tmp/,
                                        a "maildirfolder" file and, when special-use,
                                        "mailstack-special-use")
    in every mailbox directory:
        mailstack-uidlist               base name -> UID (uidlist.py)
        mailstack-keywords              keyword letters a..z (flags.py)
        mailstack-cache                 the metadata index: one JSON line per message (index.py)
        mailstack-modseq                RFC 7162 modseqs and recent expunges (modseq.py)
        mailstack-lock                  flock()ed around uidlist/keyword rewrites, so the
                                        CLI or another process can share the mailbox

How it stays consistent and fast:

* One `_State` per opened mailbox per process, shared by every session on it, holds what
  the last scan of new/ + cur/ found (uid -> Entry).  Scans run in a worker thread under
  the state's asyncio.Lock; a scan is skipped when the mtimes of new/, cur/ and the uidlist
  are unchanged and older than SETTLE seconds at the previous scan (coarse timestamps could
  otherwise hide a change made in the same tick).
* A session (`MaildirMailbox`) has its own `messages` view, changed only by refresh() or by
  its own operations: that is what keeps IMAP sequence numbers stable between responses.
* Sizes and internal dates come from file names (filename.py) or from the uidlist line,
  so listing 10,000 messages reads two directories and one file and stat()s nothing.
* Files move under our feet (another session or program renames for flags, expunges,
  moves between new/ and cur/); every operation that misses a file lists the folder again
  and retries by base name instead of failing.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator, NamedTuple

from ..events import EventBus, MailboxEvent
from ..fsutil import GroupSync, atomic_write, fsync_dir
from . import filename as fn
from . import flags as fl
from . import names
from . import fts
from . import index as idxmod
from . import modseq as msmod
from .groupwrite import GroupWriter, recover_tmp
from . import recent as recentmod
from . import uidlist as ulmod
from .diskerrors import FULL, disk_errors
from .base import (SPECIAL_MAILBOXES, Changes, FlagsStored, Mailbox, MailboxExists, MailboxInfo,
                   MailboxNotFound, MessageGone, MessageInfo, MessageSource, Store, StoreError)
from .index import MetadataIndex
from .uidlist import UidList

log = logging.getLogger("mailstack.store")

KEYWORDS = "mailstack-keywords"
LOCK = "mailstack-lock"
SPECIAL_USE = "mailstack-special-use"
SUBSCRIPTIONS = "subscriptions"
UIDVALIDITY = "mailstack-uidvalidity"
MAILDIRFOLDER = "maildirfolder"
TRASH_PREFIX = "mailstack-deleted."
STALE_TMP = 36 * 3600  # the Maildir spec's age after which a tmp/ file is abandoned
SETTLE = 2.0  # seconds, for filesystems with whole-second timestamps
FINE_SETTLE = 0.05  # seconds, when timestamps have a sub-second part
MAX_IDLE_STATES = 256  # loaded mailboxes kept without any session, for delivery and STATUS
SPECIAL_USE_ATTRS = {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
_COPY_CHUNK = 1 << 20
INDEX_AT_DELIVERY_MAX = 16 << 20  # bigger messages are indexed when first looked at


class Entry(NamedTuple):
    """One message file as last seen on disk."""

    uid: int
    base: str
    sub: str  # "new" or "cur"
    name: str  # file name inside sub
    size: int
    date: float
    letters: str


# ---------------------------------------------------------------- blocking helpers (threads)

def _mkdir(path: Path) -> bool:
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        return False


def _touch(path: Path, data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def _make_subdirs(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        _mkdir(path / sub)


@contextmanager
def _flock(mailbox_dir: Path) -> Iterator[None]:
    fd = os.open(mailbox_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _new_uidvalidity(account_dir: Path) -> int:
    """A UIDVALIDITY never given out before in this account: the time, or one more than the
    last value when mailboxes are (re)created faster than once a second."""
    fd = os.open(account_dir / UIDVALIDITY, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 64, 0).strip()
        last = int(raw) if raw.isdigit() else 0
        value = max(int(time.time()), last + 1)
        data = b"%d\n" % value
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return value
    finally:
        os.close(fd)


def _create_folder(account_dir: Path, path: Path, special_use: str | None) -> None:
    """Make one mailbox directory; FileExistsError when it is there already.  On any other
    error (a full disk) nothing of it is left: a later CREATE must not find half a folder."""
    os.mkdir(path, 0o700)
    try:
        _make_subdirs(path)
        _touch(path / MAILDIRFOLDER)
        if special_use:
            _touch(path / SPECIAL_USE, special_use.encode() + b"\n")
        atomic_write(path / ulmod.NAME, ulmod.format_header(_new_uidvalidity(account_dir), 1))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _list(path: Path) -> dict[str, tuple[str, str, str]]:
    """base -> (sub, name, letters) of every message file; new/ is read first so a file
    moving new/ -> cur/ during the listing is seen in cur/ rather than missed."""
    found: dict[str, tuple[str, str, str]] = {}
    usable = fn.usable
    for sub in ("new", "cur"):
        for name in os.listdir(path / sub):
            if usable(name):
                base, sep, info = name.partition(":")  # fn.split, inlined: 10,000s of names
                found[base] = (sub, name, info[2:] if sep and info.startswith("2,") else "")
    return found


def _stat_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_subscriptions(account_dir: Path) -> list[str]:
    try:
        data = (account_dir / SUBSCRIPTIONS).read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data.decode("utf-8", "replace").splitlines() if line]


def _write_subscriptions(account_dir: Path, subs: list[str]) -> None:
    atomic_write(account_dir / SUBSCRIPTIONS, "".join(s + "\n" for s in subs).encode("utf-8"))


def _copy_from_source(src: MessageSource, fd: int) -> None:
    """Spool file range -> fd inside the kernel when possible (no copy through Python)."""
    sfd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset, remaining = src.offset, src.size
        fast = True
        while remaining > 0:
            n = 0
            if fast:
                try:
                    n = os.copy_file_range(sfd, fd, remaining, offset)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    fast = False
                    continue
            else:
                data = os.pread(sfd, min(remaining, _COPY_CHUNK), offset)
                n = os.write(fd, data) if data else 0
            if n <= 0:
                raise StoreError("message source is shorter than announced")
            offset += n
            remaining -= n
    finally:
        os.close(sfd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_message(mailbox_dir: Path, base: str, sub: str, name: str,
                   message: "bytes | MessageSource", mtime: float | None) -> None:
    """tmp/<base> -> fsync -> rename to <sub>/<name>: a reader never sees a partial message."""
    tmp = mailbox_dir / "tmp" / base
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            if isinstance(message, MessageSource):
                _copy_from_source(message, fd)
            else:
                _write_all(fd, message)
            os.fsync(fd)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.rename(tmp, mailbox_dir / sub / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_and_index(mailbox_dir: Path, base: str, sub: str, name: str,
                     message: "bytes | MessageSource", mtime: float | None, uidvalidity: int) -> dict | None:
    """_write_message, then the message's index entry from the bytes in hand, appended to
    the mailbox's index under its base name (index.py).  Indexing never fails a delivery:
    without an entry the message is indexed when first looked at."""
    _write_message(mailbox_dir, base, sub, name, message, mtime)
    size = message.size if isinstance(message, MessageSource) else len(message)
    if size > INDEX_AT_DELIVERY_MAX:
        return None
    try:
        if isinstance(message, MessageSource):
            message = _read_file(Path(message.path), message.offset, message.size)
        entry = idxmod.message_entry(message)
        idxmod.append_lines(mailbox_dir / idxmod.NAME, uidvalidity, [idxmod.delivered_line(base, entry)])
    except Exception:  # noqa: BLE001 - a full disk or a parser bug must not lose the message
        log.warning("could not index %s at delivery", base, exc_info=True)
        return None
    try:  # added to the full-text index by the caller, several deliveries in one transaction
        entry["fts"] = fts.texts_of(message)  # not stored in the metadata index
    except Exception:  # noqa: BLE001 - derived data: added when first searched
        log.warning("could not extract the text of %s at delivery", base, exc_info=True)
    return entry


def _rename_back(account_dir: Path, pairs: list[tuple[str, str]]) -> None:
    for old, new in reversed(pairs):
        try:
            os.rename(account_dir / names.to_dirname(new), account_dir / names.to_dirname(old))  # type: ignore[operator]
        except OSError:
            log.warning("could not rename %s back to %s", new, old)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_file(path: Path, start: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb", buffering=0) as f:
        if start:
            f.seek(start)
        return f.read() if length is None else f.read(length)


# ---------------------------------------------------------------- per-mailbox shared state

class _SyncResult(NamedTuple):
    sig: tuple
    scanned_at: float
    ul: UidList
    entries: dict[int, Entry] | None  # None: unchanged
    keywords: list[str] | None
    kw_sig: tuple | None
    new_ids: set[str]


class _State:
    """What this process knows of one mailbox; shared by its sessions.  Mutated only on the
    event loop by the holder of `lock`; worker threads read it (while the lock is held) and
    return results instead of changing it."""

    def __init__(self, account: str, name: str, path: Path, account_dir: Path) -> None:
        self.account = account
        self.name = name
        self.path = path
        self.account_dir = account_dir
        self.lock = asyncio.Lock()
        self.loaded = False
        self.dirty = True
        self.sig: tuple | None = None
        self.scanned_at = 0.0
        self.ul = UidList(0, 1)
        self.entries: dict[int, Entry] = {}
        self.version = 0
        self.keywords: list[str] = []
        self.kw_sig: tuple | None = None
        self.delivery_ids: set[str] = set()
        self.refs = 0  # open sessions and deliveries in flight (not evicted while > 0)
        self.index: MetadataIndex | None = None  # loaded on first use (index.py)
        self.fulltext = fts.MailboxFulltext(path / fts.NAME, f"{account}/{name}")
        self.cache_lock = asyncio.Lock()
        self.recent_loaded = False  # the \Recent mark was read from disk (recent.py)
        self.recent_task: asyncio.Task | None = None  # writes the mark back
        self.modseq: msmod.ModseqLog | None = None  # loaded with the entries (modseq.py)

    # -- scanning --------------------------------------------------------------------------

    def _dir_sig(self) -> tuple:
        try:
            new = os.stat(self.path / "new").st_mtime_ns
            cur = os.stat(self.path / "cur").st_mtime_ns
        except FileNotFoundError:
            if self.path.is_dir():  # a mailbox someone half-made: complete it
                _make_subdirs(self.path)
                return self._dir_sig()
            raise MailboxNotFound(f"no mailbox {self.name}") from None
        return (new, cur, _stat_sig(self.path / ulmod.NAME))

    def _load_uidlist(self) -> tuple[UidList | None, tuple | None]:
        path = self.path / ulmod.NAME
        try:
            with open(path, "rb") as f:
                sig = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None, None
        return ulmod.parse(data), (sig.st_ino, sig.st_size, sig.st_mtime_ns)

    def _write_uidlist(self, ul: UidList, appended: list[bytes] | None) -> tuple | None:
        """Caller holds the flock.  Appends `appended` lines, or rewrites the whole list."""
        path = self.path / ulmod.NAME
        if appended is not None and ul.clean_end and path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                _write_all(fd, b"".join(appended))
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            atomic_write(path, ulmod.format_all(ul))
            ul.clean_end = True
        return _stat_sig(path)

    def _assign_locked(self, ul: UidList | None, items: list[tuple[str, int | None, float | None]]
                       ) -> tuple[UidList, tuple | None]:
        """Under the flock: give UIDs to bases that have none; items are (base, size, date)
        with size/date given only when the base does not carry them."""
        fresh, sig = self._load_uidlist()
        if fresh is None:
            if ul is not None and ul.uidvalidity and self.loaded:
                log.warning("uidlist of %s/%s lost: new UIDVALIDITY", self.account, self.name)
            fresh = UidList(_new_uidvalidity(self.account_dir), 1, clean_end=False)
        lines = []
        for base, size, date in items:
            if base in fresh.uids:
                continue
            uid = fresh.nextuid
            fresh.nextuid += 1
            fresh.uids[base] = uid
            if size is not None or date is not None:
                fresh.extra[base] = (size, date)
            lines.append(ulmod.format_line(uid, base, size, date))
        if lines or sig is None:
            sig = self._write_uidlist(fresh, lines)
        return fresh, sig

    def _clean_tmp(self) -> None:
        limit = time.time() - STALE_TMP
        tmp = self.path / "tmp"
        try:
            names_ = os.listdir(tmp)
        except FileNotFoundError:
            return
        for name in names_:
            try:
                if os.stat(tmp / name).st_mtime < limit:
                    os.unlink(tmp / name)
            except OSError:
                pass

    def _sync_blocking(self, force: bool) -> _SyncResult | None:
        sig = self._dir_sig()
        if not force and sig == self.sig:
            newest = max(sig[0], sig[1], sig[2][2] if sig[2] else 0)
            # A timestamp with a sub-second part comes from a filesystem with fine timestamps
            # (ext4, xfs, btrfs: a tick of a few ms); whole seconds may mean a coarse one.
            settle = SETTLE if newest % 1_000_000_000 == 0 else FINE_SETTLE
            if self.scanned_at - newest / 1e9 > settle:
                return None
        now = time.time()
        if not self.loaded:
            self._clean_tmp()
        found = _list(self.path)
        missing = [e.base for e in self.entries.values() if e.base not in found]
        if missing:  # a rename racing our readdir can hide a file: look once more
            again = _list(self.path)
            for base in missing:
                if base in again:
                    found[base] = again[base]

        ul, ul_sig = (self.ul, sig[2]) if (self.loaded and sig[2] == self.sig[2]) else self._load_uidlist()
        unknown = [b for b in found if ul is None or b not in ul.uids]
        if ul is None or unknown:
            items = []
            for base in unknown:
                sub, name, _ = found[base]
                size, date = fn.size_of(base), fn.own_time(base)
                if size is None or date is None:
                    try:
                        st = os.stat(self.path / sub / name)
                    except FileNotFoundError:
                        continue  # moved meanwhile: next scan
                    size_x = st.st_size if size is None else None
                    date_x = st.st_mtime if date is None else None
                    items.append((base, size_x, date_x))
                else:
                    items.append((base, None, None))
            items.sort(key=lambda it: fn.arrival_key(it[0], it[2]))
            try:
                with _flock(self.path):
                    ul, ul_sig = self._assign_locked(ul, items)
                sig = (sig[0], sig[1], ul_sig)
            except OSError as e:
                if e.errno not in FULL or ul is None:
                    raise
                # A full disk: files dropped in by others get their UIDs once there is room
                # (this signature never matches, so the next look scans again).
                log.warning("no room to give UIDs in %s/%s", self.account, self.name)
                sig = (sig[0], sig[1], ul_sig, "unassigned")

        # Entries: reuse the previous object whenever the file name is unchanged.
        prev = {e.name: e for e in self.entries.values()} if self.entries else {}
        new_ids: set[str] = set()
        entries: dict[int, Entry] = {}
        changed = False
        uids = ul.uids
        for base, (sub, name, letters) in found.items():
            uid = uids.get(base)
            if uid is None:
                continue
            old = prev.get(name)
            if old is not None and old.uid == uid and old.sub == sub:
                entries[uid] = old
                continue
            changed = True
            size, date, did = fn.parse_base(base)
            if did:
                new_ids.add(did)
            if size is None or date is None:
                xs, xd = ul.extra.get(base, (None, None))
                size = size if size is not None else xs
                date = date if date is not None else xd
                if size is None or date is None:
                    try:
                        st = os.stat(self.path / sub / name)
                    except FileNotFoundError:
                        continue
                    size = st.st_size if size is None else size
                    date = st.st_mtime if date is None else date
            entries[uid] = Entry(uid, base, sub, name, size, float(date), letters)
        changed = changed or len(entries) != len(self.entries)

        kw_sig = _stat_sig(self.path / KEYWORDS)
        keywords = None
        if kw_sig != self.kw_sig:
            keywords = fl.parse_keywords_file((self.path / KEYWORDS).read_bytes()) if kw_sig else []

        if not self.loaded:  # ids of messages whose files are gone still count as delivered
            for base in uids.keys() - found.keys():
                did = fn.delivery_id_of(base)
                if did:
                    new_ids.add(did)
        return _SyncResult(sig, now, ul, entries if changed or not self.loaded else None,
                           keywords, kw_sig, new_ids)

    async def sync(self, force: bool = False) -> None:
        """Bring the state up to date with the disk.  Caller holds `lock`."""
        res = await asyncio.to_thread(self._sync_blocking, force or self.dirty or not self.loaded)
        if res is None:
            return
        self.sig, self.scanned_at, self.ul = res.sig, res.scanned_at, res.ul
        if res.entries is not None:
            self.entries = res.entries
            self.version += 1
        if res.keywords is not None:
            self.keywords = res.keywords
        self.kw_sig = res.kw_sig
        self.delivery_ids |= res.new_ids
        self.loaded = True
        self.dirty = False
        if res.entries is not None or self.modseq is None or self.modseq.uidvalidity != self.ul.uidvalidity:
            await asyncio.to_thread(self._observe_modseq)

    def _observe_modseq(self) -> None:
        """Blocking, lock held: give modseqs to what this scan found new, changed or gone."""
        if self.modseq is None or self.modseq.uidvalidity != self.ul.uidvalidity:
            self.modseq = msmod.ModseqLog.load(self.path / msmod.NAME, self.ul.uidvalidity)
        self.modseq.observe(self.entries, self.ul.nextuid > 1)

    # -- UIDs for files we just put there -----------------------------------------------------

    async def assign(self, items: list[tuple[str, int | None, float | None]]) -> dict[str, int]:
        """Caller holds `lock`. Give UIDs now (APPEND/COPY/MOVE must return them)."""
        def work() -> tuple[UidList, tuple | None]:
            with _flock(self.path):
                return self._assign_locked(self.ul, items)
        ul, ul_sig = await asyncio.to_thread(work)
        self.ul = ul
        self.dirty = True
        return {base: ul.uids[base] for base, _, _ in items}

    async def drop(self, bases: set[str]) -> None:
        """Caller holds `lock`. Remove expunged/moved-away bases from the uidlist, along with
        entries whose files are gone (cleaned while we rewrite anyway)."""
        def work() -> UidList:
            with _flock(self.path):
                ul, _ = self._load_uidlist()
                if ul is None:
                    return self.ul
                found = _list(self.path)
                gone = [b for b in ul.uids if b not in found]
                if gone:  # a concurrent rename can hide a file from one readdir
                    again = _list(self.path)
                    gone = [b for b in gone if b not in again]
                for b in set(gone) | bases:
                    ul.uids.pop(b, None)
                    ul.extra.pop(b, None)
                try:
                    self._write_uidlist(ul, None)
                except OSError as e:
                    if e.errno not in FULL:
                        raise
                    # The files are gone already; lines naming missing files are ignored
                    # when read, and go at the next rewrite.
                    log.warning("uidlist of %s/%s not rewritten: disk full", self.account, self.name)
                return ul
        self.ul = await asyncio.to_thread(work)
        self.dirty = True

    # -- keywords -----------------------------------------------------------------------------

    async def ensure_keywords(self, words: list[str]) -> None:
        """Caller holds `lock`. Give letters to keywords that have none (StoreError past 26)."""
        known = {k.lower() for k in self.keywords}
        if all(w.lower() in known for w in words):
            return

        def work() -> tuple[list[str], tuple | None]:
            path = self.path / KEYWORDS
            with _flock(self.path):
                try:
                    table = fl.parse_keywords_file(path.read_bytes())
                except FileNotFoundError:
                    table = []
                have = {k.lower() for k in table}
                add = [w for w in words if w.lower() not in have]
                if add:
                    if len(table) + len(add) > len(fl.KEYWORD_LETTERS):
                        raise StoreError("too many keywords in this mailbox")
                    table = table + add
                    atomic_write(path, fl.format_keywords_file(table))
                return table, _stat_sig(path)
        self.keywords, self.kw_sig = await asyncio.to_thread(work)

    # -- metadata index (index.py) -------------------------------------------------------

    async def index_load(self) -> MetadataIndex:
        if self.index is None or self.index.uidvalidity != self.ul.uidvalidity:
            async with self.cache_lock:
                if self.index is None or self.index.uidvalidity != self.ul.uidvalidity:
                    uids = dict(self.ul.uids)
                    self.index = await asyncio.to_thread(
                        MetadataIndex.load, self.path / idxmod.NAME, self.ul.uidvalidity, uids)
        return self.index

    async def cache_put(self, entries: dict[int, dict]) -> None:
        idx = await self.index_load()
        async with self.cache_lock:
            live = {uid: e.base for uid, e in self.entries.items()} if self.entries else None
            rewrite, data = idx.plan_put(entries, live)
            await asyncio.to_thread(idx.write, rewrite, data)


# ---------------------------------------------------------------- blocking file operations

def _relocate(path: Path, listing: dict | None, base: str) -> tuple[dict, tuple[str, str, str] | None]:
    listing = _list(path) if listing is None else listing
    return listing, listing.get(base)


def _rename_flags(path: Path, targets: list[Entry], mode: str, change: str) -> dict[int, Entry | None]:
    """Rename each file to carry its new flags.  A file that moved since it was listed is
    looked up again by base name; None for files that are gone."""
    out: dict[int, Entry | None] = {}
    listing = None
    for e in targets:
        cur = e
        for attempt in range(3):
            letters = fl.apply(cur.letters, mode, change)
            new_name = fn.join(cur.base, letters)
            if cur.sub == "cur" and cur.name == new_name:
                out[e.uid] = cur
                break
            try:
                os.rename(path / cur.sub / cur.name, path / "cur" / new_name)
                out[e.uid] = cur._replace(sub="cur", name=new_name, letters=letters)
                break
            except FileNotFoundError:
                listing, loc = _relocate(path, None if attempt else listing, cur.base)
                if loc is None:
                    out[e.uid] = None
                    break
                cur = cur._replace(sub=loc[0], name=loc[1], letters=loc[2])
        else:
            out[e.uid] = None
    return out


def _unlink_deleted(path: Path, targets: list[Entry], flagged_only: bool = True) -> list[int]:
    done = []
    listing = None
    for e in targets:
        try:
            os.unlink(path / e.sub / e.name)
            done.append(e.uid)
            continue
        except FileNotFoundError:
            pass
        listing, loc = _relocate(path, listing, e.base)
        if loc is None:
            done.append(e.uid)  # gone already: expunged all the same
        elif "T" in loc[2] or not flagged_only:
            try:
                os.unlink(path / loc[0] / loc[1])
            except FileNotFoundError:
                pass
            done.append(e.uid)
        # else: \Deleted was cleared by someone else meanwhile: keep it
    return done


def _link_or_copy(src: Path, dst: Path, size: int, date: float) -> None:
    try:
        os.link(src, dst)  # same inode: same bytes, same mtime (= internal date), no copy
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
            raise
    base = dst.name.partition(":")[0]
    _write_message(dst.parent.parent, base, dst.parent.name, dst.name,
                   MessageSource(str(src), 0, size), date)


def _transfer(src: Path, dst: Path, plan: list[tuple[Entry, str]], move: bool) -> list[tuple[Entry, str]]:
    """Copy (hard link) or move (rename) files into dst/cur/.  Returns what was done."""
    if not (dst / "cur").is_dir():
        raise MailboxNotFound("destination mailbox is gone")
    done: list[tuple[Entry, str]] = []
    try:
        _transfer_files(src, dst, plan, move, done)
    except BaseException:  # a full disk part way: put back what was done
        _undo_transfer(src, dst, done, move)
        raise
    return done


def _undo_transfer(src: Path, dst: Path, done: list[tuple[Entry, str]], move: bool) -> None:
    for e, dname in done:
        try:
            if move:
                os.rename(dst / "cur" / dname, src / e.sub / e.name)
            else:
                os.unlink(dst / "cur" / dname)
        except OSError:
            log.warning("could not undo a %s of %s", "move" if move else "copy", dname)


def _transfer_files(src: Path, dst: Path, plan: list[tuple[Entry, str]], move: bool,
                    done: list[tuple[Entry, str]]) -> None:
    listing = None
    for e, dname in plan:
        sub, name = e.sub, e.name
        for attempt in range(2):
            try:
                if move:
                    os.rename(src / sub / name, dst / "cur" / dname)
                else:
                    _link_or_copy(src / sub / name, dst / "cur" / dname, e.size, e.date)
                done.append((e._replace(sub=sub, name=name), dname))  # where it came from
                break
            except FileNotFoundError:
                if attempt:
                    break
                listing, loc = _relocate(src, listing, e.base)
                if loc is None:
                    break
                sub, name = loc[0], loc[1]


@asynccontextmanager
async def _locked(a: _State, b: _State) -> AsyncIterator[None]:
    """Hold the locks of two mailboxes (or one, when they are the same), always taken in path
    order so that two opposite MOVEs cannot deadlock."""
    if a is b:
        async with a.lock:
            yield
        return
    first, second = sorted((a, b), key=lambda s: os.fspath(s.path))
    async with first.lock, second.lock:
        yield


# ---------------------------------------------------------------- sessions

class MaildirMailbox(Mailbox):
    """One session's view of a mailbox (see Mailbox in base.py)."""

    def __init__(self, store: "MaildirStore", state: _State, read_only: bool) -> None:
        self._store = store
        self._st = state
        self.account = state.account
        self.name = state.name
        self.read_only = read_only
        self.uidvalidity = state.ul.uidvalidity
        self.uidnext = state.ul.nextuid
        self.messages: list[MessageInfo] = []
        self._index: dict[int, MessageInfo] = {}
        self._letters: dict[int, str] = {}
        self._max_uid = 0
        self._version = -1
        self._closed = False

    def _info(self, e: Entry, flag_sets: dict[str, frozenset] | None = None) -> MessageInfo:
        if flag_sets is None:
            flags = fl.to_flags(e.letters, self._st.keywords)
        else:  # most messages share a handful of flag combinations
            fs = flag_sets.get(e.letters)
            if fs is None:
                fs = flag_sets[e.letters] = frozenset(fl.to_flags(e.letters, self._st.keywords))
            flags = fs  # shared, never changed in place (a change assigns a new set)
        ms = self._st.modseq
        return MessageInfo(e.uid, flags, e.size, e.date, e.base, ms.ms.get(e.uid, 0) if ms else 0)

    def _diff(self) -> Changes:
        """Bring `messages` up to the shared state; caller holds the state lock."""
        st = self._st
        changes = Changes()
        self.uidnext = st.ul.nextuid
        if st.modseq is not None:  # the view is now up to date with every change logged
            self.highestmodseq = st.modseq.highest
        if st.version == self._version:
            return changes
        self._version = st.version
        entries = st.entries
        gone = [uid for uid in self._index if uid not in entries]
        if gone:
            gone_set = set(gone)
            self.messages = [m for m in self.messages if m.uid not in gone_set]
            for uid in gone:
                del self._index[uid]
                del self._letters[uid]
            changes.expunged = sorted(gone)
        modseqs = st.modseq.ms if st.modseq is not None else {}
        for uid, mi in self._index.items():
            letters = entries[uid].letters
            ms = modseqs.get(uid, 0)
            if letters != self._letters[uid] or ms != mi.modseq:
                self._letters[uid] = letters
                flags = fl.to_flags(letters, st.keywords)
                if flags != mi.flags or ms != mi.modseq:  # a modseq alone: changed and changed back
                    mi.flags = flags
                    mi.modseq = ms
                    changes.flags.append(mi)
        # Only UIDs above what this session has seen are new: sequence numbers never shift.
        new = sorted(uid for uid in entries if uid > self._max_uid)
        flag_sets: dict[str, frozenset] = {}
        for uid in new:
            e = entries[uid]
            mi = self._info(e, flag_sets)
            self.messages.append(mi)
            self._index[uid] = mi
            self._letters[uid] = e.letters
        if new:
            self._max_uid = new[-1]
            changes.new = [self._index[u] for u in new]
        return changes

    def _drop_from_view(self, uids: Iterable[int]) -> None:
        """Forget messages this session removed itself (reported by its own command, so not
        again by refresh); other changes wait for refresh()."""
        gone = {u for u in uids if u in self._index}
        if gone:
            self.messages = [m for m in self.messages if m.uid not in gone]
            for uid in gone:
                del self._index[uid]
                del self._letters[uid]

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("mailbox is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StoreError("mailbox is read-only")

    def _publish(self, kind: str, uids: Iterable[int], origin: object, mailbox: str | None = None) -> None:
        self._store._publish(self.account, mailbox or self.name, kind, uids, origin)

    @disk_errors
    async def refresh(self) -> Changes:
        self._check_open()
        st = self._st
        async with st.lock:
            await st.sync()
            if st.ul.uidvalidity != self.uidvalidity:
                raise StoreError("mailbox was recreated (UIDVALIDITY changed); select it again")
            return self._diff()

    async def _entry(self, uid: int, fresh: bool = False) -> Entry:
        self._check_open()
        st = self._st
        if fresh:
            async with st.lock:
                await st.sync(force=True)
        e = st.entries.get(uid)
        if e is None:
            raise MessageGone(f"message UID {uid} no longer exists")
        return e

    async def _read(self, uid: int, start: int = 0, length: int | None = None) -> bytes:
        e = await self._entry(uid)
        try:
            return await asyncio.to_thread(_read_file, self._st.path / e.sub / e.name, start, length)
        except FileNotFoundError:
            pass
        e = await self._entry(uid, fresh=True)  # renamed by someone meanwhile
        try:
            return await asyncio.to_thread(_read_file, self._st.path / e.sub / e.name, start, length)
        except FileNotFoundError:
            raise MessageGone(f"message UID {uid} no longer exists") from None

    async def read(self, uid: int) -> bytes:
        return await self._read(uid)

    async def read_range(self, uid: int, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StoreError("bad range")
        if length == 0:
            return b""
        return await self._read(uid, start, length)

    def path(self, uid: int) -> str | None:
        e = self._st.entries.get(uid)
        return None if e is None else os.fspath(self._st.path / e.sub / e.name)

    @disk_errors
    async def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str,
                          origin: object = None, unchanged_since: int | None = None) -> list[MessageInfo]:
        self._check_writable()
        if mode not in ("+", "-", "="):
            raise StoreError(f"bad flag mode {mode!r}")
        system, keywords = fl.parse_flags(flags)
        wanted = sorted(set(uids))
        st = self._st
        out = FlagsStored()
        renamed: list[int] = []
        async with st.lock:
            if keywords and mode != "-":
                await st.ensure_keywords(keywords)
            change = fl.letters_for(system, keywords, st.keywords)
            if unchanged_since is not None:  # RFC 7162 UNCHANGEDSINCE: against the disk as it is now
                await st.sync(force=True)
                ms = st.modseq.ms if st.modseq is not None else {}
                out.failed = [u for u in wanted if u in self._index and ms.get(u, 0) > unchanged_since]
                wanted = [u for u in wanted if ms.get(u, 0) <= unchanged_since]
            targets = [st.entries[u] for u in wanted if u in self._index and u in st.entries]
            if not targets:
                return out
            result = await asyncio.to_thread(_rename_flags, st.path, targets, mode, change)
            logged: dict[int, str] = {}
            for uid, e in result.items():
                if e is None:
                    continue
                if st.entries.get(uid) != e:
                    st.entries[uid] = e
                    renamed.append(uid)
                    if st.modseq is not None and \
                            msmod.meaningful(st.modseq.letters.get(uid, "")) != msmod.meaningful(e.letters):
                        logged[uid] = e.letters
                mi = self._index[uid]
                self._letters[uid] = e.letters
                new_flags = fl.to_flags(e.letters, st.keywords)
                if new_flags != mi.flags:
                    mi.flags = new_flags
                    out.append(mi)
            if logged:  # logged before anyone is told (modseq.py)
                modseq = await asyncio.to_thread(st.modseq.flags_changed, logged)  # type: ignore[union-attr]
                for uid in logged:
                    self._index[uid].modseq = modseq
            if renamed:
                st.version += 1
        if renamed:
            self._publish("flags", sorted(renamed), origin)
        return out

    @disk_errors
    async def expunge(self, uids: Iterable[int] | None = None, origin: object = None,
                      flagged_only: bool = True) -> list[int]:
        self._check_writable()
        limit = None if uids is None else set(uids)
        flagged_only = flagged_only or limit is None  # "everything" is only ever the \Deleted ones
        st = self._st
        async with st.lock:
            await st.sync()
            targets = [e for uid, e in st.entries.items()
                       if uid in self._index and ("T" in e.letters or not flagged_only)
                       and (limit is None or uid in limit)]
            if not targets:
                return []
            if self._store.quota is not None:
                self._store.quota.begin(self.account)  # charge() below ends it
            done = await asyncio.to_thread(_unlink_deleted, st.path, targets, flagged_only)
            if not done:
                if self._store.quota is not None:
                    await self._store.quota.charge(self.account, 0, 0)  # ends what begin() started
                return []
            bases = {st.entries[u].base for u in done}
            freed = sum(st.entries[u].size for u in done)
            await st.drop(bases)
            for uid in done:
                st.entries.pop(uid, None)
            st.version += 1
            self._drop_from_view(done)
            if st.modseq is not None:
                await asyncio.to_thread(st.modseq.expunged, done)
        if self._store.quota is not None:
            await self._store.quota.charge(self.account, -freed, -len(done))
        done.sort()
        self._publish("expunge", done, origin)
        return done

    @disk_errors
    async def copy(self, uids: Iterable[int], dest: str, origin: object = None) -> list[tuple[int, int]]:
        self._check_open()
        return await self._store._transfer(self, uids, dest, move=False, origin=origin)

    @disk_errors
    async def move(self, uids: Iterable[int], dest: str, origin: object = None) -> list[tuple[int, int]]:
        self._check_writable()
        return await self._store._transfer(self, uids, dest, move=True, origin=origin)

    async def vanished_since(self, modseq: int) -> list[int] | None:
        st = self._st
        async with st.lock:
            return None if st.modseq is None else st.modseq.vanished_since(modseq)

    async def cache_get(self, uid: int) -> dict | None:
        st = self._st
        idx = st.index
        if idx is None or idx.uidvalidity != st.ul.uidvalidity:
            idx = await st.index_load()
        e = st.entries.get(uid)
        return idx.get(uid, e.base if e is not None else None)

    async def cache_put(self, entries: dict[int, dict]) -> None:
        if entries:
            await self._st.cache_put(entries)

    async def fulltext_search(self, queries: list[tuple[str, bool]]) -> list[set[int]] | None:
        self._check_open()
        st = self._st
        view = {uid: e for uid in self._index if (e := st.entries.get(uid)) is not None}

        def relocate() -> dict[str, Path]:  # blocking: where each file is now
            return {base: st.path / sub / name for base, (sub, name, _) in _list(st.path).items()}
        found = await st.fulltext.search({e.base: st.path / e.sub / e.name for e in view.values()},
                                         queries, relocate)
        if found is None:
            return None
        uid_of = {e.base: uid for uid, e in view.items()}
        return [{uid_of[b] for b in bases if b in uid_of} for bases in found]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._st.refs -= 1
            self._store._release(self._st)


# ---------------------------------------------------------------- the store

class MaildirStore(Store):
    quota = None  # store/quota.py's Quota when usage is tracked and limits enforced (server.py)

    def __init__(self, root: str | os.PathLike, events: EventBus, group_sync: GroupSync | None = None) -> None:
        self.root = Path(root)
        self.events = events
        self.group_sync = group_sync
        self._states: dict[tuple[str, str], _State] = {}
        self._account_locks: dict[str, asyncio.Lock] = {}
        self.group_writer = GroupWriter()  # deliveries: group commit (groupwrite.py)

    # -- paths ------------------------------------------------------------------------------

    def account_dir(self, account: str) -> Path:
        domain, local = names.account_parts(account)
        return self.root / domain / local

    def mailbox_dir(self, account: str, name: str) -> Path:
        dirname = names.to_dirname(name)
        base = self.account_dir(account)
        return base if dirname is None else base / dirname

    # -- internals --------------------------------------------------------------------------

    def _account_lock(self, account: str) -> asyncio.Lock:
        return self._account_locks.setdefault(account, asyncio.Lock())

    def _publish(self, account: str, mailbox: str, kind: str, uids: Iterable[int], origin: object) -> None:
        self.events.publish(MailboxEvent(account, mailbox, kind, tuple(uids), origin))

    async def _dsync(self, directory: Path) -> None:
        if self.group_sync is not None:
            await self.group_sync.sync(directory)
        else:
            await asyncio.to_thread(fsync_dir, directory)

    async def _state(self, account: str, name: str, retried: bool = False) -> _State:
        """The loaded shared state of a mailbox; MailboxNotFound if it does not exist.
        INBOX is created on first use (an account added by hand still gets mail)."""
        acct = names.normalize_account(account)
        name = names.normalize(name)
        key = (acct, name)
        st = self._states.pop(key, None)
        if st is None:
            st = _State(acct, name, self.mailbox_dir(acct, name), self.account_dir(acct))
        self._states[key] = st  # most recently used last
        if not st.loaded:
            try:
                async with st.lock:
                    if not st.loaded:
                        await st.sync(force=True)
            except MailboxNotFound:
                if self._states.get(key) is st:
                    del self._states[key]
                if retried:
                    raise
                # INBOX is made on first use.  Another mailbox may be one of the special
                # folders a first delivery is setting up at this very moment (under the
                # account lock): wait for that set-up, then look once more.
                await self.ensure_account(acct)
                return await self._state(acct, name, retried=True)
        self._evict()
        return st

    def _evict(self) -> None:
        idle = len(self._states) - MAX_IDLE_STATES
        if idle <= 0:
            return
        for key, st in list(self._states.items()):
            if idle <= 0:
                break
            if st.refs <= 0 and not st.lock.locked():
                del self._states[key]
                idle -= 1

    def _release(self, st: _State) -> None:
        if st.refs <= 0:
            st.index = None  # the biggest part; reloaded on demand
            st.fulltext.release()

    def _forget(self, account: str, name: str) -> set[str]:
        """Drop states of a renamed mailbox and its children; publish "deleted" for them."""
        told = set()
        for key in list(self._states):
            if key[0] == account and (key[1] == name or key[1].startswith(name + "/")):
                del self._states[key]
                self._publish(account, key[1], "deleted", (), None)
                told.add(key[1])
        return told

    # -- Store interface --------------------------------------------------------------------

    @disk_errors
    async def ensure_account(self, account: str) -> None:
        acct = names.normalize_account(account)
        account_dir = self.account_dir(acct)
        async with self._account_lock(acct):
            await asyncio.to_thread(self._ensure_account_blocking, account_dir)

    def _ensure_account_blocking(self, account_dir: Path) -> None:
        os.makedirs(self.root, 0o700, exist_ok=True)
        made = _mkdir(account_dir.parent) | _mkdir(account_dir)
        _make_subdirs(account_dir)
        # The special-use folders are made once, when the account is set up (no subscriptions
        # file yet): a user who deletes "Junk" must not see it come back at the next login.
        first = not (account_dir / SUBSCRIPTIONS).exists()
        for name, use in SPECIAL_MAILBOXES.items():
            path = account_dir / names.to_dirname(name)  # type: ignore[operator]
            if first and not path.exists():
                try:
                    _create_folder(account_dir, path, use)
                    made = True
                except FileExistsError:
                    pass
        for entry in os.listdir(account_dir):  # leftovers of a DELETE cut short by a crash
            if entry.startswith(TRASH_PREFIX):
                shutil.rmtree(account_dir / entry, ignore_errors=True)
        if first:
            _write_subscriptions(account_dir, [names.INBOX, *SPECIAL_MAILBOXES])
        if made:
            fsync_dir(account_dir)
            fsync_dir(account_dir.parent)

    @disk_errors
    async def deliver(self, account: str, message: "bytes | MessageSource", delivery_id: str,
                      mailbox: str = "INBOX", flags: Iterable[str] = ()) -> bool:
        did = fn.escape_delivery_id(delivery_id)
        if isinstance(message, MessageSource):
            if message.size < 0 or message.offset < 0:
                raise StoreError("bad message source")
            size = message.size
        elif isinstance(message, (bytes, bytearray, memoryview)):
            message = bytes(message)
            size = len(message)
        else:
            raise StoreError("message must be bytes or a MessageSource")
        system, keywords = fl.parse_flags(flags)
        st = await self._state(account, mailbox)
        # Check and reserve without an await in between: two deliveries of one id cannot race.
        if did in st.delivery_ids:
            return False
        st.delivery_ids.add(did)
        st.refs += 1
        try:
            letters = ""
            if system or keywords:
                async with st.lock:
                    if keywords:
                        await st.ensure_keywords(keywords)
                    letters = "".join(sorted(fl.letters_for(system, keywords, st.keywords)))
            if self.quota is not None:
                await self.quota.check(st.account, size)
            base = fn.new_base(time.time(), size, did)
            sub, name = ("cur", fn.join(base, letters)) if letters else ("new", base)
            # Group commit with the deliveries arriving meanwhile (groupwrite.py); the index
            # entry is noted when made, after the message is durable.
            await self.group_writer.write(st.path, base, sub, name, message, st.ul.uidvalidity,
                                          lambda entry: self._note_indexed(st, base, entry))
        except BaseException:
            st.delivery_ids.discard(did)
            raise
        finally:
            st.refs -= 1
        st.dirty = True
        if self.quota is not None:  # written after the reply, counted by checks from now (quota.py)
            self.quota.charge_soon(st.account, size, 1)
        self._publish(st.account, st.name, "new", (), None)
        return True

    @staticmethod
    def _note_indexed(st: _State, base: str, entry: dict | None) -> None:
        """What _write_and_index wrote, into the loaded indexes of the mailbox."""
        if entry is None:
            return
        texts = entry.pop("fts", None)
        if texts is True:  # its rows are in (derived.py): the next search need not add them
            if st.fulltext.bases is not None:
                st.fulltext.bases.add(base)
        elif texts is not None:
            st.fulltext.queue(base, *texts)
        if st.index is not None and st.index.uidvalidity == st.ul.uidvalidity:
            st.index.note_delivered(base, entry)

    @disk_errors
    async def append(self, account: str, mailbox: str, message: bytes, flags: Iterable[str] = (),
                     internaldate: float | None = None, origin: object = None) -> tuple[int, int]:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise StoreError("message must be bytes")
        message = bytes(message)
        system, keywords = fl.parse_flags(flags)
        date = time.time() if internaldate is None else float(internaldate)
        if date < 0:
            raise StoreError("bad internal date")
        st = await self._state(account, mailbox)
        st.refs += 1
        try:
            async with st.lock:
                if keywords:
                    await st.ensure_keywords(keywords)
                letters = "".join(sorted(fl.letters_for(system, keywords, st.keywords)))
            if self.quota is not None:
                await self.quota.check(st.account, len(message))
            base = fn.new_base(date, len(message))
            name = fn.join(base, letters)
            entry = await asyncio.to_thread(_write_and_index, st.path, base, "cur", name, message,
                                            date, st.ul.uidvalidity)
            self._note_indexed(st, base, entry)
            try:
                await self._dsync(st.path / "cur")
                async with st.lock:
                    uid = (await st.assign([(base, None, None)]))[base]
                    uidvalidity = st.ul.uidvalidity
            except BaseException:  # no UID (a full disk): the message must not stay without one
                await asyncio.to_thread(_unlink_quietly, st.path / "cur" / name)
                raise
        finally:
            st.refs -= 1
        if self.quota is not None:
            await self.quota.charge(st.account, len(message), 1)
        self._publish(st.account, st.name, "new", (uid,), origin)
        return uidvalidity, uid

    @disk_errors
    async def append_many(self, account: str, mailbox: str, messages, origin: object = None) -> tuple[int, list[int]]:
        from .multiappend import append_many  # all or nothing: see there
        return await append_many(self, account, mailbox, messages, origin)

    @disk_errors
    async def open(self, account: str, name: str, read_only: bool = False) -> Mailbox:
        st = await self._state(account, name)
        async with st.lock:
            await st.sync()
            await self._load_recent(st)
            mbox = MaildirMailbox(self, st, read_only)
            mbox._diff()
            st.refs += 1
        return mbox

    @disk_errors
    async def status(self, account: str, name: str) -> dict:
        st = await self._state(account, name)
        async with st.lock:
            await st.sync()
            unseen = sum(1 for e in st.entries.values() if "S" not in e.letters)
            await self._load_recent(st)
            mark = self.recent_mark(st.account, st.name, st.ul.uidvalidity)
            recent = sum(1 for uid in st.entries if uid > mark)
            deleted = [e.size for e in st.entries.values() if "T" in e.letters]  # RFC 9208 (quota)
            return {"MESSAGES": len(st.entries), "RECENT": recent, "UIDNEXT": st.ul.nextuid,
                    "UIDVALIDITY": st.ul.uidvalidity, "UNSEEN": unseen,
                    # STATUS=SIZE (RFC 8438) and DELETED (RFC 9051), from the names on disk
                    "SIZE": sum(e.size for e in st.entries.values()),
                    "DELETED": len(deleted), "DELETED-STORAGE": -(-sum(deleted) // 1024),
                    "HIGHESTMODSEQ": st.modseq.highest if st.modseq is not None else 0}

    # -- \Recent, kept on disk (recent.py) ------------------------------------------------

    async def _load_recent(self, st: _State) -> None:
        if st.recent_loaded:
            return
        mark = await asyncio.to_thread(recentmod.read, st.path, st.ul.uidvalidity)
        marks = self._recent_marks()
        key = (st.account, st.name, st.ul.uidvalidity)
        marks[key] = max(marks.get(key, 0), mark)
        st.recent_loaded = True

    def claim_recent(self, account: str, name: str, uidvalidity: int, uids: Iterable[int],
                     take: bool = True) -> set[int]:
        mine = super().claim_recent(account, name, uidvalidity, uids, take)
        st = self._states.get((account, name))
        if mine and take and st is not None and (st.recent_task is None or st.recent_task.done()):
            st.recent_task = asyncio.get_running_loop().create_task(self._save_recent(st, uidvalidity))
        return mine

    async def _save_recent(self, st: _State, uidvalidity: int) -> None:
        """Write the mark until what is on disk is the latest (claims made meanwhile)."""
        written = -1
        while (mark := self.recent_mark(st.account, st.name, uidvalidity)) != written:
            try:
                await asyncio.to_thread(recentmod.write, st.path, uidvalidity, mark)
            except OSError as e:  # a full disk: kept in memory; written at the next claim
                log.warning("cannot save the \\Recent mark of %s/%s: %s", st.account, st.name, e)
                return
            written = mark

    async def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        acct = names.normalize_account(account)
        account_dir = self.account_dir(acct)
        if not (account_dir / "cur").is_dir():
            await self.ensure_account(acct)
        return await asyncio.to_thread(self._list_blocking, account_dir)

    def _list_blocking(self, account_dir: Path) -> list[MailboxInfo]:
        subs = set(_read_subscriptions(account_dir))
        real: dict[str, str] = {}
        with os.scandir(account_dir) as it:
            for de in it:
                if de.name.startswith(".") and de.is_dir(follow_symlinks=False):
                    name = names.from_dirname(de.name)
                    if name is not None:
                        real[name] = de.name
        with_children = {p for n in real for p in names.parents(n)}
        out = [MailboxInfo(names.INBOX, None, names.INBOX in subs, names.INBOX in with_children, True)]
        for name in sorted((set(real) | with_children) - {names.INBOX}):
            special = None
            if name in real:
                try:
                    special = (account_dir / real[name] / SPECIAL_USE).read_text("utf-8").strip() or None
                except FileNotFoundError:
                    special = SPECIAL_MAILBOXES.get(name)
            out.append(MailboxInfo(name, special, name in subs, name in with_children, name in real))
        return out

    @disk_errors
    async def create_mailbox(self, account: str, name: str, special_use: str | None = None) -> None:
        acct = names.normalize_account(account)
        name = names.normalize(name)
        if name == names.INBOX:
            raise MailboxExists("INBOX exists always")
        if special_use is not None and special_use not in SPECIAL_USE_ATTRS:
            raise StoreError(f"unknown special-use attribute {special_use}")
        account_dir = self.account_dir(acct)
        if not (account_dir / "cur").is_dir():
            await self.ensure_account(acct)
        async with self._account_lock(acct):
            await asyncio.to_thread(self._create_blocking, account_dir, name, special_use)
        self._publish(acct, name, "created", (), None)  # for IMAP NOTIFY MailboxName

    def _create_blocking(self, account_dir: Path, name: str, special_use: str | None) -> None:
        made: list[Path] = []  # parents made here: removed again if the mailbox cannot be
        try:
            for parent in names.parents(name):
                if parent != names.INBOX:
                    path = account_dir / names.to_dirname(parent)  # type: ignore[operator]
                    try:
                        _create_folder(account_dir, path, None)
                        made.append(path)
                    except FileExistsError:
                        pass
            try:
                _create_folder(account_dir, account_dir / names.to_dirname(name), special_use)  # type: ignore[operator]
            except FileExistsError:
                raise MailboxExists(f"mailbox {name} exists") from None
            fsync_dir(account_dir)
        except BaseException:
            for path in reversed(made):
                shutil.rmtree(path, ignore_errors=True)
            raise

    @disk_errors
    async def delete_mailbox(self, account: str, name: str) -> None:
        acct = names.normalize_account(account)
        name = names.normalize(name)
        if name == names.INBOX:
            raise StoreError("INBOX cannot be deleted")
        account_dir = self.account_dir(acct)
        async with self._account_lock(acct):
            await asyncio.to_thread(self._delete_blocking, account_dir, name)
            if self.quota is not None:  # its messages are gone: counted again at the next look
                await self.quota.forget(acct)
            # The children keep their states; only this one is gone.
            st = self._states.pop((acct, name), None)
            if st is not None:
                st.dirty = True
            self._publish(acct, name, "deleted", (), None)

    @staticmethod
    def _delete_blocking(account_dir: Path, name: str) -> None:
        dirname = names.to_dirname(name)
        path = account_dir / dirname  # type: ignore[operator]
        if not path.is_dir():
            try:
                children = any(d.startswith(dirname + ".") for d in os.listdir(account_dir))  # type: ignore[operator]
            except FileNotFoundError:
                children = False
            if children:
                raise StoreError(f"{name} has inferior names and is not a mailbox itself")
            raise MailboxNotFound(f"no mailbox {name}")
        # One rename makes it vanish at once; removing the files can then take its time.
        trash = account_dir / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(path, trash)
        fsync_dir(account_dir)
        shutil.rmtree(trash, ignore_errors=True)

    @disk_errors
    async def rename_mailbox(self, account: str, old: str, new: str) -> None:
        acct = names.normalize_account(account)
        old, new = names.normalize(old), names.normalize(new)
        if new == names.INBOX or new == old:
            raise MailboxExists(f"mailbox {new} exists")
        if new.startswith(old + "/"):
            raise StoreError("cannot rename a mailbox into itself")
        account_dir = self.account_dir(acct)
        if old == names.INBOX:
            return await self._rename_inbox(acct, new)
        async with self._account_lock(acct):
            pairs = await asyncio.to_thread(self._rename_blocking, account_dir, old, new)
            renamed = dict(pairs)
            subs = await asyncio.to_thread(_read_subscriptions, account_dir)
            if any(s in renamed for s in subs):
                try:
                    await asyncio.to_thread(_write_subscriptions, account_dir,
                                            [renamed.get(s, s) for s in subs])
                except OSError:  # a full disk: the RENAME is refused whole, so undo it
                    await asyncio.to_thread(_rename_back, account_dir, pairs)
                    raise
            told = self._forget(acct, old)
            for a, _ in pairs:
                if a not in told:
                    self._publish(acct, a, "deleted", (), None)
            for a, b in pairs:  # for IMAP NOTIFY MailboxName (OLDNAME)
                self.events.publish(MailboxEvent(acct, b, "renamed", (), None, old_name=a))

    def _rename_blocking(self, account_dir: Path, old: str, new: str) -> list[tuple[str, str]]:
        od, nd = names.to_dirname(old), names.to_dirname(new)
        assert od is not None and nd is not None
        entries = [d for d in os.listdir(account_dir) if d.startswith(".")]
        sources = [d for d in entries if d == od or d.startswith(od + ".")]
        if not sources:
            raise MailboxNotFound(f"no mailbox {old}")
        if any(d == nd or d.startswith(nd + ".") for d in entries):
            raise MailboxExists(f"mailbox {new} exists")
        targets = [nd + d[len(od):] for d in sources]
        if any(len(t.encode("utf-8")) > names.MAX_DIRNAME_BYTES for t in targets):
            raise StoreError("mailbox name too long")
        for parent in names.parents(new):
            if parent != names.INBOX:
                try:
                    _create_folder(account_dir, account_dir / names.to_dirname(parent), None)  # type: ignore[operator]
                except FileExistsError:
                    pass
        pairs = []
        for src, dst in zip(sources, targets):
            os.rename(account_dir / src, account_dir / dst)
            pairs.append((names.from_dirname(src), names.from_dirname(dst)))
        fsync_dir(account_dir)
        return [(a, b) for a, b in pairs if a is not None and b is not None]

    async def _rename_inbox(self, acct: str, new: str) -> None:
        """RFC 3501: renaming INBOX moves its messages into a new mailbox; INBOX stays, empty
        (its children are not renamed)."""
        await self.create_mailbox(acct, new)
        src = await self._state(acct, names.INBOX)
        dst = await self._state(acct, new)
        async with _locked(src, dst):
            await src.sync(force=True)
            await dst.sync()
            entries = sorted(src.entries.values(), key=lambda e: e.uid)
            pairs = await self._transfer_locked(src, dst, entries, move=True)
        if pairs:
            self._publish(acct, names.INBOX, "expunge", [a for a, _ in pairs], None)
            self._publish(acct, new, "new", [b for _, b in pairs], None)

    @disk_errors
    async def subscribe(self, account: str, name: str, subscribed: bool) -> None:
        acct = names.normalize_account(account)
        name = names.normalize(name)
        account_dir = self.account_dir(acct)

        def work() -> bool:
            subs = _read_subscriptions(account_dir)
            if subscribed and name not in subs:
                _write_subscriptions(account_dir, subs + [name])
            elif not subscribed and name in subs:
                _write_subscriptions(account_dir, [s for s in subs if s != name])
            else:
                return False
            return True
        async with self._account_lock(acct):
            if not account_dir.is_dir():
                raise MailboxNotFound("no such account")
            if await asyncio.to_thread(work):  # for IMAP NOTIFY SubscriptionChange
                self._publish(acct, name, "subscribed" if subscribed else "unsubscribed", (), None)

    async def subscriptions(self, account: str) -> list[str]:
        account_dir = self.account_dir(names.normalize_account(account))
        return await asyncio.to_thread(_read_subscriptions, account_dir)

    # -- copy / move --------------------------------------------------------------------------

    async def _transfer(self, mbox: MaildirMailbox, uids: Iterable[int], dest: str, move: bool,
                        origin: object) -> list[tuple[int, int]]:
        src = mbox._st
        dst = await self._state(mbox.account, dest)
        # A MOVE into the same mailbox (RFC 6851 allows it) renames each file to a new base
        # name: a new UID for the message, and the old UID expunged.
        wanted = sorted(set(uids))
        async with _locked(src, dst):
            entries = [src.entries[u] for u in wanted if u in mbox._index and u in src.entries]
            pairs = await self._transfer_locked(src, dst, entries, move)
            if move:
                mbox._drop_from_view(a for a, _ in pairs)
        if pairs:
            if move:
                mbox._publish("expunge", [a for a, _ in pairs], origin)
            self._publish(dst.account, dst.name, "new", [b for _, b in pairs], origin)
        return pairs

    async def _transfer_locked(self, src: _State, dst: _State, entries: list[Entry],
                               move: bool) -> list[tuple[int, int]]:
        """Both locks held.  Keeps flags (keyword letters re-mapped to dest's table) and the
        internal date (hard link or rename keep the mtime; new names keep the date prefix)."""
        if not entries:
            return []
        used_kw = sorted({c for e in entries for c in e.letters if "a" <= c <= "z"})
        words = [src.keywords[ord(c) - 97] for c in used_kw if ord(c) - 97 < len(src.keywords)]
        if words:
            await dst.ensure_keywords(words)
        if not move and self.quota is not None:  # a MOVE stays in the account: no change
            await self.quota.check(dst.account, sum(e.size for e in entries), len(entries))
        remap = {c: fl.keyword_letters([src.keywords[ord(c) - 97]], dst.keywords)
                 for c in used_kw if ord(c) - 97 < len(src.keywords)}
        plan = []
        for e in entries:
            # Capitals are the same everywhere; a keyword letter becomes dest's letter for the
            # same keyword (and one without meaning in the source is dropped).
            letters = "".join(sorted(remap.get(c, "") if "a" <= c <= "z" else c for c in e.letters))
            keep = move and e.base not in dst.ul.uids
            base = e.base if keep else fn.new_base(e.date, e.size)
            plan.append((e, fn.join(base, letters)))
        done = await asyncio.to_thread(_transfer, src.path, dst.path, plan, move)
        if not done:
            return []
        items = []
        for e, dname in done:
            base = fn.split(dname)[0]
            items.append((base,
                          e.size if fn.size_of(base) is None else None,
                          e.date if fn.own_time(base) is None else None))
        try:
            await self._dsync(dst.path / "cur")
            assigned = await dst.assign(items)
        except BaseException:  # no UIDs (a full disk): the copies must not stay without them
            await asyncio.to_thread(_undo_transfer, src.path, dst.path, done, move)
            dst.dirty = True
            raise
        pairs = [(e.uid, assigned[fn.split(dname)[0]]) for e, dname in done]
        if not move and self.quota is not None:
            await self.quota.charge(dst.account, sum(e.size for e, _ in done), len(done))
        if move:
            await src.drop({e.base for e, _ in done})
            for e, _ in done:
                src.entries.pop(e.uid, None)
            src.version += 1
            if src.modseq is not None:
                await asyncio.to_thread(src.modseq.expunged, [e.uid for e, _ in done])
        return pairs


def clean_stale_tmp(root: str | os.PathLike, before: float) -> int:
    """Blocking, once at server start: remove files in every mailbox's tmp/ last written before
    `before` (the server's start).  They are deliveries a kill cut short (even 0-byte ones); this
    server's own deliveries all start later.  Returns how many were removed."""
    removed = 0
    try:
        domains = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for domain in domains:
        if not domain.is_dir(follow_symlinks=False):
            continue
        for account in os.scandir(domain.path):
            if not account.is_dir(follow_symlinks=False):
                continue
            tmps = [os.path.join(account.path, "tmp")]
            tmps += [os.path.join(e.path, "tmp") for e in os.scandir(account.path)
                     if e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
            for tmp in tmps:
                try:
                    entries = list(os.scandir(tmp))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for e in entries:
                    try:
                        if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < before:
                            # a group-written delivery whose rename a crash undid: into new/
                            if recover_tmp(tmp, e.name) is None:
                                os.unlink(e.path)
                                removed += 1
                    except OSError:
                        pass
    return removed
