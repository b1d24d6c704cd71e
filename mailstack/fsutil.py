"""Durable file helpers shared by the spool, the store and the directory.

Everything here blocks: call it from a worker thread (asyncio.to_thread) when on
the event loop, except for the tiny files the CLI writes.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that a reader sees the old or the new file, never a mix,
    and the new one survives a crash once this returns (file and directory fsynced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave no temporary file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


# fsyncs issued at the same time are merged by the file system (ext4/xfs journal) into one
# commit: N files synced together cost about what one costs, N synced one after another
# cost N times as much.  A small private set of threads runs them side by side; it only ever
# waits on the disk, so it does not compete with the default executor's CPU work.
SYNC_THREADS = 16


def lazy_pool(threads: int, prefix: str) -> Callable[[], ThreadPoolExecutor]:
    """A private thread pool, made at its first use (importing a module starts no thread)."""
    pool: list[ThreadPoolExecutor] = []
    lock = threading.Lock()

    def get() -> ThreadPoolExecutor:
        with lock:
            if not pool:
                pool.append(ThreadPoolExecutor(threads, thread_name_prefix=prefix))
            return pool[0]
    return get


def _call(func, arg) -> BaseException | None:
    try:
        func(arg)
        return None
    except OSError as e:
        return e


class _Together:
    """One fsync_together call: its results, and a lock released when the last one is in."""
    __slots__ = ("results", "last", "finished", "done")

    def __init__(self, n: int) -> None:
        self.results: list[BaseException | None] = [None] * n
        self.last = n - 2  # jobs 1..n-1 go to the threads; job 0 is the caller's own
        self.finished = itertools.count()  # next() is one C call: atomic under the GIL
        self.done = threading.Lock()
        self.done.acquire()


class _SyncThreads:
    """The threads fsync_together hands its syncs to.  Not a ThreadPoolExecutor: its submit,
    Future and result() (a Condition, a semaphore and a lock allocated per call) cost the
    group writer's thread ~10 us of Python for each file of each batch; here a job is one
    queue put, and a call waits on one lock however many jobs it has."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.started = 0
        self.lock = threading.Lock()

    def run(self, jobs: list) -> list[BaseException | None]:
        together = _Together(len(jobs))
        if len(jobs) > 1:
            self._start(len(jobs) - 1)
            put = self.jobs.put
            for i in range(1, len(jobs)):
                put((together, i, *jobs[i]))
        together.results[0] = _call(*jobs[0])  # this thread does one itself: one hand-off fewer
        if len(jobs) > 1:
            together.done.acquire()
        for result in together.results:  # not an OSError: a bug, raised as a Future would
            if result is not None and not isinstance(result, OSError):
                raise result
        return together.results

    def _start(self, wanted: int) -> None:
        if self.started >= min(wanted, self.threads):
            return
        with self.lock:  # made as needed, up to `threads`, and kept (daemons: idle in get())
            while self.started < min(wanted, self.threads):
                self.started += 1
                threading.Thread(target=self._work, name=f"fsync_{self.started - 1}", daemon=True).start()

    def _work(self) -> None:
        get = self.jobs.get
        while True:
            together, i, func, arg = get()
            try:
                together.results[i] = _call(func, arg)
            except BaseException as e:  # noqa: BLE001 - handed to the caller; the thread lives on
                together.results[i] = e
            if next(together.finished) == together.last:
                together.done.release()


_sync_threads = _SyncThreads(SYNC_THREADS)


def fsync_together(fds: list[int], dirs: list[str]) -> tuple[list[OSError | None], dict[str, OSError | None]]:
    """Blocking. fsync every file descriptor and every directory, all at once (see SYNC_THREADS).
    The files and the directory entries that name them must already exist: then the order of
    the syncs does not matter, only that all of them have returned.  Returns the error of each
    fd (in order) and of each directory (None when it worked)."""
    jobs = [(os.fsync, fd) for fd in fds] + [(fsync_dir, d) for d in dirs]
    if not jobs:
        return [], {}
    results = _sync_threads.run(jobs)
    return results[:len(fds)], dict(zip(dirs, results[len(fds):]))


class GroupSync:
    """Group commit of directory fsyncs.

    Many sessions finishing at about the same time each need "my rename is durable".
    Instead of one fsync(dir) each, callers await `sync(dir)`; one worker thread
    fsyncs each directory once for everyone who was waiting when it started.
    """

    def __init__(self) -> None:
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._running = False

    async def sync(self, directory: str | os.PathLike) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.setdefault(os.fspath(directory), []).append(fut)
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}

                def work(dirs=list(batch)) -> dict[str, BaseException | None]:
                    results: dict[str, BaseException | None] = {}
                    for d in dirs:
                        try:
                            fsync_dir(d)
                            results[d] = None
                        except OSError as e:
                            results[d] = e
                    return results

                results = await asyncio.to_thread(work)
                for d, futures in batch.items():
                    for fut in futures:
                        if fut.done():
                            continue
                        if results[d] is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(results[d])
        finally:
            self._running = False
