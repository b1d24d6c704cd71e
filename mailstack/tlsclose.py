"""Closing a connection at once after the protocol's goodbye (IMAP LOGOUT, POP3 QUIT,
SMTP QUIT), also over TLS.

`transport.close()` on a TLS transport sends close_notify and then waits for the client's
close_notify before it closes TCP, up to the loop's ssl_shutdown_timeout (30 s).  Many
clients wait for the TCP close instead (they never answer close_notify), so each LOGOUT
stalled them for 30 s.  Dovecot and Postfix send close_notify and close the socket: so
does this, once what was written has left the process (an abort only drops bytes still
buffered in user space, so it waits until there are none, for a bounded time).
"""
from __future__ import annotations

import asyncio
import select

FLUSH_LIMIT = 5.0  # seconds a goodbye may take to leave for the kernel before we cut


def _flushed(transport, raw, sock) -> bool:
    try:
        if transport.get_write_buffer_size():
            return False
        if raw is not None:  # asyncio's TLS transport: the TCP transport under it
            return raw.get_write_buffer_size() == 0
        if sock is not None:  # uvloop: room in the kernel's buffer means libuv has written
            return bool(select.select([], [sock.fileno()], [], 0)[1])
    except (OSError, ValueError, AttributeError):
        pass
    return True


def _tcp_transport(transport):
    """asyncio's TLS transport keeps the TCP transport under it (uvloop's does not show it)."""
    return getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)


async def _cut(transport, raw, sock) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + FLUSH_LIMIT
    while not _flushed(transport, raw, sock) and loop.time() < end:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # one more turn: the loop writes what the kernel has room for
    (raw or transport).abort()


_pending: set[asyncio.Task] = set()  # held so that no close is garbage-collected midway


def close_soon(transport) -> None:
    """Close after the goodbye: everything written is sent; over TLS, close_notify goes out
    and TCP closes without waiting for the client's close_notify (in a task, so that a
    `finally:` running on cancellation can call it)."""
    if transport is None:
        return
    if transport.get_extra_info("ssl_object") is None:
        transport.close()  # plain TCP: sends what is buffered, then FIN
        return
    raw = _tcp_transport(transport)  # before close(): a second close() of asyncio's forgets it
    sock = transport.get_extra_info("socket")
    if not transport.is_closing():
        transport.close()  # queues close_notify behind what was written
    task = asyncio.get_running_loop().create_task(_cut(transport, raw, sock))
    _pending.add(task)
    task.add_done_callback(_pending.discard)
