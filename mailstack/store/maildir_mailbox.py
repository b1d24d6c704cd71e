"""One mailbox of the Maildir store (maildir.py): `_State`, what this process knows of it,
shared by every session on it (scans of new/ + cur/, UIDs, keywords, the indexes), and
`MaildirMailbox`, one session's view of it."""
from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterable, NamedTuple

from ..fsutil import atomic_write
from . import filename as fn
from . import flags as fl
from . import fts
from . import index as idxmod
from . import modseq as msmod
from . import uidlist as ulmod
from .diskerrors import FULL, disk_errors
from .base import Changes, FlagsStored, Mailbox, MailboxNotFound, MessageGone, MessageInfo, StoreError
from .index import MetadataIndex
from .uidlist import UidList
from .maildir_files import (KEYWORDS, Entry, _flock, _list, _make_subdirs, _new_uidvalidity, _read_file,
                            _rename_flags, _stat_sig, _unlink_deleted, _write_all)

if TYPE_CHECKING:
    from .maildir import MaildirStore

log = logging.getLogger("mailstack.store")

STALE_TMP = 36 * 3600  # the Maildir spec's age after which a tmp/ file is abandoned
SETTLE = 2.0  # seconds, for filesystems with whole-second timestamps
FINE_SETTLE = 0.05  # seconds, when timestamps have a sub-second part


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
        self.path_str = str(path)  # for path(): a Path in an f-string is a method call each time
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
        self.write_later: "Callable[[_State], None] | None" = None  # see MaildirStore.set_background
        self.recent_loaded = False  # the \Recent mark was read from disk (recent.py)
        self.recent_task: asyncio.Task | None = None  # writes the mark back
        self.modseq: msmod.ModseqLog | None = None  # loaded with the entries (modseq.py)
        # The last view built from scratch, (version, keywords, infos, index, letters): the next
        # session that opens the mailbox at that version shares its MessageInfos instead
        # of making 100,000 new ones.  A view never changes a MessageInfo in place (a
        # change is a new object: MaildirMailbox._replace), so sharing is safe.
        self.view_cache: tuple | None = None
        self.derived: dict = {}  # Mailbox.derived(): the protocol layer's caches (SORT keys)
        self.derived_uidvalidity = 0

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
            # Only the directories: a file added in the tick of our readdir leaves their
            # mtime as it was.  The uid list is not counted: its changes show in its inode
            # (a rewrite is a new file) or size (an append), and our own scan writes it after
            # its readdir, which would make every such scan be repeated by the next look.
            newest = max(sig[0], sig[1])
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
        scanned: dict[str, tuple] = {}  # fn.scan_base of the new ones: each name parsed once
        if ul is None or unknown:
            items = []
            for base in unknown:
                sub, name, _ = found[base]
                size, date, _, _ = scanned[base] = fn.scan_base(base)
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
            items.sort(key=lambda it: scanned[it[0]][3] or fn.arrival_key(it[0], it[2]))
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
            size, date, did = scanned[base][:3] if base in scanned else fn.parse_base(base)
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

    async def cache_put(self, entries: dict[int, dict], raws: dict[int, bytes] | None = None) -> None:
        """`raws`: the index lines of some of `entries` (index.serialize), made by the caller
        off the loop already."""
        idx = await self.index_load()
        if raws is not None and len(raws) == len(entries) and \
                all(type(v) is idxmod.Plain for v in entries.values()):
            values = entries  # as_loaded() of Plain entries: all of them, nothing to walk
        else:
            given = raws or {}
            raws, values = await asyncio.to_thread(  # JSON off the loop
                lambda: ({u: given.get(u) or idxmod._dumps(e) for u, e in entries.items()},
                         idxmod.as_loaded(entries)))
        async with self.cache_lock:
            rewrite, data = idx.plan_put_raw(raws, self.entries or None, values)  # entries: uid -> Entry(.base)
            await asyncio.to_thread(idx.write, rewrite, data)

    async def cache_put_later(self, entries: dict[int, dict]) -> bool:
        """cache_put, the lines written later (write_unwritten, when the background indexer
        finds the process quiet): a cold listing answers without making 10,000 JSON lines
        first.  The entries are in memory at once, so the next command sees them; a crash
        before the write loses only lines, made again when next needed.  False (nothing
        done) when no indexer runs or an entry is not what a reload gives (index.Plain)."""
        later = self.write_later
        if later is None or not all(type(v) is idxmod.Plain for v in entries.values()):
            return False
        idx = await self.index_load()
        idx.put_later(entries)
        later(self)
        return True

    async def write_unwritten(self) -> int:
        """Write the lines of what cache_put_later kept; the number written."""
        idx = self.index
        if idx is None or not idx.unwritten:
            return 0
        async with self.cache_lock:  # other writers wait (cache_put plans under it too)
            if self.index is not idx or idx.uidvalidity != self.ul.uidvalidity:
                return 0  # replaced meanwhile: its entries went with it
            entries = idx.take_unwritten()
            raws = await asyncio.to_thread(idxmod.serialize, entries)
            # one replaced meanwhile (put_later of another listing) keeps the newer value
            raws = {uid: js for uid, js in raws.items() if idx.by_uid.get(uid) is entries[uid]}
            if not raws:
                return 0
            rewrite, data = idx.plan_put_raw(raws, self.entries or None, entries)
            try:
                await asyncio.to_thread(idx.write, rewrite, data)
            finally:
                if self.refs <= 0 and self.index is idx and not idx.unwritten:
                    self.index = None  # kept for this write only (MaildirStore._release)
        return len(raws)


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

