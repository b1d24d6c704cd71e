"""Progress of an import or export: a one-line bar on a terminal, plain log lines otherwise,
and a final summary.  Pure bookkeeping plus printing; nothing here touches mail."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

REDRAW = 0.2  # seconds between bar redraws on a terminal
LOG_EVERY = 10.0  # seconds between plain progress lines


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def human_time(s: float) -> str:
    s = int(max(0, s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class Counts:
    folders_total: int = 0
    folders_done: int = 0
    messages_total: int = 0
    copied: int = 0
    skipped: int = 0  # already there (journal, Message-ID + size, kept UID)
    failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0  # copied or found already there (for the rate and ETA)
    bytes_copied: int = 0
    warnings: list[str] = field(default_factory=list)


class Progress:
    def __init__(self, verb: str = "imported", stream=None, tty: bool | None = None) -> None:
        self.verb = verb
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.c = Counts()
        self.started = time.monotonic()
        self._drawn = 0.0
        self._logged = time.monotonic()
        self.folder = ""

    # -- events -------------------------------------------------------------------------------
    def plan(self, folders: int, messages: int = 0, size: int = 0) -> None:
        self.c.folders_total, self.c.messages_total, self.c.bytes_total = folders, messages, size

    def add_work(self, messages: int, size: int = 0) -> None:
        self.c.messages_total += messages
        self.c.bytes_total += size

    def begin_folder(self, name: str) -> None:
        self.folder = name
        if not self.tty:
            self.line(f"folder {name}")
        self.tick(force=True)

    def end_folder(self) -> None:
        self.c.folders_done += 1
        self.tick(force=True)

    def copied(self, size: int) -> None:
        self.c.copied += 1
        self.c.bytes_done += size
        self.c.bytes_copied += size
        self.tick()

    def skipped(self, n: int = 1, size: int = 0) -> None:
        self.c.skipped += n
        self.c.bytes_done += size
        self.tick()

    def failed(self, why: str) -> None:
        self.c.failed += 1
        self.warn(why)

    def warn(self, text: str) -> None:
        if len(self.c.warnings) < 1000:
            self.c.warnings.append(text)
        self.line(f"warning: {text}")

    # -- output -------------------------------------------------------------------------------
    def status_text(self) -> str:
        c = self.c
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = c.bytes_done / elapsed
        done = c.copied + c.skipped + c.failed
        eta = ""
        if c.messages_total and done and done < c.messages_total:
            # by messages: the byte total of folders not yet listed is not known in advance
            eta = f" ETA {human_time((c.messages_total - done) * elapsed / done)}"
        return (f"folders {c.folders_done}/{c.folders_total}  messages {done}/{c.messages_total}  "
                f"{human_bytes(c.bytes_done)}  {human_bytes(rate)}/s{eta}")

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._drawn >= REDRAW:
                self._drawn = now
                c = self.c
                done = c.copied + c.skipped + c.failed
                frac = done / c.messages_total if c.messages_total else 0.0
                width = 20
                bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
                text = f"[{bar}] {self.status_text()}  {self.folder}"
                self.stream.write("\r\x1b[K" + text[:200])
                self.stream.flush()
        elif now - self._logged >= LOG_EVERY:
            self._logged = now
            self.line(self.status_text())

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = 0.0

    def summary(self) -> str:
        c = self.c
        elapsed = time.monotonic() - self.started
        text = (f"{self.verb}: {c.copied} messages ({human_bytes(c.bytes_copied)}) in {c.folders_done} folders, "
                f"{c.skipped} already there, {c.failed} failed, {len(c.warnings)} warnings, "
                f"in {human_time(elapsed)}")
        self.line(text)
        return text
