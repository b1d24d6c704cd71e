"""The size POP3 reports for each message: its octets in CRLF form (RFC 1939), which
differ from the stored size for LF-stored mail; dot-stuffing is not counted (a line
starting with "." is sent as ".." but is one octet of the message), as Dovecot does.

Computing it means reading the message, so it is done once per message and kept in
the store's per-message cache under the "pop3" key (the IMAP layer uses other keys
of the same entry).  Messages without a cached size are read in one worker thread.
"""
from __future__ import annotations

import asyncio
import re

from ..store.base import Mailbox, MessageInfo, StoreError
from .parser import message_size

CACHE_KEY = "pop3"
CACHE_VERSION = 2  # 1 counted dot-stuffing
# Marks a message that vanished while we looked (expunged over IMAP meanwhile): left out.
_GONE = -1
_W_VALUE = re.compile(r"([0-9]+)(?:[,:]|\Z)")
# Files without a known size are counted in pieces of this size.
COUNT_CHUNK = 1024 * 1024


def size_entry(data: bytes) -> dict:
    """The cache value for a message (also written by the store at delivery)."""
    return {"size": message_size(data), "v": CACHE_VERSION}


def size_from_name(key: str) -> int | None:
    """Dovecot's ",W=<n>" field of a Maildir base name: the size in CRLF form, which is
    exactly the POP3 size (Dovecot trusts it the same way; files are named so by Dovecot,
    by Postfix's virtual(8) and other deliverers)."""
    i = key.find(",W=")
    if i < 0:
        return None
    m = _W_VALUE.match(key, i + 3)  # one C call, not a Python loop per digit: 1,000 names at login
    return int(m.group(1)) if m else None


def file_message_size(path: str, chunk: int = COUNT_CHUNK) -> int:
    """Blocking: message_size() of a file, read `chunk` octets at a time (a 50 MB message
    is never held whole).  A CRLF cut in two by a chunk boundary is counted once."""
    size = 0
    prev_cr = False
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            size += len(data) + data.count(b"\n") - data.count(b"\r\n")
            if prev_cr and data[:1] == b"\n":
                size -= 1  # counted as bare above, but its CR ended the previous chunk
            prev_cr = data[-1:] == b"\r"
    return size


def _sizes_from_files(paths: list[tuple[int, str]]) -> dict[int, int]:
    """Blocking: read each file and count.  uid -> size; a file not found is left out (its
    name may have changed with its flags: the caller asks the store again)."""
    out: dict[int, int] = {}
    for uid, path in paths:
        try:
            out[uid] = file_message_size(path)
        except FileNotFoundError:
            pass
    return out


async def message_sizes(mailbox: Mailbox) -> tuple[list[MessageInfo], list[int]]:
    """A snapshot of the mailbox's messages and their POP3 sizes, in message-number order."""
    messages = list(mailbox.messages)
    sizes: dict[int, int] = {}
    cached_entries: dict[int, dict] = {}
    missing: list[MessageInfo] = []
    for info in messages:
        named = size_from_name(info.key)
        if named is not None:
            sizes[info.uid] = named
            continue
        entry = await mailbox.cache_get(info.uid)
        value = entry.get(CACHE_KEY) if entry else None
        if isinstance(value, dict) and value.get("v") == CACHE_VERSION and isinstance(value.get("size"), int):
            sizes[info.uid] = value["size"]
        else:
            cached_entries[info.uid] = dict(entry) if entry else {}
            missing.append(info)
    if missing:
        with_path = [(m.uid, p) for m in missing if (p := mailbox.path(m.uid)) is not None]
        computed = await asyncio.to_thread(_sizes_from_files, with_path) if with_path else {}
        for m in missing:
            if m.uid not in computed:  # a backend without files: read through the interface
                try:
                    data = await mailbox.read(m.uid)
                except (StoreError, KeyError, OSError):
                    computed[m.uid] = _GONE
                    continue
                computed[m.uid] = await asyncio.to_thread(message_size, data)
        updates = {}
        for uid, size in computed.items():
            sizes[uid] = size
            if size != _GONE:
                entry = cached_entries[uid]
                entry[CACHE_KEY] = {"size": size, "v": CACHE_VERSION}
                updates[uid] = entry
        if updates:
            try:
                await mailbox.cache_put(updates)
            except (StoreError, OSError):  # e.g. a full disk: computed again next time
                pass
    kept = [m for m in messages if sizes[m.uid] != _GONE]
    return kept, [sizes[m.uid] for m in kept]
