"""Group commit of Maildir deliveries: every delivery that arrives while the previous
batch's files are being written joins the next batch, and a batch costs ONE journal commit
before its deliveries are acknowledged.

One delivery done the classic way costs two journal commits in a row (the file's fsync
before its rename into new/, then the directory's fsync after it) and, done one by one,
two hand-offs to worker threads.  A batch here is one worker-thread call:

    1. write every message to tmp/<name>.crc<crc32>        (page cache only)
       -> the next batch may start: its files are written while this batch's fsyncs wait
          for the disk (the two steps overlap instead of following each other)
    2. fsync all those files and their tmp/ directories at the same time
       (fsutil.fsync_together: they share ONE commit, which also holds the new tmp/
       entries; the entries exist already, so the order of the syncs does not matter)
    3. rename each into new/<name> (or cur/)               (a reader never sees a partial file)
    4. -> the deliveries are told "durable": their "250" may go out
    5. fsync the new/ directories                          (one more commit, after the 250)
    6. the bytes in hand go to the store's DerivedWriter (derived.py), which writes the
       metadata-index entries and full-text rows of many deliveries at once, later, and
       calls `on_indexed(entry)` on the loop (derived data: a message it never reached is
       indexed when first looked at)

Why acknowledging after step 3 (before 5) loses nothing: after step 2 the whole file and
the directory entry naming it are on disk (file and directory fsynced), in tmp/.  The
rename is atomic in the journal: after a crash the file is either in new/ or still in
tmp/ under its checksummed name, and `recover_tmp` (run by clean_stale_tmp at server
start, for every file older than the process) moves every tmp/ file whose bytes match the crc32 in
its name into new/ (or cur/) under the name it was going to have; a file whose bytes do
not match was cut short by the crash before it was acknowledged, and is removed as
before.  A message made durable but not yet acknowledged when the server died is
delivered too: a duplicate at worst, which RFC 5321 section 6.1 allows; a loss never.

Messages streamed from a queue file (MessageSource, no bytes in memory) keep the classic
order: their directory is fsynced in step 3 before they are told.  A file whose write,
fsync or rename failed is removed and reported as that delivery's error; the others of
the batch are not held back.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
import zlib
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from ..fsutil import fsync_together, lazy_pool
from .base import MessageSource
from .derived import DerivedWriter

log = logging.getLogger("mailstack.store")

MAX_BATCH = 128  # deliveries in one worker call
MAX_BATCH_BYTES = 16 << 20  # ... and bytes (a big message waits for no more than this)
INDEX_MAX = 16 << 20  # bigger messages are indexed when first looked at (maildir.INDEX_AT_DELIVERY_MAX)

# The batches' own threads (not the loop's default executor): a call there ends with a
# wake-up of the loop (run_in_executor's future), i.e. after step 5 — a second wake-up a
# message for a lone session, paid in loop CPU.  Here the end of a call is collected on the
# loop's next pass through the writer (or COLLECT_AFTER later), without waking it.  Batch
# N+2 may start while N and N+1 are still in step 5: four threads keep it from queueing.
WORKERS = 4
COLLECT_AFTER = 0.05  # seconds: how late a finished call's step 6 may be handed on
_workers = lazy_pool(WORKERS, "mailstack-maildir")


CRC_SUFFIX = re.compile(r"\.crc([0-9a-f]{8})$")  # tmp/<name>.crc<crc32 of the bytes>


class _Item:
    __slots__ = ("mailbox_dir", "base", "sub", "name", "message", "uidvalidity", "on_indexed", "future",
                 "error", "size", "dir")

    def __init__(self, mailbox_dir: Path, base: str, sub: str, name: str, message, uidvalidity: int,
                 on_indexed, future) -> None:
        self.mailbox_dir, self.base, self.sub, self.name = mailbox_dir, base, sub, name
        self.message, self.uidvalidity, self.on_indexed, self.future = message, uidvalidity, on_indexed, future
        self.error: BaseException | None = None
        self.size = message.length if isinstance(message, MessageSource) else len(message)
        self.dir = os.fspath(mailbox_dir)  # the worker joins strings: pathlib cost it ~8 % of its time

    @property
    def tmp(self) -> str:
        """Bytes in hand get a checksummed name that recover_tmp trusts after a crash."""
        if isinstance(self.message, MessageSource):
            return f"{self.dir}/tmp/{self.base}"
        return f"{self.dir}/tmp/{self.name}.crc{zlib.crc32(self.message):08x}"


class GroupWriter:
    """Used on the event loop by MaildirStore.deliver (one per store)."""

    def __init__(self) -> None:
        self.derived = DerivedWriter()  # step 6
        self._pending: list[_Item] = []
        self._running = False
        self._work: set[Future] = set()  # worker calls not collected (their indexing included)
        self._finished: collections.deque = collections.deque()  # (call, batch, durable), from workers
        self._collector: asyncio.TimerHandle | None = None
        self.batches = 0  # counters, for tests and the benchmark notes
        self.written = 0

    async def write(self, mailbox_dir: Path, base: str, sub: str, name: str, message: "bytes | MessageSource",
                    uidvalidity: int, on_indexed: Callable[[dict | None], None] | None = None) -> None:
        """Returns once the message is durable (its file and the tmp/ directory fsynced) and
        renamed to <mailbox_dir>/<sub>/<name>; raises what writing it raised (the file is
        then gone).  See the module doc for why the rename need not be durable yet."""
        loop = asyncio.get_running_loop()
        item = _Item(mailbox_dir, base, sub, name, message, uidvalidity, on_indexed, loop.create_future())
        self._pending.append(item)
        if self._finished:
            self._collect()
        if not self._running:
            # Handed to a worker at the end of this loop cycle, with every delivery the cycle
            # adds (a callback: a task for it, as before, cost more for the same).
            self._running = True
            loop.call_soon(self._next_batch, loop)
        await item.future

    def _next_batch(self, loop) -> None:
        """On the loop: hand the next batch to a worker; when its files are written (or it
        ended), the one after it starts (its `durable`, "the next may begin").  The batches'
        step 1 (file creation, CPU in the kernel) thus follows one after the other, and each
        overlaps the previous batch's fsyncs (the wait for the disk): one after the other,
        the two steps made a 10-message batch take ~2.4 + ~2.1 ms at 20 sessions, and the
        rate was the batches' (session 6).  Batches in flight are bounded by WORKERS."""
        while self._pending:
            batch = self._take()
            state = [False]  # this batch's "durable" was signalled: the next batch has begun

            def durable(batch=batch, state=state) -> None:  # on the loop, once per batch
                if not state[0]:
                    state[0] = True
                    self.batches += 1
                    self.written += len(batch)
                    self._next_batch(loop)

            def released(batch=batch, durable=durable) -> None:  # on the loop, from the worker
                self._release(batch)
                durable()
                if self._collector is None:  # this call's end is collected at the latest then
                    self._collector = loop.call_later(COLLECT_AFTER, self._collect_later)

            def written_if_waited(durable=durable, state=state) -> None:  # in the worker: wake
                if self._pending and not state[0]:  # the loop only when a next batch is waiting
                    loop.call_soon_threadsafe(durable)

            try:
                work = _workers().submit(_write_batch, batch, written_if_waited,
                                         functools.partial(loop.call_soon_threadsafe, released))
            except RuntimeError as e:  # the interpreter is shutting down: nothing was written
                for item in batch:
                    item.error = OSError(f"delivery not written: {e}")
                self._release(batch)
                continue
            self._work.add(work)
            work.add_done_callback(functools.partial(self._ended, loop, batch, durable))
            return
        self._running = False

    def _ended(self, loop, batch: list[_Item], durable: Callable[[], None], work: Future) -> None:
        """In the worker, as its call ends: noted for the loop, which is woken only when the
        call failed (its deliveries may not have been told anything yet)."""
        self._finished.append((work, batch, durable))
        if work.cancelled() or work.exception() is not None:
            try:
                loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _collect(self) -> None:
        """On the loop: step 6 and the bookkeeping of every worker call that ended."""
        while self._finished:
            _after(*self._finished.popleft(), self)

    def _collect_later(self) -> None:
        self._collector = None
        self._collect()
        if self._work:
            self._collector = asyncio.get_running_loop().call_later(COLLECT_AFTER, self._collect_later)

    async def settled(self) -> None:
        """Returns when every delivery so far is written AND indexed (tests, shutdown)."""
        while self._pending or self._work:
            self._collect()
            if self._work:
                await asyncio.wait([asyncio.wrap_future(f) for f in self._work])
                self._collect()  # _ended ran before the wait's own callback: all are there
            elif self._pending:
                await asyncio.sleep(0.001)
        await self.derived.flush()

    def _take(self) -> list[_Item]:
        n, size = 0, 0
        for item in self._pending:
            if n and (n >= MAX_BATCH or size + item.size > MAX_BATCH_BYTES):
                break
            n += 1
            size += item.size
        batch, self._pending = self._pending[:n], self._pending[n:]
        return batch

    @staticmethod
    def _release(batch: list[_Item]) -> None:
        for item in batch:
            if item.future.done():
                continue
            if item.error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(item.error)


