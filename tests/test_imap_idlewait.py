"""imap/idlewait.py: IDLE's small wait (the client's bytes, a mailbox change, or a timeout),
on both event loops mailstack runs on, including the timer shared by long waits."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from mailstack.imap import idlewait
from mailstack.imap.idlewait import Wake, wait_read_or_wake

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    loop = LOOPS[request.param]()
    yield loop.run_until_complete
    loop.close()


def test_a_change_wakes_the_wait_and_the_read_stays_pending(run):
    async def main():
        loop = asyncio.get_running_loop()
        read = loop.create_future()
        wake = Wake()
        loop.call_later(0.05, wake.set)
        t0 = time.monotonic()
        done = await wait_read_or_wake(read, wake, 30)
        assert not done and wake.is_set() and not read.done()
        assert time.monotonic() - t0 < 5
        assert wake._waiter is None and not read._callbacks  # nothing left behind
        wake.clear()
        assert not wake.is_set()
    run(main())


def test_the_read_finishing_ends_the_wait(run):
    async def main():
        loop = asyncio.get_running_loop()
        read = loop.create_future()
        loop.call_later(0.05, read.set_result, b"DONE\r\n")
        assert await wait_read_or_wake(read, Wake(), 30)
        assert read.result() == b"DONE\r\n"
    run(main())


def test_already_set_or_done_returns_at_once(run):
    async def main():
        loop = asyncio.get_running_loop()
        wake = Wake()
        wake.set()
        assert not await wait_read_or_wake(loop.create_future(), wake, 30)
        done = loop.create_future()
        done.set_result(b"x")
        assert await wait_read_or_wake(done, Wake(), 30)
    run(main())


@pytest.mark.parametrize("timeout", [0.1, 2.5])
def test_timeouts_short_on_their_own_timer_long_on_the_shared_clock(run, timeout, monkeypatch):
    monkeypatch.setattr(idlewait._Clock, "TICK", 0.05)

    async def main():
        loop = asyncio.get_running_loop()
        waits = [wait_read_or_wake(loop.create_future(), Wake(), timeout) for _ in range(50)]
        t0 = time.monotonic()
        assert await asyncio.gather(*waits) == [False] * 50
        elapsed = time.monotonic() - t0
        assert timeout - 0.01 <= elapsed < timeout + 5  # generous: a busy machine
        clock = idlewait._clocks.get(loop)
        assert clock is None if timeout < idlewait.SHARED_TIMER_MIN else not clock.due
    run(main())


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_read_soon_gives_what_read_would_without_a_task(run):
    from mailstack.imap.idlewait import IdleStreamReader, read_soon

    async def main():
        reader = IdleStreamReader(limit=16)
        reader.set_transport(_Transport())
        pending = read_soon(reader, 4)
        assert not isinstance(pending, asyncio.Task) and not pending.done()
        reader.feed_data(b"DONE\r\nA1 NOOP\r\n")  # more than asked for, over the limit
        assert pending.result() == b"DONE"
        assert await reader.read(100) == b"\r\nA1 NOOP\r\n"  # the rest stays, in order
        assert not reader._transport.paused  # resumed once the buffer was taken
        ready = read_soon(reader, 100)  # nothing buffered: waits
        ready.cancel()  # IDLE ended: the reader lets go, later bytes go to read()
        await asyncio.sleep(0)
        reader.feed_data(b"x")
        assert reader._soon is None and await reader.read(1) == b"x"
        eof = read_soon(reader, 100)
        reader.feed_eof()
        assert eof.result() == b""
        broken = IdleStreamReader()
        f = read_soon(broken, 10)
        broken.set_exception(ConnectionResetError())
        assert isinstance(f.exception(), ConnectionResetError)
        other = asyncio.StreamReader()  # any other reader (a TLS or compression layer): a task
        t = read_soon(other, 10)
        assert isinstance(t, asyncio.Task)
        other.feed_data(b"y")
        assert await t == b"y"
    run(main())
