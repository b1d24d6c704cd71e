"""Password guessing: one memory of failed logins shared by SMTP AUTH, IMAP and POP3.

Every login goes through `LoginGuard.attempt()`:

  1. An address (an IPv4 address, or the /64 of an IPv6 one) that failed `block_after`
     times within `window` is blocked for `block_time` on every protocol: its logins are
     answered "try later" at once, the password is not even checked.
  2. At most `max_parallel` logins per address are checked at once; more wait their
     turn (up to parallel_wait, then "try later").  This is what a doubling delay alone
     does not do: 200 connections each waiting out their own delay made 200 guesses.
  3. The attempt then waits the delay its address earned (doubling per failure, capped),
     holding its parallel slot.  The account's own failure count slows only addresses
     that have never logged in to that account successfully: a guess from X for bob slows
     X and strangers trying bob, never bob himself logging in from the address (network)
     he used before.  Nothing ever blocks an account outright — that would let anyone
     lock any user out.

Log lines (logger "mailstack.defense", client address in brackets, as every line):

  warning defense: [203.0.113.7] login failed: protocol=imap user=<bob@example.org> reason=bad_password
  warning defense: [203.0.113.7] login refused: protocol=pop3 user=<bob@example.org> reason=blocked
  warning defense: [203.0.113.7] login refused: protocol=smtp user=<bob@example.org> reason=parallel
  warning defense: [203.0.113.7] address blocked for 900s after 10 failed logins: protocol=imap

fail2ban: see docs/defense.md.  A counter per reason is in `stats` (the metrics).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter, deque

log = logging.getLogger("mailstack.defense")

KNOWN_GOOD_TTL = 90 * 86400.0  # seconds an (account, address) pair that logged in stays trusted
MAX_ENTRIES = 100_000
MAX_WAITERS = 1000  # logins of one address waiting for a slot (the connection limits bound it first)


def address_key(ip: str | None) -> str | None:
    """The unit an attacker cannot cheaply multiply: the address, or its /64 for IPv6."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class Attempt:
    """One login being checked.  `refused` is set ("blocked" / "parallel") when it may not go on."""

    def __init__(self, guard: "LoginGuard", protocol: str, ip: str | None, user: str | None,
                 refused: str | None) -> None:
        self.guard, self.protocol, self.ip, self.user, self.refused = guard, protocol, ip, user, refused
        self._open = refused is None

    def failed(self) -> None:
        if self._open:
            self._open = False
            self.guard._release(self.ip)
            self.guard._failed(self.protocol, self.ip, self.user)

    def succeeded(self, account: str) -> None:
        if self._open:
            self._open = False
            self.guard._release(self.ip)
            self.guard.success(self.ip, account)

    def abandoned(self) -> None:
        """The attempt ended without a verdict (client gone, server error)."""
        if self._open:
            self._open = False
            self.guard._release(self.ip)


