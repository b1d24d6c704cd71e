"""Slowing down password guessing, shared by SMTP AUTH, IMAP and POP3.

Every failed login from an address, or for an account, doubles the delay that the
next attempt from that address / for that account must wait before it is even
checked (capped).  A success clears the account's count (not the address's:
an attacker with one valid account must not reset the counter for the others).
"""
from __future__ import annotations

import asyncio
import time


class LoginThrottle:
    def __init__(self, base_delay: float = 1.0, max_delay: float = 30.0, window: float = 900.0,
                 max_entries: int = 100_000) -> None:
        self.base_delay, self.max_delay, self.window = base_delay, max_delay, window
        self.max_entries = max_entries
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, last failure time)

    def configure(self, base_delay: float, max_delay: float, window: float) -> None:
        self.base_delay, self.max_delay, self.window = base_delay, max_delay, window

    def _count(self, key: str, now: float) -> int:
        entry = self._failures.get(key)
        if entry is None:
            return 0
        if now - entry[1] > self.window:
            del self._failures[key]
            return 0
        return entry[0]

    def delay_for(self, ip: str | None, account: str | None) -> float:
        now = time.monotonic()
        n = max(self._count(f"ip:{ip}", now) if ip else 0,
                self._count(f"acct:{account.lower()}", now) if account else 0)
        if n == 0 or self.base_delay <= 0:
            return 0.0
        return min(self.base_delay * (2 ** (n - 1)), self.max_delay)

    async def wait(self, ip: str | None, account: str | None) -> None:
        """Await the delay earned by earlier failures before checking a password."""
        delay = self.delay_for(ip, account)
        if delay:
            await asyncio.sleep(delay)

    def failure(self, ip: str | None, account: str | None) -> None:
        now = time.monotonic()
        if len(self._failures) >= self.max_entries:
            self._expire(now)
        for key in ((f"ip:{ip}" if ip else None), (f"acct:{account.lower()}" if account else None)):
            if key:
                self._failures[key] = (self._count(key, now) + 1, now)

    def success(self, ip: str | None, account: str | None) -> None:
        if account:
            self._failures.pop(f"acct:{account.lower()}", None)

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, t) in self._failures.items() if now - t > self.window]:
            del self._failures[key]
        while len(self._failures) >= self.max_entries:  # still full: forget the oldest
            self._failures.pop(next(iter(self._failures)))
