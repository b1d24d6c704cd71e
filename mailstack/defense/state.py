"""State that must outlive the process: greylist triplets, allow-lists.

One small interface, `StateStore`: keys map to a short text value with an expiry time.
Every operation is one key, so the same interface fits a shared engine when several
mailstack nodes stand behind the same MX records:

  Redis        get -> GET, put -> SET key value PXAT expiry, incr -> INCR + PEXPIREAT
               (a MULTI block), delete -> DEL; expiry is Redis's own.
  PostgreSQL   one table (key text primary key, value text, expires double precision);
               put/incr are INSERT ... ON CONFLICT (key) DO UPDATE, a periodic
               DELETE WHERE expires < now() does what `purge` does here.

The embedded default is SQLite through aiosqlite (its own thread: the event loop never
waits on the disk).  Why SQLite and not files written atomically: a greylist holds one
small record per triplet, tens of thousands of them, each touched on every RCPT; a file
per record (or a rewritten file) costs an fsync per update and a directory to scan,
while SQLite's write-ahead log appends a few hundred bytes per commit.  With
journal_mode=WAL a committed transaction is in the log file before commit returns, so
`kill -9` of the process loses nothing (synchronous=NORMAL skips the fsync per commit:
only a power cut could lose the last commits, which for a greylist means a sender is
greylisted once more — not worth an fsync per RCPT).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger("mailstack.defense")

MAX_VALUE = 1024  # bytes: values are small records, never message data
PURGE_EVERY = 3600.0  # seconds between sweeps of expired keys


class StateStore(Protocol):
    async def get(self, key: str) -> str | None: ...
    async def put(self, key: str, value: str, ttl: float) -> None: ...
    async def incr(self, key: str, ttl: float) -> int: ...
    async def delete(self, key: str) -> None: ...
    async def close(self) -> None: ...


class MemoryState:
    """The same interface in memory (tests, and state that need not survive)."""

    def __init__(self, clock=time.time) -> None:
        self._data: dict[str, tuple[str, float]] = {}
        self._clock = clock

    async def get(self, key: str) -> str | None:
        entry = self._data.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def put(self, key: str, value: str, ttl: float) -> None:
        self._data[key] = (value[:MAX_VALUE], self._clock() + ttl)

    async def incr(self, key: str, ttl: float) -> int:
        n = int(await self.get(key) or 0) + 1
        await self.put(key, str(n), ttl)
        return n

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        pass


class SQLiteState:
    """StateStore in one SQLite file (WAL); opened lazily on first use."""

    def __init__(self, path: Path, clock=time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db = None
        self._opening: asyncio.Lock | None = None
        self._last_purge = 0.0

    async def _conn(self):
        if self._db is not None:
            return self._db
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._db is None:
                import aiosqlite

                db = await aiosqlite.connect(str(self.path), isolation_level=None)
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.execute("PRAGMA busy_timeout=5000")
                await db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                                 "expires REAL NOT NULL)")
                self._db = db
        return self._db

    async def _maybe_purge(self, db, now: float) -> None:
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        await db.execute("DELETE FROM state WHERE expires <= ?", (now,))

    async def get(self, key: str) -> str | None:
        db = await self._conn()
        async with db.execute("SELECT value, expires FROM state WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        if row is None or row[1] <= self._clock():
            return None
        return row[0]

    async def put(self, key: str, value: str, ttl: float) -> None:
        db = await self._conn()
        now = self._clock()
        await db.execute("INSERT INTO state (key, value, expires) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                         "SET value = excluded.value, expires = excluded.expires", (key, value[:MAX_VALUE], now + ttl))
        await self._maybe_purge(db, now)

    async def incr(self, key: str, ttl: float) -> int:
        db = await self._conn()
        now = self._clock()
        # One statement: atomic even with several writers on the file.
        async with db.execute(
                "INSERT INTO state (key, value, expires) VALUES (?, '1', ?) ON CONFLICT(key) DO UPDATE SET "
                "value = CASE WHEN state.expires <= ? THEN '1' ELSE CAST(CAST(state.value AS INTEGER) + 1 AS TEXT) "
                "END, expires = excluded.expires RETURNING value", (key, now + ttl, now)) as cur:
            row = await cur.fetchone()
        return int(row[0])

    async def delete(self, key: str) -> None:
        db = await self._conn()
        await db.execute("DELETE FROM state WHERE key = ?", (key,))

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
