"""Connection floods: per-address and global session limits on every listener, and
idle holders that cannot starve everyone else.

Every listener admits a new session through `admit()`.  Beyond the hard limits
(max_connections, max_connections_per_ip of the protocol) two things keep a few
addresses holding idle connections from locking everyone out, as Postfix's smtpd does
with its stress-dependent timeouts:

  - under stress (defense.stress_at of max_connections in use), a session that has not
    yet logged in (IMAP, POP3) or started a mail transaction (SMTP) gets only
    defense.stress_timeout seconds of silence: the sweep at each new connection closes
    those idle longer, and their next read uses the short timeout;
  - at the global limit, the longest-idle such session — from the address holding the
    most sessions — is closed to make room for the newcomer (idle at least two seconds, so
    a client that just connected and is about to speak is not the one thrown out).

A session taking part offers: `peer_ip`, `preauth` (bool: not yet logged in / no MAIL
yet), `idle_since` (loop time its current read began, None while it is working) and
`close_idle()` (say the protocol's timeout goodbye and close).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

from ..metrics import PROTOCOL_OF

log = logging.getLogger("mailstack.defense")

MIN_IDLE_TO_EVICT = 2.0  # seconds
SWEEP_EVERY = 0.5  # seconds between stress sweeps of one protocol


def _protocol_sessions(registry, protocol: str):
    return [s for s in registry.sessions if getattr(s, "_registry_protocol", None) == protocol]


def _idle_preauth(sessions, now: float, min_idle: float):
    out = []
    for s in sessions:
        since = getattr(s, "idle_since", None)
        if since is not None and getattr(s, "preauth", False) and now - since >= min_idle:
            out.append(s)
    return out


def sessions_of(registry, protocol: str) -> int:
    """Open sessions of `protocol` from the registry's per-listener counts (a handful of
    entries, not one per client address): this runs on every read before login/MAIL."""
    return sum(n for listener, n in registry.per_listener.items() if PROTOCOL_OF.get(listener) == protocol)


def under_stress(services, protocol: str, max_connections: int) -> bool:
    return sessions_of(services.sessions, protocol) >= services.config.defense.stress_at * max_connections


def read_timeout(services, protocol: str, max_connections: int, preauth: bool, normal: float) -> float:
    """Seconds of silence allowed for the next read of a session."""
    if preauth and under_stress(services, protocol, max_connections):
        return min(normal, services.config.defense.stress_timeout)
    return normal


def _close(session, why: str, stats: Counter) -> None:
    stats[why] += 1
    log.info("closing idle %s session before login/MAIL: %s", getattr(session, "_registry_protocol", "?"), why,
             extra={"client": getattr(session, "peer_ip", None)})
    try:
        session.close_idle()
    except Exception:  # noqa: BLE001 - a session already half gone must not stop the admission
        log.debug("close_idle failed", exc_info=True)


def admit(services, session, protocol: str, max_connections: int, max_per_ip: int) -> bool:
    """True if `session` may start; False (the caller refuses it) when a limit is reached
    and no idle pre-login session could make room."""
    registry = services.sessions
    ip = session.peer_ip or ""
    if registry.count(protocol, ip) >= max_per_ip:
        return False
    stats = _stats(services)
    total = sessions_of(registry, protocol)
    if total < services.config.defense.stress_at * max_connections:
        return True
    loop = asyncio.get_running_loop()
    now = loop.time()
    sweeps = services.extra.setdefault("defense_last_sweep", {})
    sessions = None
    if now - sweeps.get(protocol, 0.0) >= SWEEP_EVERY:
        sweeps[protocol] = now
        sessions = _protocol_sessions(registry, protocol)
        for s in _idle_preauth(sessions, now, services.config.defense.stress_timeout):
            _close(s, "stress_timeout", stats)
            total -= 1  # leaving now (its slot frees when its transport is gone)
    if total < max_connections:
        return True
    if sessions is None:
        sessions = _protocol_sessions(registry, protocol)
    candidates = _idle_preauth(sessions, now, MIN_IDLE_TO_EVICT)
    candidates = [s for s in candidates if not getattr(s, "closing", False)]
    if not candidates:
        return False
    per_ip = Counter(getattr(s, "peer_ip", "") for s in sessions)
    victim = min(candidates, key=lambda s: (-per_ip[getattr(s, "peer_ip", "")], s.idle_since))
    _close(victim, "evicted", stats)
    return True


class _Check:
    """Counts into services.metrics.defense under ("connections", reason)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def __getitem__(self, reason: str) -> int:
        return self.counter[("connections", reason)]

    def __setitem__(self, reason: str, value: int) -> None:
        self.counter[("connections", reason)] = value


def _stats(services) -> _Check:
    return _Check(services.metrics.defense)
