"""One asyncio.Lock per key (an account, a mailbox), made on first use.  The map is bounded:
past MAX_KEYS, the locks nobody holds are forgotten (a new one is made the next time)."""
from __future__ import annotations

import asyncio

MAX_KEYS = 10000


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > MAX_KEYS:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock
