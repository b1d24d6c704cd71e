"""DMARC verdicts kept for aggregate reports (RFC 7489 7.2), accepted and refused alike.

One JSON object per line in <data_dir>/dmarc/YYYY-MM-DD.jsonl (UTC day), with what an
aggregate report row needs: source IP, header From domain, envelope sender domain, the
policy published, the disposition applied, DKIM and SPF results and alignment.  Building
and sending the report itself is not done here.

Lines are collected in memory and written by a worker thread at most once a second, so a
message never waits for this file; at most a second of records is lost if the process
dies (these are statistics, not mail).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("mailstack.senderauth")

FLUSH_DELAY = 1.0
MAX_PENDING = 10000  # beyond this (the disk is stuck) records are dropped, not memory grown


class VerdictLog:
    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.dir = Path(data_dir) / "dmarc"
        self._pending: list[tuple[float, str]] = []
        self._scheduled = False

    def record(self, entry: dict) -> None:
        """Queue one verdict (called on the event loop)."""
        if len(self._pending) >= MAX_PENDING:
            return
        now = time.time()
        self._pending.append((now, json.dumps({"time": round(now, 3), **entry}, separators=(",", ":"))))
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            loop.call_later(FLUSH_DELAY, lambda: loop.create_task(self.flush()))

    async def flush(self) -> None:
        lines, self._pending = self._pending, []
        self._scheduled = False
        if lines:
            try:
                await asyncio.to_thread(self._write, lines)
            except OSError as e:
                log.warning("cannot write DMARC verdicts to %s: %s", self.dir, e)

    def _write(self, lines: list[tuple[float, str]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        by_day: dict[str, list[str]] = {}
        for when, line in lines:
            by_day.setdefault(time.strftime("%Y-%m-%d", time.gmtime(when)), []).append(line)
        for day, day_lines in by_day.items():
            with open(self.dir / f"{day}.jsonl", "a", encoding="utf-8") as f:
                f.write("\n".join(day_lines) + "\n")
