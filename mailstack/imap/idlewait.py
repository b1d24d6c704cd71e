"""Waiting in IDLE for the client's next bytes or a mailbox change, cheaply.

Ten thousand sessions sit in IDLE at once, so what each holds while it waits counts. The
obvious asyncio.Event + a task for Event.wait() + asyncio.wait({read, wake}, timeout)
cost about 4 KiB per session (the Event's deque, a second task with its coroutine and
weak reference, asyncio.wait's coroutine, set, closure and timer); Wake and wait_read_or_wake
hold one future and one callback instead, and long timeouts share one timer per event loop
(a uvloop timer handle is ~480 bytes). read_soon() hands the client's next bytes to a plain
future instead of a task running StreamReader.read() (task, two coroutines and a weak
reference: ~900 bytes).
"""
from __future__ import annotations

import asyncio
import weakref

SHARED_TIMER_MIN = 2.0  # timeouts at least this long go to the shared clock (up to TICK late)


class _Clock:
    """One timer per event loop for every long IDLE wait: once a TICK it resolves the waiters
    whose deadline has passed (10,000 waiters: well under a millisecond a tick)."""

    TICK = 1.0

    # No reference to the loop here: the clock is the value of a WeakKeyDictionary keyed by
    # the loop, and a value that held its key would keep every closed loop alive.
    def __init__(self) -> None:
        self.due: dict[asyncio.Future, float] = {}
        self.handle: asyncio.TimerHandle | None = None

    def add(self, waiter: asyncio.Future, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.due[waiter] = loop.time() + timeout
        if self.handle is None:
            self.handle = loop.call_later(self.TICK, self._tick)

    def discard(self, waiter: asyncio.Future) -> None:
        self.due.pop(waiter, None)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for waiter in [w for w, deadline in self.due.items() if deadline <= now]:
            del self.due[waiter]
            if not waiter.done():
                waiter.set_result(None)
        self.handle = loop.call_later(self.TICK, self._tick) if self.due else None


_clocks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clock]" = weakref.WeakKeyDictionary()


def _clock(loop: asyncio.AbstractEventLoop) -> _Clock:
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _Clock()
    return clock


class Wake:
    """The part of asyncio.Event that IDLE uses (set / is_set / clear), for one waiter."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False


async def wait_read_or_wake(read_task: asyncio.Future, wake: Wake, timeout: float) -> bool:
    """Until `read_task` is done, `wake` is set or `timeout` seconds pass; True when the read
    is done (it is never cancelled here)."""
    if read_task.done() or wake.is_set():
        return read_task.done()
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake_up(_=None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    wake._waiter = waiter
    read_task.add_done_callback(wake_up)
    clock = _clock(loop) if timeout >= SHARED_TIMER_MIN else None
    if clock is not None:
        clock.add(waiter, timeout)
    else:
        timer = loop.call_later(timeout, wake_up)
    try:
        await waiter
    finally:
        if clock is not None:
            clock.discard(waiter)
        else:
            timer.cancel()
        read_task.remove_done_callback(wake_up)
        wake._waiter = None
    return read_task.done()


class IdleStreamReader(asyncio.StreamReader):
    """asyncio's StreamReader (the IMAP listener makes these) that can give its next bytes
    to a plain future, read_soon(): what arrives is handed over the moment the protocol
    feeds it, as StreamReader.read(n) would have returned it."""

    _soon: "tuple[asyncio.Future, int] | None" = None

    def feed_data(self, data: bytes) -> None:
        super().feed_data(data)
        self._give()

    def feed_eof(self) -> None:
        super().feed_eof()
        self._give()

    def set_exception(self, exc: BaseException) -> None:
        super().set_exception(exc)
        self._give()

    def _give(self) -> None:
        soon = self._soon
        if soon is None or not (self._buffer or self._eof or self._exception is not None):
            return
        self._soon = None
        future, n = soon
        if future.done():
            return
        if self._exception is not None:  # as read() does: the error first
            future.set_exception(self._exception)
            return
        data = bytes(memoryview(self._buffer)[:n])
        del self._buffer[:n]
        self._maybe_resume_transport()
        future.set_result(data)

    def _forget(self, future: asyncio.Future) -> None:
        if self._soon is not None and self._soon[0] is future:
            self._soon = None


_READER_INTERNALS = all(hasattr(asyncio.StreamReader, name) for name in ("_maybe_resume_transport",))


def read_soon(reader: asyncio.StreamReader, n: int) -> asyncio.Future:
    """A future for `await reader.read(n)`: a plain future fed by an IdleStreamReader, or a
    task for any other reader (a TLS or compression layer may put its own in front)."""
    if not isinstance(reader, IdleStreamReader) or not _READER_INTERNALS or reader._soon is not None:
        return asyncio.ensure_future(reader.read(n))
    future = asyncio.get_running_loop().create_future()
    reader._soon = (future, n)
    future.add_done_callback(reader._forget)  # cancelled: the reader lets go of it
    reader._give()  # bytes (or EOF) already waiting
    return future
