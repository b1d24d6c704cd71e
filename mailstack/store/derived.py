"""The derived data of delivered messages (metadata-index entry, full-text rows), written
in batches by one background writer per store, after the "250" and off the delivery path.

Why batches: one delivered message's derived data costs ~0.3 ms of Python parsing plus,
alone, ~1 ms of SQLite (one FTS5 transaction); in a transaction of a hundred messages the
SQLite share falls to ~0.25 ms each.  And why off the delivery path: work done in a worker
thread while the event loop answers the next command holds the GIL against it; done per
message, it ran exactly when the loop wanted to send the "250" and read the next command.

So a delivered message (its bytes still in hand) waits here until deliveries pause: no
new one for LINGER seconds (or MAX_WAIT after the oldest pending one, under a steady
stream), then one worker call parses every pending message once (index.message_entry,
fts.texts_of), appends one run of lines per mailbox to its index file and adds the texts of
each mailbox in one FTS5 transaction.  `note(entry)` is then called on the loop for each
message (the store puts the entry into the loaded index of the mailbox); None when it
could not be made.

Why wait for a pause rather than a fixed time after the first message: the parse is
~0.4 ms of Python a message, sharing the GIL and the two cores with the loop accepting the
next ones; during a burst it took a fifth of what the server did a message (issue 16,
docs/benchmarks.md).  So during a burst at most MAX_ITEMS messages (MAX_BYTES) wait, and
the burst's messages past that are left, like big ones, to the first look (the index
parses a message without an entry from its file; a search adds missing rows): what
Dovecot does for every message.  The price is paid by the first IMAP listing or body
search of those messages, once, not by the sender waiting for its "250".

Why a lost batch is harmless: the index and the full-text index are derived data, "rebuilt
or repaired, never wrong".  A message without an index entry (a crash, kill -9, a shutdown
between the Maildir file and the batch, or more pending than MAX_BYTES) is parsed from its
file when first looked at (index.py: like a message dropped in behind the server's back),
and one without full-text rows is read and added by the next search (fts.answer).  Rows
written late for a message expunged meanwhile are ignored (fts.py keys rows by base name
and counts only bases in the view; an index line of a base no longer listed is never asked
for).  Nothing here is state: quota and CONDSTORE's modseqs are recorded by the store
itself, exactly, before the delivery returns.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from . import fts
from . import index as idxmod

log = logging.getLogger("mailstack.store")

LINGER = 0.25  # seconds without a new delivery before the pending batch is made
MAX_WAIT = 10.0  # ... or seconds after its oldest message arrived, deliveries going on
MAX_ITEMS = 512  # messages waiting (one worker call); beyond: indexed when first looked at
MAX_BYTES = 32 << 20  # bytes held in memory waiting; beyond: likewise

_append_lock = threading.Lock()  # two calls in flight must not both create an index file


class _Item:
    __slots__ = ("mailbox_dir", "base", "uidvalidity", "message", "note", "entry", "texts")

    def __init__(self, mailbox_dir: Path, base: str, uidvalidity: int, message: bytes,
                 note: Callable[[dict | None], None] | None) -> None:
        self.mailbox_dir, self.base, self.uidvalidity = mailbox_dir, base, uidvalidity
        self.message, self.note = message, note
        self.entry: dict | None = None
        self.texts: tuple[str, str] | None = None


class DerivedWriter:
    """Used on the event loop (one per store)."""

    def __init__(self) -> None:
        self._pending: list[_Item] = []
        self._bytes = 0
        self._first = 0.0  # monotonic time the oldest pending message arrived
        self._last = 0.0  # ... and the newest
        self._task: asyncio.Task | None = None
        self._work: set = set()
        self.batches = 0  # counters, for tests and the benchmark notes
        self.written = 0
        self.skipped = 0

    def add(self, mailbox_dir: Path, base: str, uidvalidity: int, message: bytes,
            note: Callable[[dict | None], None] | None = None) -> None:
        if len(self._pending) >= MAX_ITEMS or self._bytes + len(message) > MAX_BYTES:
            self.skipped += 1  # a long burst, or one of big mail: made when first looked at
            return
        now = time.monotonic()
        if not self._pending:
            self._first = now
        self._last = now
        self._pending.append(_Item(mailbox_dir, base, uidvalidity, message, note))
        self._bytes += len(message)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # One timer a LINGER at most, however many deliveries: each does not re-arm it.
            wait = min(self._last + LINGER, self._first + MAX_WAIT) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # (flush() may have taken them meanwhile)
            batch, self._pending, self._bytes = self._pending, [], 0
            await self.write_now(batch, loop)

    async def write_now(self, batch: list[_Item], loop=None) -> None:
        loop = loop or asyncio.get_running_loop()
        try:
            work = loop.run_in_executor(None, derive, batch)
        except RuntimeError:  # the executor is shut down: made when first looked at
            return
        self._work.add(work)
        try:
            await work
        except Exception:  # noqa: BLE001 - derived data only
            log.exception("writing the index entries of delivered messages failed")
            return
        finally:
            self._work.discard(work)
        self.batches += 1
        self.written += len(batch)
        for item in batch:
            item.message = b""  # let the bytes go
            if item.note is not None:
                try:
                    item.note(item.entry)
                except Exception:  # noqa: BLE001 - derived data only
                    log.exception("noting an index entry failed")

    async def flush(self) -> None:
        """Write what is pending now and wait for it (tests, shutdown)."""
        while self._pending or self._work:
            if self._pending:
                batch, self._pending, self._bytes = self._pending, [], 0
                await self.write_now(batch)  # the lingering task finds nothing and ends
            else:
                await asyncio.wait(set(self._work))
        task, self._task = self._task, None
        if task is not None and not task.done():
            # the lingering task sleeps on with nothing to write: at shutdown the loop would
            # close under it ("Task was destroyed but it is pending"); a later add() starts anew
            task.cancel()


# ---------------------------------------------------------------- blocking (worker thread)

def derive(batch: list[_Item]) -> None:
    """Parse each message once; one index append and one FTS5 transaction per mailbox.
    Sets item.entry (with "fts": True when its rows were added), None when not made."""
    lines: dict[tuple[Path, int], list[bytes]] = {}
    docs: dict[Path, list[tuple[str, str, str]]] = {}
    for item in batch:
        # Let the event loop have the GIL between two messages: else it waits for the
        # interpreter's switch interval (5 ms) whenever it wakes during a batch.
        time.sleep(0)
        try:
            entry = idxmod.message_entry(item.message)
            line = idxmod.delivered_line(item.base, entry)
        except Exception:  # noqa: BLE001 - a parser bug must not matter: indexed when first looked at
            log.warning("could not index %s at delivery", item.base, exc_info=True)
            continue
        item.entry = entry
        lines.setdefault((item.mailbox_dir, item.uidvalidity), []).append(line)
        try:
            head, body = fts.texts_of(item.message)
            docs.setdefault(item.mailbox_dir, []).append((item.base, head, body))
        except Exception:  # noqa: BLE001 - derived data: added when first searched
            log.warning("could not extract the text of %s at delivery", item.base, exc_info=True)
    for (mailbox_dir, uidvalidity), group in lines.items():
        try:
            with _append_lock:
                idxmod.append_lines(mailbox_dir / idxmod.NAME, uidvalidity, group)
        except Exception:  # noqa: BLE001 - a full disk: the entries are made when first looked at
            log.warning("could not append to the index of %s", mailbox_dir, exc_info=True)
            for item in batch:
                if item.mailbox_dir == mailbox_dir:
                    item.entry = None
    for mailbox_dir, group in docs.items():
        try:
            fts.add(mailbox_dir / fts.NAME, group)
        except Exception as e:  # noqa: BLE001 - sqlite3.Error, a full disk: added at the next search
            log.warning("full-text index of %s not updated (%s): filled at the next search", mailbox_dir, e)
            continue
        added = {base for base, _, _ in group}
        for item in batch:
            if item.entry is not None and item.mailbox_dir == mailbox_dir and item.base in added:
                item.entry["fts"] = True
