"""POP3 listeners: "pop3" (port 110, STLS offered) and "pop3s" (port 995, implicit TLS)."""
from __future__ import annotations

import asyncio

from .. import proxy
from .connection import Connection
from .session import POP3Session

IMPLICIT_TLS_LISTENERS = {"pop3s"}
TLS_HANDSHAKE_TIMEOUT = 30.0

# Session tasks, held so that none is garbage-collected while it waits on the client.
_tasks: set[asyncio.Task] = set()


async def start_listener(services, name: str, host: str, port: int, *,
                         start_serving: bool = True) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    implicit = name in IMPLICIT_TLS_LISTENERS

    def on_connect(conn: Connection) -> None:
        session = POP3Session(services, name, conn)
        task = loop.create_task(session.run())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    def factory() -> Connection:
        # Config is read per connection so a reload applies to new sessions.
        return Connection(services.config.pop3.max_line_length, on_connect, implicit_tls=implicit)

    return await proxy.create_server(
        services, name, factory, host, port, reuse_address=True, start_serving=start_serving,
        ssl=services.tls.for_listener(name) if implicit else None,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None,
    )
