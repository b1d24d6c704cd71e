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
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable

from ..events import EventBus, MailboxEvent
from ..fsutil import GroupSync, fsync_dir
from . import filename as fn
from . import flags as fl
from . import names
from .groupwrite import GroupWriter
from . import recent as recentmod
from .diskerrors import disk_errors
from .base import (SPECIAL_MAILBOXES, Mailbox, MailboxExists, MailboxInfo,
                   MailboxNotFound, MessageSource, Store, StoreError)
# Split by job: the blocking file work (maildir_files.py), one mailbox's shared state and a
# session's view of it (maildir_mailbox.py), and here the store of accounts and folders.
# Every name these modules had here before stays importable from here.
from .maildir_files import (  # noqa: F401 - re-exported
    INDEX_AT_DELIVERY_MAX, KEYWORDS, LOCK, MAILDIRFOLDER, SPECIAL_USE, SUBSCRIPTIONS, UIDVALIDITY,
    _COPY_CHUNK, Entry, _copy_from_source, _create_folder, _flock, _link_or_copy, _list, _make_subdirs,
    _mkdir, _new_uidvalidity, _read_file, _read_subscriptions, _relocate, _rename_back, _rename_flags,
    _stat_sig, _touch, _transfer, _transfer_files, _undo_transfer, _unlink_deleted, _unlink_quietly,
    _write_all, _write_and_index, _write_message, _write_subscriptions, clean_stale_tmp)
from .maildir_mailbox import (  # noqa: F401 - re-exported
    FINE_SETTLE, SETTLE, STALE_TMP, MaildirMailbox, _locked, _State, _SyncResult)

log = logging.getLogger("mailstack.store")

TRASH_PREFIX = "mailstack-deleted."
MAX_IDLE_STATES = 256  # loaded mailboxes kept without any session, for delivery and STATUS
# ... and at most this many messages in them together (server.mailbox_cache_messages): a
# loaded mailbox costs ~0.6 KB a message (its scan, UIDs, the last view), ~1.5 KB with the
# SORT keys and header texts of derived() (kept for DERIVED_KEPT of them); by count alone
# 256 mailboxes of 10,000 messages could hold gigabytes.  50,000 is the INBOXes of a
# household (five of 10,000) in 30-75 MB: with the ~50 MiB of a server at rest and the
# ~110 MiB of a client on a 100,000-message mailbox, a small VPS's server stays under
# 300 MiB.  Let go, a mailbox is read back from disk: its next SELECT scans the folder
# again (~0.1-0.2 s for 10,000) and its first SEARCH SUBJECT parses the index lines
# (~0.3 s), docs/benchmarks.md (issue 16, session 6).
IDLE_MESSAGES = 50000
DERIVED_KEPT = 16  # mailboxes without a session that keep their SORT keys and answers (derived())
SPECIAL_USE_ATTRS = {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}


# ---------------------------------------------------------------- the store