def _after(work: Future, batch: list[_Item], durable: Callable[[], None], writer: GroupWriter) -> None:
    """The worker call ended: if it died before releasing its deliveries (a bug), fail them;
    hand what was written on to the derived data (step 6)."""
    writer._work.discard(work)
    exc = None if work.cancelled() else work.exception()
    if exc is not None:
        log.error("group write failed: %r", exc)
    if exc is not None or work.cancelled():
        for item in batch:  # failed first: a message that is not on disk gets no index entry
            if item.error is None and not item.future.done():
                item.error = exc or OSError("delivery write cancelled")
        writer._release(batch)
    loop = asyncio.get_running_loop()
    if not getattr(loop, "_executor_shutdown_called", False):  # else: made when first looked at
        for item in batch:  # step 6: derived data, in batches of their own
            if item.error is None and isinstance(item.message, bytes) and item.size <= INDEX_MAX:
                writer.derived.add(item.mailbox_dir, item.base, item.uidvalidity, item.message, item.on_indexed)
    durable()


# ---------------------------------------------------------------- blocking (worker thread)

def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_file(item: _Item, tmp: str) -> int:
    """tmp/... with the message; the open descriptor (not yet fsynced)."""
    from .maildir import _copy_from_source, _write_all  # the Maildir's own copy routines
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if isinstance(item.message, MessageSource):
            _copy_from_source(item.message, fd)
        else:
            _write_all(fd, item.message)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    return fd


