"""Event rates per key (client address, user, destination), in memory.

Rates need not survive a restart (a restart forgets at most one window), so they live
in memory: a sliding-window counter per key (the current and the previous fixed window,
the previous one weighted by how much of it still overlaps the sliding window), O(1)
memory per key, bounded in the number of keys.
"""
from __future__ import annotations

import time

MAX_KEYS = 200_000


class RateCounter:
    """How many events per `window` seconds, per key."""

    def __init__(self, window: float, clock=time.monotonic, max_keys: int = MAX_KEYS) -> None:
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._counts: dict[str, tuple[int, int, int]] = {}  # key -> (window index, current, previous)

    def _state(self, key: str, now: float) -> tuple[int, int, int]:
        index = int(now // self.window)
        entry = self._counts.get(key)
        if entry is None:
            return index, 0, 0
        at, current, previous = entry
        if at == index:
            return entry
        if at == index - 1:
            return index, 0, current
        return index, 0, 0

    def rate(self, key: str) -> float:
        """Events in the last `window` seconds (estimated)."""
        now = self.clock()
        index, current, previous = self._state(key, now)
        overlap = 1.0 - (now / self.window - index)
        return current + previous * overlap

    def hit(self, key: str, n: int = 1) -> float:
        """Count `n` events; returns the rate including them."""
        now = self.clock()
        index, current, previous = self._state(key, now)
        if key not in self._counts and len(self._counts) >= self.max_keys:
            self._forget_old(index)
        self._counts[key] = (index, current + n, previous)
        return current + n + previous * (1.0 - (now / self.window - index))

    def over(self, key: str, limit: int) -> bool:
        """True when one more event would exceed `limit` (0 = no limit)."""
        return limit > 0 and self.rate(key) + 1 > limit

    def _forget_old(self, index: int) -> None:
        for key in [k for k, (at, _, _) in self._counts.items() if at < index - 1]:
            del self._counts[key]
        while len(self._counts) >= self.max_keys:  # still full: drop the oldest inserted
            self._counts.pop(next(iter(self._counts)))


class Pacer:
    """Outbound pacing per destination: a token bucket of `per_minute` deliveries a minute,
    allowing a burst of ten seconds' worth.  `reserve()` says how long to wait for a slot,
    or None when that would be longer than `max_wait` (then the delivery is deferred)."""

    def __init__(self, clock=time.monotonic, max_keys: int = 10_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def reserve(self, key: str, per_minute: int, max_wait: float = 30.0) -> float | None:
        if per_minute <= 0:
            return 0.0
        rate = per_minute / 60.0
        burst = max(1.0, per_minute / 6.0)
        now = self.clock()
        tokens, at = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate
        if wait > max_wait:
            return None
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._buckets.pop(next(iter(self._buckets)))
        self._buckets[key] = (tokens - 1.0, now)
        return wait
