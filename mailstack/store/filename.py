"""Maildir file names: making unique ones and reading what they carry.

A name is "<base>:2,<flags>" in cur/ and "<base>" in new/ and tmp/.  Bases made here are

    <seconds>.M<usec>P<pid>Q<counter>[D<delivery id>].<host>,S=<size>

(the Maildir spec's unique name plus Dovecot's ",S=" size), where <seconds> is the message's
internal date, so listing a folder gives size and date without a stat().  <usec> comes from
the clock at creation and <counter> is per process, so two bases made by one process never
collide, even for copies that share an internal date.  The delivery id (escaped to
[A-Za-z0-9-] plus "_XX" hex) makes local delivery idempotent: a redelivery after a crash
finds its id among the names already there.
"""
from __future__ import annotations

import itertools
import os
import re
import socket
import time

from .base import StoreError

MAX_DELIVERY_ID = 200
_counter = itertools.count(1)
_OWN = re.compile(r"^(\d+)\.M\d+P\d+Q\d+(?:D([A-Za-z0-9_-]+))?\.")
# The whole of a base made here: date, usec, counter, delivery id, size in one match (the hot
# path of a scan).
_OWN_FULL = re.compile(r"^(\d+)\.M(\d+)P\d+Q(\d+)(?:D([A-Za-z0-9_-]+))?\..*,S=(\d+)(?:,|$)")


def _hostname() -> str:
    # The spec's escapes for the two characters that cannot appear in a base; "," would
    # confuse the ",S=" field and "." is fine (the host is the last dotted part we read).
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


HOST = _hostname()


def escape_delivery_id(delivery_id: str) -> str:
    if not isinstance(delivery_id, str) or not delivery_id or len(delivery_id) > MAX_DELIVERY_ID:
        raise StoreError("bad delivery id")
    # only the few unsafe characters (the "." of qid.hash) go through Python code
    return _ID_UNSAFE.sub(_escape_char, delivery_id)


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def _escape_char(m: "re.Match[str]") -> str:
    return "".join(f"_{b:02X}" for b in m.group().encode("utf-8"))


def new_base(internaldate: float, size: int, delivery_id: str | None = None) -> str:
    """A fresh unique base name.  `delivery_id` must already be escaped."""
    now = time.time()
    mid = f"M{int(now * 1_000_000) % 1_000_000}P{os.getpid()}Q{next(_counter)}"
    if delivery_id:
        mid += "D" + delivery_id
    return f"{int(internaldate)}.{mid}.{HOST},S={size}"


def split(name: str) -> tuple[str, str]:
    """(base, flag letters) of a file name; letters are "" without a ":2," info part."""
    base, sep, info = name.partition(":")
    if sep and info.startswith("2,"):
        return base, info[2:]
    return base, ""


def join(base: str, letters: str) -> str:
    return f"{base}:2,{letters}"


def size_of(base: str) -> int | None:
    """The ",S=<size>" field of a base, if present and well formed."""
    i = base.find(",S=")
    if i < 0:
        return None
    digits = base[i + 3:].split(",", 1)[0]
    return int(digits) if digits.isdigit() else None


def own_time(base: str) -> int | None:
    """The internal date of a base made by this module (any mailstack process); None for
    names made by other programs, whose leading number may be something else."""
    m = _OWN.match(base)
    return int(m.group(1)) if m else None


_ORDER = re.compile(r"^(\d+)\.M(\d+)P\d+Q(\d+)")


def arrival_key(base: str, fallback_time: float | None = None) -> tuple:
    """Sort key giving arrival order, so UIDs follow delivery order: numeric, not textual
    ("M99999" sorts after "M100000" as text, within the same second)."""
    m = _ORDER.match(base)
    if m:
        return (int(m.group(1)), int(m.group(2)), int(m.group(3)), base)
    return (fallback_time or 0, 0, 0, base)


def delivery_id_of(base: str) -> str | None:
    """The escaped delivery id carried by a base, if any."""
    m = _OWN.match(base)
    return m.group(2) if m else None


def parse_base(base: str) -> tuple[int | None, int | None, str | None]:
    """(size, internal date, escaped delivery id) carried by a base; None where it carries none."""
    m = _OWN_FULL.match(base)
    if m:
        return int(m.group(5)), int(m.group(1)), m.group(4)
    return size_of(base), own_time(base), delivery_id_of(base)


def scan_base(base: str) -> tuple[int | None, int | None, str | None, tuple | None]:
    """parse_base() and, for a base made here, the start of its arrival_key(), from one match:
    a scan of 1,000 files dropped into new/ parsed each name three times."""
    m = _OWN_FULL.match(base)
    if m:
        date = int(m.group(1))
        return int(m.group(5)), date, m.group(4), (date, int(m.group(2)), int(m.group(3)), base)
    return size_of(base), own_time(base), delivery_id_of(base), None


def usable(name: str) -> bool:
    """False for names this store must not touch: hidden files (other programs' temporaries)
    and names that would break the one-line-per-message uidlist."""
    return bool(name) and not name.startswith(".") and "\n" not in name and "\r" not in name