def _write_batch(batch: list[_Item], written: Callable[[], None], released: Callable[[], None]) -> None:
    try:
        dirs = _make_durable(batch, written)
    except BaseException as e:  # a bug: report every delivery not yet known good as failed
        for item in batch:
            if item.error is None:
                item.error = e if isinstance(e, Exception) else OSError(str(e))
        released()
        raise
    released()
    _sync_renamed(dirs)
    _read_streamed(batch)


def _make_durable(batch: list[_Item], written: Callable[[], None] = lambda: None) -> list[str]:
    """Steps 1-3 of the module doc.  Returns the directories still to fsync (step 5).
    `written` is called when the files are written (the next batch may begin) and again
    after their fsyncs (for a delivery that came after the first call)."""
    opened: list[tuple[_Item, str, int]] = []
    tmp_dirs: set[str] = set()
    for item in batch:
        try:
            tmp = item.tmp
            opened.append((item, tmp, _write_file(item, tmp)))
            if not isinstance(item.message, MessageSource):
                tmp_dirs.add(f"{item.dir}/tmp")
        except Exception as e:  # noqa: BLE001 - that delivery's error (a full disk, ...)
            item.error = e
    written()
    try:
        # The files and tmp/ itself at the same time: every entry already exists, so the
        # order of the syncs does not matter, only that all have returned.  One after the
        # other cost two device cache flushes in a row before the "250" (on ext4 without a
        # journal a directory's fsync flushes the cache even when nothing is left to write).
        errors, dir_errors = fsync_together([fd for _, _, fd in opened], sorted(tmp_dirs))
    finally:
        for _, _, fd in opened:
            os.close(fd)
        written()
    renamed: dict[str, list[_Item]] = {}
    streamed: set[str] = set()  # directories that must be fsynced before their deliveries are told
    for (item, tmp, _), err in zip(opened, errors):
        if err is None and not isinstance(item.message, MessageSource):
            err = dir_errors.get(f"{item.dir}/tmp")
        if err is None:
            try:
                d = f"{item.dir}/{item.sub}"
                os.rename(tmp, f"{d}/{item.name}")
                renamed.setdefault(d, []).append(item)
                if isinstance(item.message, MessageSource):
                    streamed.add(d)
                continue
            except OSError as e:
                err = e
        item.error = err
        _unlink_quietly(tmp)
    if streamed:
        _, dir_errors = fsync_together([], sorted(streamed))
        for d in streamed:
            if dir_errors.get(d) is not None:  # the name may not survive a crash: the sender retries
                for item in renamed[d]:
                    if isinstance(item.message, MessageSource):
                        item.error = dir_errors[d]
    return sorted(set(renamed) - streamed)


def _sync_renamed(dirs: list[str]) -> None:
    """Step 5: the renames of acknowledged deliveries made durable (until then a crash
    leaves them in tmp/, where recover_tmp finds them)."""
    if not dirs:
        return
    _, errors = fsync_together([], dirs)
    for d, err in errors.items():
        if err is not None:
            log.error("fsync of %s failed after delivery (%s): its messages are recovered from tmp/ "
                      "at the next start if the rename is lost", d, err)


def recover_tmp(tmp: str, entry: str) -> bool | None:
    """Blocking, at server start only (clean_stale_tmp): a tmp/ file a crash left.  True: it
    was a complete delivery (bytes match the crc32 in its name) and is now in new/ or cur/;
    False: a checksummed name whose bytes do not match (cut short): removed;  None: not one
    of ours (the caller decides)."""
    m = CRC_SUFFIX.search(entry)
    if m is None:
        return None
    path = os.path.join(tmp, entry)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if zlib.crc32(data) != int(m.group(1), 16):
        _unlink_quietly(path)
        return False
    name = entry[:m.start()]
    mailbox_dir = os.path.dirname(tmp)
    sub = "cur" if ":2," in name else "new"
    os.rename(path, os.path.join(mailbox_dir, sub, name))
    fsync_together([], [os.path.join(mailbox_dir, sub)])
    log.warning("recovered %s into %s/ (its rename was lost in a crash)", name, os.path.join(mailbox_dir, sub))
    return True


def _read_streamed(batch: list[_Item]) -> None:
    """Messages streamed from a queue file: their bytes, read back for step 6 (the queue
    file may be gone by the time the derived data is written)."""
    for item in batch:
        if item.error is None and isinstance(item.message, MessageSource) and item.size <= INDEX_MAX:
            try:
                item.message = item.message.read()
            except OSError:  # indexed when first looked at
                pass
