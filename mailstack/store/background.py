"""The background indexer: after the start, mail that arrived behind the server's back
(an operator's `cp -a` / `rsync` of old Maildirs, `mailstack import`, a restore, a person
with `mv`) is given its metadata-index entry and its full-text rows, so that a user's first
login after a migration is as fast as the next ones.

Without it such mail is parsed when a client first asks: the first `FETCH 1:* (...
ENVELOPE)` of 10,000 messages reads and parses 10,000 files while the client waits, and so
does the first `SEARCH BODY` (docs/benchmarks.md, issue 16).

What it does, once per start, one mailbox at a time (accounts found on disk, as the
start's tmp/ cleaning finds them):

* opens the mailbox through the store (`store.open`, read-only): the same scan, UIDs and
  locks a client's SELECT uses, so a client opening, expunging or delivering meanwhile
  sees exactly what it would without the indexer;
* finds what the indexes lack, without reading a message: the index file's lines (a line
  that FETCH, SEARCH, SORT and POP3's STAT can all answer from is `complete`) and the
  full-text index's documents;
* reads the others in small batches, one worker-thread call each, and indexes them with
  the code of a client's first look (no second parser): the first listing's entry
  (`fetch.header_entry`: ENVELOPE, the header texts SEARCH uses, the SORT keys) with
  POP3's size (`sizes.size_entry`), appended as lines keyed by base name (right whatever
  UIDs and UIDVALIDITY say later, as a delivery's are), and the first body search's
  full-text rows (`fts.index_files`).  What it made is noted into the loaded indexes of
  the mailbox as a delivery's is (`MaildirStore._note_indexed`), and its header texts and
  sort keys kept in memory as a first listing keeps them.  BODYSTRUCTURE is left to the
  first FETCH that asks for it (a full MIME parse costs ~10 times the header's).

Why it stays out of the way: one task, one worker-thread call at a time, BATCH messages
(or BATCH_BYTES) per call; between batches it looks at how much CPU the rest of the process
used meanwhile and, while that is more than BUSY_SHARE of the time (sessions, deliveries,
a client's own first FETCH), or SMTP / POP3 sessions are open (`busy`), or a client has
the mailbox open, it waits (MAX_WAIT at most).  Messages bigger than the delivery's limit (INDEX_AT_DELIVERY_MAX) are left to
the first look, as at delivery: memory stays bounded by one batch, and the index file is
scanned line by line, never loaded whole, unless a session has it loaded already.

It also does what a client's first look leaves for after its answer (issue 16, session 6):
the full-text rows of messages a search answered for by a plain scan (`want_fulltext`,
asked by fts.MailboxFulltext.fill_later), and the index lines of the entries a cold
listing kept in memory (`want_index_lines`, asked by the mailbox state's
cache_put_later).  One more task does these in the order asked, each after the process
was quiet for a moment; its full-text batches wait as the pass's do (but not for the client
to close the mailbox: its searches would scan until then).  At a stop the pending index
lines are written.  Either kind lost in a crash is derived data made again when next
needed.

Nothing to do is cheap: on a restart with everything indexed it reads the index file and
the full-text document list of each mailbox, never a message.

Stopping: `stop()` lets the batch in its worker thread finish (its lines are whole; the
index files are crash-safe either way) and ends the task before the loop closes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Callable

from ..fsutil import atomic_write
from . import derived as dermod
from . import fts
from . import index as idxmod
from .base import StoreError
from .maildir_files import INDEX_AT_DELIVERY_MAX

log = logging.getLogger("mailstack.store")

BATCH = 100  # messages per worker-thread call (~25-70 ms of work on one core)
BATCH_BYTES = 4 << 20  # ... or this many bytes read
BUSY_SHARE = 0.25  # other work of the process, as a share of one core, that makes it wait
PAUSE = 0.2  # seconds waited (and measured) while the process is busy
MAX_WAIT = 30.0  # ... at most, then one batch anyway (a server never idle still gets there)
# Full-text rows added after a search that scanned: per worker call.  Larger than BATCH: the
# SQLite writer thread's CPU counts as the process being busy, so each call is followed by
# at least one PAUSE.
FILL_BATCH = 250
STOP_WAIT = 10.0  # seconds stop() waits for the batch in flight
# Mailboxes up to this size keep the header texts and sort keys of what was indexed in
# memory (search.py's HeaderTexts, sort.py's Keys, in Mailbox.derived(), as a first listing
# leaves them): a first SEARCH SUBJECT or SORT then parses no index line.  Bigger ones do
# not (~1-2 KB a message, for mailboxes no client may open soon), and their loaded state is
# dropped from the store's cache once indexed, unless a client has them open: a
# 100,000-message mailbox left loaded kept the server at ~350 MiB instead of ~130.  The
# smaller ones stay loaded only within the store's budget of idle mailboxes
# (server.mailbox_cache_messages), the most recently indexed first.
NOTE_MAX = 20000


def _complete_pattern() -> "re.Pattern[bytes]":
    """A line that a first listing (ENVELOPE), header SEARCH and POP3's STAT answer from
    without the message: the current entry version with its envelope first (_dumps puts
    "v" and "env" there), the header texts and the POP3 size.  Keys elsewhere are found by
    their quoted name followed by a colon, which a JSON string cannot hold unescaped.  A
    false "no" only costs one message parsed again."""
    from ..imap import fetch
    from ..pop3 import sizes
    return re.compile(rb'\{"v":%d,"env":"(?=.*"hs":\{)(?=.*"%s":\{"size":\d+,"v":%d\})'
                      % (fetch.CACHE_VERSION, sizes.CACHE_KEY.encode(), sizes.CACHE_VERSION))


def indexed_in_file(path: Path, uidvalidity: int) -> tuple[bool, set[int], set[str]]:
    """Blocking: (header is this UIDVALIDITY's or no file, UIDs and base names whose line
    in the index file is complete), read line by line (a 100,000-message index is ~110 MB:
    never held whole).  The last line of a UID counts (a later one replaces it when the
    index is loaded); a delivered (=base) line is merged into it, so either counts."""
    uids: set[int] = set()
    bases: set[str] = set()
    complete = _complete_pattern().match
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return True, uids, bases
    with f:
        header = f.readline()
        if header.rstrip(b"\n") != b"V%d" % uidvalidity:
            return header == b"", uids, bases
        for line in f:
            key, _, js = line.partition(b" ")
            if key.isdigit():
                if complete(js):
                    uids.add(int(key))
                else:
                    uids.discard(int(key))
            elif key.startswith(b"=") and complete(js):
                bases.add(key[1:].decode("utf-8", "surrogateescape"))
    return True, uids, bases


def _index_batch(root: str, batch: list[tuple[str, str, str]], uidvalidity: int
                 ) -> tuple[dict[str, dict], float]:
    """Blocking: index these files (base, sub, name) with the code of a first look: the
    first listing's entry (fetch.header_entry) with POP3's size (sizes.size_entry), appended
    to the index file as lines keyed by base name (right whatever the UIDs are later); the
    first body search's rows (fts.index_files).  Returns base -> entry ("fts": True when its
    rows were added) and this thread's CPU.  A file renamed meanwhile (a flag change, new/
    to cur/) is skipped: indexed when first looked at."""
    from ..imap import fetch  # the store stays importable without the protocol packages
    from ..pop3 import sizes
    t0 = time.thread_time()
    entries: dict[str, dict] = {}
    files = []
    for base, sub, name in batch:
        path = f"{root}/{sub}/{name}"
        try:
            data = fts._read(path)  # type: ignore[arg-type]
        except FileNotFoundError:
            continue
        time.sleep(0)  # the loop gets the GIL between two messages, not after 5 ms (derived.py)
        try:
            entry = fetch.header_entry(data)
            entry[sizes.CACHE_KEY] = sizes.size_entry(data)
        except Exception:  # noqa: BLE001 - a parser bug must not stop the rest: done when first looked at
            log.warning("background index: could not index %s", path, exc_info=True)
            continue
        entries[base] = idxmod.Plain(entry)
        files.append((base, Path(path)))
    if entries:
        lines = [idxmod.delivered_line(base, e) for base, e in entries.items()]
        try:
            with dermod._append_lock:  # two writers must not both create the file
                idxmod.append_lines(Path(root) / idxmod.NAME, uidvalidity, lines)
        except OSError as e:  # a full disk: made when first looked at
            log.warning("background index: cannot append to the index of %s: %s", root, e)
            entries = {}
    try:
        for base in fts.index_files(Path(root) / fts.NAME, files):
            if base in entries:
                entries[base]["fts"] = True
    except (sqlite3.Error, OSError) as e:  # added at the next search
        log.warning("full-text index of %s not updated (%s): filled at the next search", root, e)
    return entries, time.thread_time() - t0


def _fill_batch(path: Path, files: list[tuple[str, Path]]) -> tuple[set[str], float]:
    """Blocking: the full-text rows of these files (fts.index_files: the first search's
    code); the bases added, and this thread's CPU.  A file renamed meanwhile is skipped:
    added by the next search that needs it."""
    t0 = time.thread_time()
    added = fts.index_files(path, files)
    return added, time.thread_time() - t0


class BackgroundIndexer:
    """Used on the event loop; one per server (server.py), over its MaildirStore (the Maildir
    files, the mailbox states and their indexes are what it works on)."""

    def __init__(self, store, busy: Callable[[], bool] | None = None) -> None:
        self.store = store
        # True while short-lived sessions (SMTP, POP3) are open: on a loaded machine the
        # process's own CPU share can look low while they wait for a core
        self.busy = busy or (lambda: False)
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.done = asyncio.Event()
        self.mailboxes = 0  # counters: tests and the bench read them through the log
        self.messages = 0
        # Work left for after a client's answer, done by one more task in the order asked:
        # ("fts", account, mailbox) -> None: full-text rows a search found missing (it
        # scanned instead, fts.MailboxFulltext.fill_later); ("lines", id) -> mailbox state:
        # index lines of a cold listing's entries, kept in memory (_State.cache_put_later)
        self._fill: dict[tuple, object] = {}
        self._filler: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.store.set_background(self)

    async def stop(self) -> None:
        self._stopping = True
        self.store.set_background(None)  # searches and listings write on the way again
        for task in (self._task, self._filler):
            if task is None or task.done():
                continue
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_WAIT)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for key, st in list(self._fill.items()):  # lines kept in memory: written now, not lost
            if key[0] == "lines":
                await self._write_lines(st)
        self._fill.clear()

    # -- work left for after an answer ----------------------------------------------------------

    def want_index_lines(self, st) -> None:
        """A cold listing kept entries whose index lines are not written: write them once
        the process is quiet (its next commands go first; a crash loses only lines)."""
        if self._stopping:
            return
        self._fill[("lines", id(st))] = st
        self._start_filler()

    async def _write_lines(self, st) -> None:
        try:
            await st.write_unwritten()
        except OSError as e:  # a full disk: the lines are made again when next needed
            log.warning("background index: index lines of %s/%s not written: %s", st.account, st.name, e)

    def want_fulltext(self, account: str, name: str) -> None:
        """A search answered by scanning messages without full-text rows: add their rows
        after it, in batches that wait while the process is busy, so the next search is
        answered from the index (a client keeping the mailbox open does not hold them back:
        its searches would scan until then)."""
        if self._stopping:
            return
        self._fill[("fts", account, name)] = None
        self._start_filler()

    def _start_filler(self) -> None:
        if self._filler is None or self._filler.done():
            self._filler = asyncio.get_running_loop().create_task(self._fill_all())

    async def _fill_all(self) -> None:
        while self._fill and not self._stopping:
            await self._yield(0.0, 0.0, lambda: False, first=True)  # the client's next commands first
            if self._stopping:
                break
            key = next(iter(self._fill))
            st = self._fill.pop(key)
            if key[0] == "lines":
                await self._write_lines(st)
                continue
            _, account, name = key
            t0 = time.monotonic()
            try:
                mbox = await self.store.open(account, name, read_only=True)
            except (StoreError, OSError) as e:
                log.warning("background index: cannot open %s/%s: %s", account, name, e)
                continue
            try:
                count = await self._fill_mailbox(mbox)
            except (StoreError, OSError, sqlite3.Error) as e:
                log.warning("background full-text rows of %s/%s cut short: %s", account, name, e)
                count = 0
            except Exception:  # noqa: BLE001 - derived data: the next search adds what is left
                log.exception("background full-text rows of %s/%s stopped by an error", account, name)
                count = 0
            finally:
                await mbox.close()
            if count:
                log.info("background index: %s/%s: full-text rows of %d messages in %.2f s", account, name,
                         count, time.monotonic() - t0)

    async def _fill_mailbox(self, mbox) -> int:
        st = mbox._st
        root = os.fspath(st.path)
        async with st.fulltext.lock:
            in_fts, _ = await asyncio.to_thread(fts.indexed, st.fulltext.path)
        todo = [m.uid for m in mbox.messages if m.key not in in_fts]
        done = 0
        for i in range(0, len(todo), FILL_BATCH):
            if self._stopping:
                break
            files = [(e.base, Path(f"{root}/{e.sub}/{e.name}")) for uid in todo[i:i + FILL_BATCH]
                     if (e := st.entries.get(uid)) is not None and e.size <= INDEX_AT_DELIVERY_MAX]
            if not files:
                continue
            cpu0, wall0 = time.process_time(), time.monotonic()
            async with st.fulltext.lock:  # a search adding rows waits for these, not the reverse
                added, mine = await asyncio.to_thread(_fill_batch, st.fulltext.path, files)
                if st.fulltext.bases is not None:
                    st.fulltext.bases.update(added)
            done += len(added)
            await self._yield(time.process_time() - cpu0 - mine, time.monotonic() - wall0, lambda: False)
        return done

    # -- the walk ---------------------------------------------------------------------------

    async def _run(self) -> None:
        t0 = time.monotonic()
        try:
            for account in await asyncio.to_thread(_accounts, self.store.root):
                if self._stopping:
                    break
                try:
                    boxes = await self.store.list_mailboxes(account)
                except (StoreError, OSError) as e:
                    log.warning("background index: cannot list the mailboxes of %s: %s", account, e)
                    continue
                for box in boxes:
                    if self._stopping:
                        break
                    if box.selectable:
                        await self._mailbox(account, box.name)
        except Exception:  # noqa: BLE001 - derived data: what is left is indexed when first looked at
            log.exception("background index stopped by an error")
        finally:
            self.done.set()
        if self._stopping:
            log.info("background index: stopped (%d messages in %d mailboxes indexed)", self.messages, self.mailboxes)
        else:
            log.info("background index: done in %.1f s (%d messages in %d mailboxes indexed)",
                     time.monotonic() - t0, self.messages, self.mailboxes)

    async def _mailbox(self, account: str, name: str) -> None:
        store = self.store
        try:
            mbox = await store.open(account, name, read_only=True)
        except (StoreError, OSError) as e:
            log.warning("background index: cannot open %s/%s: %s", account, name, e)
            return
        t0 = time.monotonic()
        try:
            count = await self._index(mbox)
        except (StoreError, OSError, sqlite3.Error) as e:
            log.warning("background index of %s/%s cut short: %s", account, name, e)
            count = 0
        finally:
            big = len(mbox.messages) > NOTE_MAX
            await mbox.close()
        if big:  # its state (~2 KB a message) would stay in the store's cache of idle mailboxes
            store.drop_if_idle(account, name)
        store.trim_idle()  # what the pass loaded stays only within the idle mailboxes' budget
        if count:
            self.mailboxes += 1
            self.messages += count
            log.info("background index: %s/%s: %d messages in %.2f s", account, name, count,
                     time.monotonic() - t0)

    async def _index(self, mbox) -> int:
        st = mbox._st
        uidvalidity = mbox.uidvalidity
        todo = await self._missing(mbox)
        root = os.fspath(st.path)
        note = len(mbox.messages) <= NOTE_MAX
        done = 0
        i = 0
        while i < len(todo) and not self._stopping:
            batch: list[tuple[str, str, str]] = []
            uid_of: dict[str, int] = {}
            size = 0
            while i < len(todo) and len(batch) < BATCH and size < BATCH_BYTES:
                e = st.entries.get(todo[i])  # where the file is now (flag changes rename it)
                i += 1
                if e is not None and e.size <= INDEX_AT_DELIVERY_MAX:
                    batch.append((e.base, e.sub, e.name))
                    uid_of[e.base] = e.uid
                    size += e.size
            if not batch:
                continue
            if st.ul.uidvalidity != uidvalidity:
                break  # the mailbox was recreated under us: its next opener starts over
            cpu0, wall0 = time.process_time(), time.monotonic()
            async with st.fulltext.lock:  # a search adding rows waits for these, not the reverse
                entries, mine = await asyncio.to_thread(_index_batch, root, batch, uidvalidity)
                made = {uid_of[base]: entry for base, entry in entries.items()}
                for base, entry in entries.items():
                    self.store._note_indexed(st, base, entry)  # as for a delivery
            if note and st.ul.uidvalidity == uidvalidity:
                note_listed(mbox.derived(), made)
            done += len(made)
            # a client on this very mailbox goes first (its refs count; ours is one of them)
            await self._yield(time.process_time() - cpu0 - mine, time.monotonic() - wall0,
                              lambda: st.refs > 1)
        return done

    async def _missing(self, mbox) -> list[int]:
        """UIDs of the messages of the view that lack a complete index line or full-text rows."""
        st = mbox._st
        if not mbox.messages:
            return []
        uidvalidity = mbox.uidvalidity
        path = st.path / idxmod.NAME
        header_ok, have_uids, have_bases = await asyncio.to_thread(indexed_in_file, path, uidvalidity)
        if not header_ok:  # of an older UIDVALIDITY: ignored when loaded; appended to, it would stay so
            async with st.cache_lock:
                await asyncio.to_thread(_restart_index_file, path, uidvalidity)
        async with st.fulltext.lock:
            try:
                in_fts, _ = await asyncio.to_thread(fts.indexed, st.fulltext.path)
            except sqlite3.Error as e:  # damaged: dropped, as a search would
                log.warning("full-text index of %s/%s unusable (%s): rebuilt", st.account, st.name, e)
                st.fulltext.bases = None
                await asyncio.to_thread(fts.drop, st.fulltext.path)
                in_fts = set()
        out = []
        for m in mbox.messages:
            if m.key not in in_fts or (m.uid not in have_uids and m.key not in have_bases):
                out.append(m.uid)
        return out

    async def _yield(self, others_cpu: float, wall: float, in_use: Callable[[], bool], first: bool = False) -> None:
        """Let sessions go first: while the rest of the process used more than BUSY_SHARE of
        a core since the last look, or `busy()` says so, or a client has the mailbox open,
        wait and look again (MAX_WAIT at most).  `first`: nothing measured yet, look once."""
        await asyncio.sleep(0)
        waited = 0.0
        if first:
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(PAUSE)
            others_cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            waited = wall
        while not self._stopping and waited < MAX_WAIT and \
                ((wall > 0 and others_cpu / wall > BUSY_SHARE) or self.busy() or in_use()):
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(PAUSE)
            others_cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            waited += wall


def note_listed(derived: dict, entries: dict[int, dict]) -> None:
    """What a first listing keeps of the entries it made (imap/fetching.py _cache_entries)."""
    from ..imap import search, sort  # the store stays importable without the protocol packages
    sort.note_listed(derived, entries)
    search.note_listed(derived, entries)


def _restart_index_file(path: Path, uidvalidity: int) -> None:
    """Blocking, under the state's cache_lock: an index file of another UIDVALIDITY, which a
    load ignores whole, is replaced by an empty one of this UIDVALIDITY."""
    header_ok, _, _ = indexed_in_file(path, uidvalidity)
    if not header_ok:
        atomic_write(path, b"V%d\n" % uidvalidity)


def _accounts(root: Path) -> list[str]:
    """Blocking: the accounts with a Maildir on disk (<root>/<domain>/<local>/cur)."""
    out = []
    try:
        domains = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for domain in domains:
        if not domain.is_dir(follow_symlinks=False):
            continue
        try:
            locals_ = sorted(os.scandir(domain.path), key=lambda e: e.name)
        except OSError:
            continue
        for local in locals_:
            if local.is_dir(follow_symlinks=False) and os.path.isdir(os.path.join(local.path, "cur")):
                out.append(f"{local.name}@{domain.name}")
    return out
