"""What every content filter shares: the error a filter raises when it cannot give a
verdict (the chain then applies the filter's configured default), and header helpers."""
from __future__ import annotations

import re


class FilterUnavailable(Exception):
    """The filter daemon is down, slow, or answered something unusable."""


class LearnRefused(FilterUnavailable):
    """The learner answered but would not learn this message (e.g. too few tokens): no retry."""


def fold(name: str, items: list[str], sep: str = ";") -> str:
    """A long header value, folded after each item (lines stay under ~78 characters mostly)."""
    return (sep + "\n\t").join(items)


def strip_headers(message: bytes, names: set[bytes]) -> bytes:
    """The message without any header whose lower-cased name is in `names` (so a sender cannot
    pass off its own X-Spam-Status: No as ours)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message
    head, rest = message[:end + 2], message[end + 2:]
    out, skipping, changed = [], False, False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.partition(b":")[0].strip().lower() in names
        changed |= skipping
        if not skipping:
            out.append(line)
    if not changed:
        return message
    return b"".join(l + b"\r\n" for l in out) + rest


_SUBJECT = re.compile(rb"^Subject:[^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n", re.I | re.M)


def replace_subject(message: bytes, subject: str) -> bytes:
    """The message with its Subject: set to `subject` (added if it had none)."""
    end = message.find(b"\r\n\r\n")
    head, rest = (message[:end + 2], message[end + 2:]) if end >= 0 else (message, b"")
    line = b"Subject: " + subject.replace("\r", " ").replace("\n", " ").encode("utf-8") + b"\r\n"
    new, n = _SUBJECT.subn(lambda m: line, head, count=1)
    return (new if n else head + line) + rest