class MaildirStore(Store):
    quota = None  # store/quota.py's Quota when usage is tracked and limits enforced (server.py)

    def __init__(self, root: str | os.PathLike, events: EventBus, group_sync: GroupSync | None = None) -> None:
        self.root = Path(root)
        self.events = events
        self.group_sync = group_sync
        self._states: dict[tuple[str, str], _State] = {}
        self._derived_kept: dict[int, _State] = {}  # released states holding derived(), oldest first
        self.idle_messages = IDLE_MESSAGES  # budget of the idle mailboxes kept loaded (_evict)
        self._account_locks: dict[str, asyncio.Lock] = {}
        self.group_writer = GroupWriter()  # deliveries: group commit (groupwrite.py)
        # The background indexer (store/background.py) when one runs: asked to add the
        # full-text rows a search found missing (fts.MailboxFulltext.fill_later) and to write
        # the index lines a cold listing kept in memory (_State.write_later); None: nothing
        # is left for later, searches and listings write what they make themselves
        self._background = None

    def set_background(self, indexer) -> None:
        self._background = indexer
        for (acct, name), st in self._states.items():
            self._later_hooks(st, acct, name)

    def _later_hooks(self, st: _State, acct: str, name: str) -> None:
        bg = self._background
        st.fulltext.fill_later = None if bg is None else (lambda: bg.want_fulltext(acct, name))
        # the indexer's method, called with the state: a closure over `st` would make each
        # state a reference cycle, freed only by the cyclic collector once evicted (~50 MiB
        # of mailboxes kept after the background pass)
        st.write_later = None if bg is None else bg.want_index_lines

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
        fresh = st is None
        if fresh:
            st = _State(acct, name, self.mailbox_dir(acct, name), self.account_dir(acct))
            self._later_hooks(st, acct, name)
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
        if fresh:  # one more mailbox loaded: the idle ones may be over their bounds now
            self._evict(keep=key)
        return st

    def _evict(self, keep: tuple[str, str] | None = None) -> None:
        """Forget loaded mailboxes that no session holds, until at most MAX_IDLE_STATES
        mailboxes are loaded and the idle ones hold at most `idle_messages` messages
        together.  `keep` (the one being opened, or the one a client has just left: logging
        in again, it finds it loaded) is neither counted nor let go.  An idle mailbox bigger
        than the whole budget goes first; then the least recently used ones: by recency
        alone, one such mailbox would push out every other."""
        budget = self.idle_messages
        over = len(self._states) - MAX_IDLE_STATES
        idle = [(key, st) for key, st in self._states.items()  # (index lines not yet written: kept)
                if st.refs <= 0 and key != keep and not st.lock.locked()
                and (st.index is None or not st.index.unwritten)]
        total = sum(len(st.entries) for _, st in idle)
        if over <= 0 and total <= budget:
            return
        idle.sort(key=lambda item: len(item[1].entries) <= budget)  # stable: oldest first in each
        for key, st in idle:
            if over <= 0 and total <= budget:
                break
            del self._states[key]
            self._derived_kept.pop(id(st), None)
            over -= 1
            total -= len(st.entries)

    def _release(self, st: _State) -> None:
        if st.refs <= 0:
            key = (st.account, st.name)
            if self._states.get(key) is st:  # the mailbox just left is the most recently used
                self._states[key] = self._states.pop(key)
                self._evict(keep=key)
            if st.index is None or not st.index.unwritten:  # else kept until written (write_unwritten)
                st.index = None  # the biggest part; reloaded on demand
            st.fulltext.release()
            if st.derived:  # the next session's SORT / THREAD reuse it: kept for the last few
                self._derived_kept.pop(id(st), None)
                self._derived_kept[id(st)] = st
                while len(self._derived_kept) > DERIVED_KEPT:
                    old = self._derived_kept.pop(next(iter(self._derived_kept)))
                    if old.refs <= 0:
                        old.derived = {}

    def trim_idle(self) -> None:
        """Hold the idle mailboxes to their bounds, the one just left included (the
        background indexer after each mailbox: it is no client coming back)."""
        self._evict()

    def drop_if_idle(self, account: str, name: str) -> None:
        """Forget a mailbox's loaded state when no session holds it (the background indexer,
        after a big mailbox: what it loaded is no client's cache, and would stay resident)."""
        key = (names.normalize_account(account), names.normalize(name))
        st = self._states.get(key)
        if (st is not None and st.refs <= 0 and not st.lock.locked()
                and (st.index is None or not st.index.unwritten)):  # lines to write: kept until written
            del self._states[key]
            self._derived_kept.pop(id(st), None)

    def _forget(self, account: str, name: str) -> set[str]:
        """Drop states of a renamed mailbox and its children; publish "deleted" for them."""
        told = set()
        for key in list(self._states):
            if key[0] == account and (key[1] == name or key[1].startswith(name + "/")):
                st = self._states.pop(key)
                if st.index is not None:  # lines kept for later belong to the old directory
                    st.index.unwritten = set()
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
            size = message.length
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
