"""Logging: stderr, one event per line, plain text or JSON.

Pass context with `extra={"qid": ..., "client": ...}`; the formatters put the queue
id and the client address on every line that has them, as Postfix does.
"""
from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import threading
import time


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [f"{ts} {record.levelname.lower()} {record.name.removeprefix('mailstack.')}:"]
        client = getattr(record, "client", None)
        if client:
            parts.append(f"[{client}]")
        qid = getattr(record, "qid", None)
        if qid:
            parts.append(f"{qid}:")
        parts.append(record.getMessage())
        # One event per line: a CR or LF from the network (an IMAP literal user name, say)
        # must not start a forged log line.
        line = " ".join(parts).replace("\r", "\\r").replace("\n", "\\n")
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": record.name.removeprefix("mailstack."),
            "message": record.getMessage(),
        }
        for key in ("qid", "client", "listener", "user"):
            value = getattr(record, key, None)
            if value:
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


class BackgroundWriter(logging.Handler):
    """Formats on the caller's thread, writes on its own: a write to stderr can block (a slow
    pipe, a full terminal buffer) and the event loop must not wait for it.  Lines waiting
    together are written with one write()."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mailstack-log", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put(self.format(record))
        except Exception:
            self.handleError(record)

    def _run(self) -> None:
        while True:
            line = self.lines.get()
            batch = []
            while line is not None:
                batch.append(line)
                if len(batch) >= 512:
                    break
                try:
                    line = self.lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self.stream.write("\n".join(batch) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr gone: nothing else to tell
            if line is None:
                return

    def close(self) -> None:
        if self.thread.is_alive():
            self.lines.put(None)
            self.thread.join(5)
        super().close()


def setup(level: str = "info", fmt: str = "text", background: bool = False) -> None:
    """Log to stderr. background=True (the server) writes from a thread of its own."""
    handler = BackgroundWriter(sys.stderr) if background else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # aiosmtpd logs every command at INFO; keep its chatter at warning unless debugging.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
