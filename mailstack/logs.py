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
    """Writes on its own thread: a write to stderr can block (a slow pipe, a full terminal
    buffer) and the event loop must not wait for it.  Lines waiting together are written
    with one write().

    The caller's thread only fixes the message text (its %-arguments are merged now, while
    they are what they were when logged); the line around it (time stamp, names, escaping,
    an exception's traceback) is made on the writer's thread: the event loop logs three lines
    per SMTP message, and this halves what each costs it."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.lines: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mailstack-log", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def handle(self, record: logging.LogRecord) -> bool:
        # No lock around emit: SimpleQueue.put is thread-safe on its own.
        rv = self.filter(record)
        if rv:
            if isinstance(rv, logging.LogRecord):
                record = rv
            self.emit(record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.args:
                record.msg, record.args = record.getMessage(), None
            self.lines.put(record)
        except Exception:
            self.handleError(record)

    def _format(self, record: logging.LogRecord) -> str | None:
        try:
            return self.format(record)
        except Exception:
            self.handleError(record)
            return None

    def _run(self) -> None:
        while True:
            record = self.lines.get()
            batch = []
            while record is not None:
                line = self._format(record)
                if line is not None:
                    batch.append(line)
                if len(batch) >= 512:
                    break
                try:
                    record = self.lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self.stream.write("\n".join(batch) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr gone: nothing else to tell
            if record is None:
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
    # What no formatter here shows, so no record needs it (the logging docs' "Optimization"):
    # the caller's file and line (a walk up the stack per line), thread and process names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiosmtpd logs every command at INFO; keep its chatter at warning unless debugging.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