class LoginGuard:
    def __init__(self, base_delay: float = 1.0, max_delay: float = 30.0, window: float = 900.0,
                 max_parallel: int = 3, block_after: int = 10, block_time: float = 900.0,
                 max_entries: int = MAX_ENTRIES, clock=time.monotonic) -> None:
        self.base_delay, self.max_delay, self.window = base_delay, max_delay, window
        self.max_parallel, self.block_after, self.block_time = max_parallel, block_after, block_time
        self.max_entries = max_entries
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, last failure time)
        self._blocked: dict[str, float] = {}  # address key -> blocked until
        self._inflight: Counter[str] = Counter()  # address key -> logins being checked
        self._waiters: dict[str, deque[asyncio.Future]] = {}  # address key -> logins waiting for a slot
        self._good: dict[tuple[str, str], float] = {}  # (account, address key) -> trusted until
        self.stats: Counter[tuple[str, str]] = Counter()  # ("login", reason) -> count; the metrics' Counter once wired

    @classmethod
    def from_config(cls, cfg) -> "LoginGuard":
        a = cfg.auth
        return cls(a.fail_delay, a.fail_delay_max, a.fail_window, a.max_parallel, a.block_after, a.block_time)

    def configure(self, base_delay: float, max_delay: float, window: float, max_parallel: int | None = None,
                  block_after: int | None = None, block_time: float | None = None) -> None:
        self.base_delay, self.max_delay, self.window = base_delay, max_delay, window
        if max_parallel is not None:
            self.max_parallel, self.block_after, self.block_time = max_parallel, block_after, block_time

    def reconfigure(self, cfg) -> None:
        a = cfg.auth
        self.configure(a.fail_delay, a.fail_delay_max, a.fail_window, a.max_parallel, a.block_after, a.block_time)

    # --- the entry point ---------------------------------------------------------------
    async def attempt(self, protocol: str, ip: str | None, user: str | None) -> Attempt:
        """Admit one login check (or refuse it), after the delay it has earned."""
        key = address_key(ip)
        if key is not None and self.blocked(ip):
            return self._refuse(protocol, ip, user, "blocked")
        if key is not None and not await self._take_slot(key):
            return self._refuse(protocol, ip, user, "parallel")
        attempt = Attempt(self, protocol, ip, user, None)
        if key is not None and self.blocked(ip):  # blocked while this one waited for its turn
            attempt.abandoned()
            return self._refuse(protocol, ip, user, "blocked")
        delay = self.delay_for(ip, user)
        if delay:
            try:
                await asyncio.sleep(delay)
            except BaseException:
                attempt.abandoned()
                raise
        return attempt

    def _refuse(self, protocol: str, ip: str | None, user: str | None, reason: str) -> Attempt:
        self.stats[("login", reason)] += 1
        log.warning("login refused: protocol=%s user=<%s> reason=%s", protocol, _shown(user), reason,
                    extra={"client": ip})
        return Attempt(self, protocol, ip, user, reason)

    # --- parallel slots per address ------------------------------------------------------
    # A login over the cap waits for a slot (a burst of clients behind one NAT starting at
    # once just queues for a moment), at most parallel_wait seconds; then "try later".
    # The slot is held through the earned delay, so guesses from one address, however
    # many connections carry them, are checked max_parallel at a time.
    @property
    def parallel_wait(self) -> float:
        return max(5.0, 2 * self.max_delay)

    async def _take_slot(self, key: str) -> bool:
        if self._inflight[key] < self.max_parallel:
            self._inflight[key] += 1
            return True
        queue = self._waiters.setdefault(key, deque())
        if len(queue) >= MAX_WAITERS:
            return False
        fut = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            async with asyncio.timeout(self.parallel_wait):
                await fut  # resolved by _release, which hands its slot over
            return True
        except TimeoutError:
            return fut.done() and not fut.cancelled()  # handed over just as the wait ran out
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release_key(key)  # handed over, but this attempt is gone: pass it on
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if fut in queue:
                queue.remove(fut)
            if not queue:
                self._waiters.pop(key, None)

    def _release(self, ip: str | None) -> None:
        key = address_key(ip)
        if key is not None:
            self._release_key(key)

    def _release_key(self, key: str) -> None:
        queue = self._waiters.get(key)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes to the next in line
                return
        self._inflight[key] -= 1
        if self._inflight[key] <= 0:
            del self._inflight[key]

    def _count(self, key: str, now: float) -> int:
        entry = self._failures.get(key)
        if entry is None:
            return 0
        if now - entry[1] > self.window:
            del self._failures[key]
            return 0
        return entry[0]

    def known_good(self, ip: str | None, account: str | None) -> bool:
        if not ip or not account:
            return False
        until = self._good.get((account.lower(), address_key(ip)))
        return until is not None and until > self.clock()

    def delay_for(self, ip: str | None, account: str | None) -> float:
        now = self.clock()
        n = self._count(f"ip:{address_key(ip)}", now) if ip else 0
        if account and not self.known_good(ip, account):
            n = max(n, self._count(f"acct:{account.lower()}", now))
        if n == 0 or self.base_delay <= 0:
            return 0.0
        return min(self.base_delay * (2 ** min(n - 1, 30)), self.max_delay)

    async def wait(self, ip: str | None, account: str | None) -> None:
        """Await the delay earned by earlier failures (without a parallel slot; prefer attempt())."""
        delay = self.delay_for(ip, account)
        if delay:
            await asyncio.sleep(delay)

    def _failed(self, protocol: str, ip: str | None, user: str | None) -> None:
        self.stats[("login", "bad_password")] += 1
        log.warning("login failed: protocol=%s user=<%s> reason=bad_password", protocol, _shown(user),
                    extra={"client": ip})
        count = self.failure(ip, user)
        key = address_key(ip)
        if key is not None and self.block_after and count >= self.block_after and self._blocked.get(key, 0) <= self.clock():
            self._blocked[key] = self.clock() + self.block_time
            self.stats[("login", "block")] += 1
            log.warning("address blocked for %.0fs after %d failed logins: protocol=%s", self.block_time, count,
                        protocol, extra={"client": ip})

    def failure(self, ip: str | None, account: str | None) -> int:
        """Count one failure; returns the address's failure count in the window."""
        now = self.clock()
        if len(self._failures) >= self.max_entries:
            self._expire(now)
        count = 0
        for key in ((f"ip:{address_key(ip)}" if ip else None), (f"acct:{account.lower()}" if account else None)):
            if key:
                n = self._count(key, now) + 1
                self._failures[key] = (n, now)
                if key.startswith("ip:"):
                    count = n
        return count

    def success(self, ip: str | None, account: str | None) -> None:
        # Neither count is cleared: the address's, because one valid account must not reset
        # what an attacker built up against the others; the account's, because the owner
        # logging in must not hand the guessers elsewhere a fresh start.  The owner is not
        # slowed by it anyway: this address is now known good for his account.
        if not account:
            return
        if ip:
            if len(self._good) >= self.max_entries:
                now = self.clock()
                for k in [k for k, t in self._good.items() if t <= now] or [next(iter(self._good))]:
                    del self._good[k]
            self._good[(account.lower(), address_key(ip))] = self.clock() + KNOWN_GOOD_TTL

    def blocked(self, ip: str | None) -> bool:
        key = address_key(ip)
        return key is not None and self._blocked.get(key, 0.0) > self.clock()

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, t) in self._failures.items() if now - t > self.window]:
            del self._failures[key]
        for key in [k for k, t in self._blocked.items() if t <= now]:
            del self._blocked[key]
        while len(self._failures) >= self.max_entries:  # still full: forget the oldest
            self._failures.pop(next(iter(self._failures)))


def _shown(user: str | None) -> str:
    """The user name as logged: bounded, no angle brackets (they frame it for fail2ban)."""
    return (user or "")[:100].replace("<", "").replace(">", "")
