"""Logging: stderr, one event per line, plain text or JSON.

Pass context with `extra={"qid": ..., "client": ...}`; the formatters put the queue
id and the client address on every line that has them, as Postfix does.
"""
from __future__ import annotations

import json
import logging
import sys
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


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # aiosmtpd logs every command at INFO; keep its chatter at warning unless debugging.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
