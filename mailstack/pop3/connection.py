"""Transport glue for one POP3 client: bytes in -> bounded lines, bytes out with flow control.

An asyncio.Protocol rather than streams so that STLS can be exact: the line buffer
is emptied in the same loop step that hands the socket to TLS, so no plaintext sent
after "STLS" can be read as a command of the encrypted session (the CVE-2011-0411
class of injection).  Knows nothing about POP3 commands.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from .. import proxy
from .parser import LINE_TOO_LONG, LineBuffer, LineTooLong

# Unread pipelined input held before reading from the socket pauses.  Larger than any
# allowed line, so a paused connection always has a complete line to hand out.
PIPELINE_BYTES = 64 * 1024


class Connection(asyncio.Protocol):
    def __init__(self, max_line: int, on_connect: Callable[["Connection"], None],
                 implicit_tls: bool = False) -> None:
        self.tls_active = implicit_tls
        self.lines = LineBuffer(max_line)
        self._high_water = max(PIPELINE_BYTES, 2 * max_line)
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._eof = False
        self._ended = False  # we closed: nothing more is written
        self._reading_paused = False
        self._waiter: asyncio.Future | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        # The read timeout: one timer per connection, re-armed lazily (see readline).
        self._deadline: float | None = None  # loop time a waiting readline gives up at
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timeout = 0.0  # of the waiting readline
        # Set by the session: a line that arrives while the session waits in readline() is
        # first offered to it here, answered at once when it can be (True), else read as usual.
        self.on_line: Callable[[bytes], bool] | None = None
        self._pushed_back: bytes | None = None  # a line offered and declined: read next

    # --- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once: for implicit TLS after the handshake; start_tls does not call it again.
        self.transport = transport  # type: ignore[assignment]
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.lines.feed(data)
        if self._deadline is not None and self.on_line is not None:
            self._offer_lines()
            if self._pushed_back is None and not len(self.lines) and not self._eof:
                return  # all answered: the waiting readline goes on waiting
        if len(self.lines) > self._high_water and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too: POP3 has nothing to say to a half-closed client

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self._eof = True
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- for the session ---------------------------------------------------------------
    @property
    def peer_ip(self) -> str | None:
        return proxy.client_ip(self.transport, self)  # the real client, also behind a proxy

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readline(self, timeout: float) -> bytes | LineTooLong | None:
        """The next command line (without CRLF), LINE_TOO_LONG, or None at end of input.
        Raises TimeoutError after `timeout` seconds of silence."""
        line = self._buffered_line()
        if line is not None or self._eof:
            return line
        # Not asyncio.timeout(): that is a timer made and cancelled per command, a third of
        # the loop's own work for a RETR.  The one timer of the connection is moved only
        # when it would fire too late; when it fires early it re-arms itself for the deadline.
        loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._deadline = deadline = loop.time() + timeout
        if self._timer is None or self._timer_at > deadline:
            self._arm(loop, deadline)
        try:
            while True:
                self._waiter = waiter = loop.create_future()
                await waiter
                line = self._buffered_line()
                if line is not None or self._eof:
                    return line
        finally:
            self._deadline = None

    def _offer_lines(self) -> None:
        """While the session waits for a command: give it complete lines, in order, to answer
        without waking its task (a task wake-up per RETR is about half the loop's own work),
        until one is declined (pushed back: readline returns it next) or output backs up."""
        while not self._write_paused and not self._ended and self._pushed_back is None:
            line = self.lines.next_line()
            if line is None:
                return
            if line is LINE_TOO_LONG or not self.on_line(line):
                self._pushed_back = line
                return
            # answered: the read timeout counts from now, as for a command read by readline
            self._deadline = asyncio.get_running_loop().time() + self._timeout

    def _buffered_line(self) -> bytes | LineTooLong | None:
        line, self._pushed_back = self._pushed_back, None
        if line is not None:
            return line
        line = self.lines.next_line()
        if self._reading_paused and len(self.lines) <= self._high_water // 2 and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return line

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:  # no read waiting: armed again by the next one
            return
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._arm(loop, deadline)
            return
        self._deadline = None  # timed out: no more lines are offered (see _offer_lines)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def write(self, data: bytes) -> None:
        if not self.closed and not self._ended:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is slower than we write (bounded output buffering)."""
        while self._write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float = 30.0) -> int:
        """Switch to TLS after the "+OK" has been written.  Returns the number of plaintext
        bytes the client sent after STLS, which are dropped, never executed."""
        dropped = self.lines.clear()
        self._pushed_back = None  # (empty here: STLS was read by readline, after any line pushed back)
        self._reading_paused = False  # start_tls resumes reading on its own
        loop = asyncio.get_running_loop()
        # From here on bytes go to the TLS layer: start_tls swaps the protocol before
        # the loop runs another callback, so nothing can slip in between.
        self.transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                              ssl_handshake_timeout=handshake_timeout)
        self.tls_active = True
        return dropped

    def close(self) -> None:
        """Close after what was written is sent.  The session sees end of input at once, even
        while a TLS transport still waits for the client's close_notify."""
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._end_locally()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self._end_locally()

    def _end_locally(self) -> None:
        self._ended = True
        self._stop_timer()
        self._eof = True
        self._write_paused = False
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
