"""The "managesieve" listener (port 4190, STARTTLS)."""
from __future__ import annotations

import asyncio

from .. import proxy
from .parser import CommandReader
from .session import Connection, ManageSieveSession

_tasks: set[asyncio.Task] = set()  # held so no session task is garbage-collected mid-way


async def start_listener(services, name: str, host: str, port: int, *,
                         start_serving: bool = True) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def on_connect(conn: Connection) -> None:
        session = ManageSieveSession(services, name, conn)
        task = loop.create_task(session.run())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    def factory() -> Connection:
        cfg = services.config  # read per connection: a reload applies to new sessions
        reader = CommandReader(cfg.managesieve.max_line_length, cfg.sieve.max_script_size + 1024)
        return Connection(reader, on_connect)

    return await proxy.create_server(services, name, factory, host, port, reuse_address=True,
                                     start_serving=start_serving)