def _uid_of(mi: MessageInfo) -> int:
    return mi.uid


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
        # True while _index and _letters are the view cache's dicts, shared with other
        # sessions (a SELECT of 100,000 messages copied both); _own() copies them before
        # this view changes either.
        self._shared = False
        # Facts about `messages` worked out once per view cache and shared with it (the
        # distinct flag sets, the first unseen: view_summary()); None from this view's
        # first change on (_own(), called before every change of the view).
        self._summary: dict | None = None
        self._max_uid = 0
        self._version = -1
        self._closed = False

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
            self._own()
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
                self._own()
                self._letters[uid] = letters
                flags = fl.to_flags(letters, st.keywords)
                if flags != mi.flags or ms != mi.modseq:  # a modseq alone: changed and changed back
                    changes.flags.append(self._replace(mi, flags, ms))
        # Only UIDs above what this session has seen are new: sequence numbers never shift.
        max_uid = self._max_uid
        fresh = not max_uid and not self._index
        if fresh:
            cached = st.view_cache
            if cached is not None and cached[0] == st.version and cached[1] == tuple(st.keywords):
                infos, index, letters = cached[2], cached[3], cached[4]
                self.messages = list(infos)  # a copy: the IMAP layer reads it, in place
                self._index, self._letters, self._shared = index, letters, True  # copied on change
                self._summary = cached[5]
                if infos:
                    self._max_uid = infos[-1].uid
                    # the cache's own list, read only (a cache is replaced, never changed):
                    # open() drops the changes, so a copy here was 100,000 pointers for nothing
                    changes.new = infos
                return changes
        new = sorted(uid for uid in entries if uid > max_uid) if max_uid else sorted(entries)
        flag_sets: dict[str, frozenset] = {}
        if new:
            # one tight loop: a first SELECT of 100,000 messages runs it 100,000 times; the
            # flag sets are shared, never changed in place (a change assigns a new set)
            keywords = st.keywords
            to_flags = fl.to_flags
            infos = []
            for uid in new:
                e = entries[uid]
                letters = e.letters
                fs = flag_sets.get(letters)
                if fs is None:  # most messages share a handful of flag combinations
                    fs = flag_sets[letters] = frozenset(to_flags(letters, keywords))
                infos.append(MessageInfo(uid, fs, e.size, e.date, e.base, modseqs.get(uid, 0)))
            self.messages.extend(infos)
            self._own()
            self._index.update(zip(new, infos))
            self._letters.update((uid, entries[uid].letters) for uid in new)
            self._max_uid = new[-1]
            changes.new = infos
        if fresh:
            # the maps are shared with the cache from now on (copied by whoever changes them);
            # a fresh view is exactly the new messages, so their flag sets are all of its own
            self._summary = {"flag_sets": frozenset(flag_sets.values())}
            st.view_cache = (st.version, tuple(st.keywords), list(self.messages), self._index, self._letters,
                             self._summary)
            self._shared = True
        return changes

    def _replace(self, mi: MessageInfo, flags, modseq: int) -> MessageInfo:
        """A message's new flags/modseq in this view: a new MessageInfo in its place (the
        old one may be shared with other sessions' views and with commands in flight)."""
        new = MessageInfo(mi.uid, flags, mi.size, mi.internaldate, mi.key, modseq)
        self._own()
        self._index[mi.uid] = new
        msgs = self.messages
        i = bisect.bisect_left(msgs, mi.uid, key=_uid_of)  # the view is in UID order
        if i < len(msgs) and msgs[i].uid == mi.uid:
            msgs[i] = new
        return new

    def _own(self) -> None:
        """Make _index and _letters this view's own before it changes them (or `messages`):
        every change of the view calls this first, so the shared summary is let go here."""
        self._summary = None
        if self._shared:
            self._index, self._letters, self._shared = dict(self._index), dict(self._letters), False

    def view_summary(self) -> dict | None:
        """See Mailbox.view_summary: the view cache's summary while this view is unchanged."""
        return self._summary

    def _drop_from_view(self, uids: Iterable[int]) -> None:
        """Forget messages this session removed itself (reported by its own command, so not
        again by refresh); other changes wait for refresh()."""
        gone = {u for u in uids if u in self._index}
        if gone:
            self._own()
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
        # no pathlib joins: FETCH asks this for every message of a cold listing
        return None if e is None else f"{self._st.path_str}/{e.sub}/{e.name}"

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
                self._own()
                self._letters[uid] = e.letters
                new_flags = fl.to_flags(e.letters, st.keywords)
                if new_flags != mi.flags:
                    out.append(self._replace(mi, new_flags, mi.modseq))
            if logged:  # logged before anyone is told (modseq.py)
                modseq = await asyncio.to_thread(st.modseq.flags_changed, logged)  # type: ignore[union-attr]
                for uid in logged:
                    self._replace(self._index[uid], self._index[uid].flags, modseq)
                out[:] = [self._index.get(m.uid, m) for m in out]  # the newest of each
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

    async def cache_get_many(self, uids: Iterable[int], raw: bool = False) -> dict[int, "dict | bytes"]:
        """cache_get of many messages in one step.  With `raw`, an entry may come as the
        JSON bytes of its index line, unparsed (imap/fetch.py's cached_envelope reads those)."""
        st = self._st
        idx = st.index
        if idx is None or idx.uidvalidity != st.ul.uidvalidity:
            idx = await st.index_load()
        entries = st.entries
        get = idx.get_raw if raw else idx.get
        by_uid = idx.by_uid
        out = {}
        for uid in uids:
            v = by_uid.get(uid)
            # held and parsed already (or raw bytes wanted): what get() / get_raw() would give
            if v is None or not (raw or isinstance(v, dict)):
                e = entries.get(uid)
                v = get(uid, e.base if e is not None else None)
            if v is not None:
                out[uid] = v
        return out

    async def cache_put(self, entries: dict[int, dict]) -> None:
        if entries:
            await self._st.cache_put(entries)

    async def cache_put_later(self, entries: dict[int, dict]) -> bool:
        """cache_put with the lines written after the answer (_State.cache_put_later);
        False when the caller must cache_put them itself."""
        return bool(entries) and await self._st.cache_put_later(entries)

    def puts_later(self) -> bool:
        """Would cache_put_later take entries now (a background indexer writes them)?"""
        return self._st.write_later is not None

    async def cache_put_lines(self, entries: dict[int, dict], raws: dict[int, bytes] | None) -> None:
        """cache_put of entries whose index lines (index.serialize of them, or of some) the
        caller made already in a worker thread: imap/fetching.py's cold listing."""
        if entries:
            await self._st.cache_put(entries, raws)

    def derived(self) -> dict:
        st = self._st
        if st.derived_uidvalidity != st.ul.uidvalidity:
            st.derived, st.derived_uidvalidity = {}, st.ul.uidvalidity
        return st.derived

    async def fulltext_search(self, queries: list[tuple[str, bool]]) -> list[set[int]] | None:
        self._check_open()
        st = self._st
        view = {uid: e for uid in self._index if (e := st.entries.get(uid)) is not None}

        def relocate() -> dict[str, str]:  # blocking: where each file is now
            return {base: f"{root}/{sub}/{name}" for base, (sub, name, _) in _list(st.path).items()}
        root = os.fspath(st.path)  # str paths: 10,000 Path joins cost more than the search
        found = await st.fulltext.search({e.base: f"{root}/{e.sub}/{e.name}" for e in view.values()},
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
