"""IMAP listeners: accept connections, apply the connection limits, run sessions."""
from __future__ import annotations

import asyncio
import collections
import logging

from .. import proxy
from ..defense import connections as floods
from .idlewait import IdleStreamReader
from .session import IMAPSession

log = logging.getLogger("mailstack.imap")

IMPLICIT_TLS = {"imaps"}


async def start_listener(services, name: str, host: str, port: int, *,
                         start_serving: bool = True) -> asyncio.Server:
    tls = name in IMPLICIT_TLS
    loop = asyncio.get_running_loop()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = IMAPSession(services, name, reader, writer, tls)
        cfg = services.config.imap
        registry = services.sessions
        if not floods.admit(services, session, "imap", cfg.max_connections, cfg.max_connections_per_ip):
            try:
                services.metrics.connections_refused[name] += 1
                writer.write(b"* BYE [UNAVAILABLE] Too many connections\r\n")
                await asyncio.wait_for(writer.drain(), 5)
                writer.close()
            except (OSError, asyncio.TimeoutError, ConnectionError):
                writer.close()
            return
        registry.add(session, "imap")
        try:
            await session.run()
        except Exception:  # a session bug must not take the listener down
            log.exception("IMAP session crashed", extra={"client": session.peer_ip})
        finally:
            registry.discard(session)
            if not writer.is_closing():
                writer.close()

    def factory() -> asyncio.StreamReaderProtocol:  # what asyncio.start_server builds
        protocol = asyncio.StreamReaderProtocol(IdleStreamReader(limit=65536, loop=loop), on_connect, loop=loop)
        # CPython keeps the (rarely used) drain waiters in a deque, which allocates a 64-slot
        # block up front: ~600 bytes of every idle session. A list does the same job there
        # (append, remove, iterate).
        if isinstance(getattr(protocol, "_drain_waiters", None), collections.deque):
            protocol._drain_waiters = []
        return protocol

    return await proxy.create_server(services, name, factory, host, port,
                                     ssl=services.tls.for_listener(name) if tls else None,
                                     ssl_handshake_timeout=30 if tls else None,
                                     reuse_address=True, backlog=1024, start_serving=start_serving)
