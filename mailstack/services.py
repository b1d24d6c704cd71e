"""The things every listener shares, in one object handed to each protocol module.

server.py builds it; SIGHUP swaps `config` (and reloads directory and TLS in place).
Sessions read `services.config` when they start, so a reload applies to new sessions
and leaves sessions in progress undisturbed.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from .authlimit import LoginThrottle
from .config import Config
from .directory import Directory
from .events import EventBus
from .metrics import Metrics
from .tls import TLSContexts

log = logging.getLogger("mailstack.server")


class Session(Protocol):
    listener: str  # listener name, e.g. "smtp", "imaps"
    peer_ip: str | None

    def close_for_shutdown(self) -> None:
        """Say goodbye if possible (421 / * BYE / -ERR) and close the transport. Must not raise."""


class SessionRegistry:
    """Open sessions of every listener: connection limits and graceful shutdown."""

    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.per_listener: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()  # sessions ever opened, per listener (metrics)
        self.per_ip: Counter[tuple[str, str]] = Counter()  # (protocol, ip)
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False

    def add(self, session: Session, protocol: str) -> None:
        self.sessions.add(session)
        self.per_listener[session.listener] += 1
        self.opened[session.listener] += 1
        self.per_ip[(protocol, session.peer_ip or "")] += 1
        session._registry_protocol = protocol  # type: ignore[attr-defined]
        self._empty.clear()
        if self.draining:
            # Accepted as the stop began (asyncio had taken it off the listen queue before the
            # listener closed): it gets its goodbye too, once its protocol has set up.
            asyncio.get_running_loop().call_soon(self._close_late, session)

    def _close_late(self, session: Session) -> None:
        if session in self.sessions:
            try:
                session.close_for_shutdown()
            except Exception:
                log.exception("closing session failed")

    def discard(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.per_listener[session.listener] -= 1
        key = (session._registry_protocol, session.peer_ip or "")  # type: ignore[attr-defined]
        self.per_ip[key] -= 1
        if self.per_ip[key] <= 0:
            del self.per_ip[key]
        if not self.sessions:
            self._empty.set()

    def count(self, protocol: str | None = None, ip: str | None = None) -> int:
        if protocol is None:
            return len(self.sessions)
        if ip is not None:
            return self.per_ip.get((protocol, ip), 0)
        return sum(n for (p, _), n in self.per_ip.items() if p == protocol)

    async def drain(self, grace: float) -> None:
        """Ask every session to end now (an idle one closes at once with its protocol's goodbye;
        one in the middle of a command finishes that command first), wait up to `grace`
        seconds for them, then cut the rest."""
        self.draining = True
        for session in list(self.sessions):
            try:
                session.close_for_shutdown()
            except Exception:
                log.exception("closing session failed")
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives just as the event is set, and shutdown would hang.
        try:
            async with asyncio.timeout(grace):
                await self._empty.wait()
        except TimeoutError:
            pass
        for session in list(self.sessions):
            log.warning("session on %s still busy after %.0fs: closing it", session.listener, grace)
            transport = getattr(session, "transport", None)
            try:
                if transport is not None:
                    transport.abort()
                self.discard(session)
            except Exception:
                log.exception("aborting session failed")


@dataclass
class Services:
    config: Config
    directory: Directory
    events: EventBus
    tls: TLSContexts
    throttle: LoginThrottle
    sessions: SessionRegistry
    store: Any = None  # store.base.Store
    spool: Any = None  # queue.spool.Spool
    queue: Any = None  # queue.manager.QueueManager
    extra: dict = field(default_factory=dict)
    # SMTP-session checks (smtp/hooks.py), in order; built by pipeline.build_stages
    stages: tuple = ()
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        # TLS handshakes are counted by the SSLObject class of each listener's context.
        if self.tls is not None:
            self.tls.object_class_for = self.metrics.sslobject_class
        # The login guard counts its refusals into the metrics (mailstack/defense/guard.py).
        if hasattr(self.throttle, "stats"):
            self.metrics.defense.update(self.throttle.stats)
            self.throttle.stats = self.metrics.defense
