"""MIME structure of big message files without reading them into memory.

fetch.parse() works on anything that finds, slices, counts and can be searched by a
regular expression.  `MappedMessage` is the file mapped read-only (mmap) with the two
bytes methods mmap lacks, so the same parser gives BODYSTRUCTURE and the byte range of
BODY[1.2] of a 50 MB message with no copy of it in the process: its pages are the page
cache's, shared by every session that looks at the same file and dropped when the map is
closed.  The section's bytes are then streamed from the file like BODY[] (fetching.py).

Everything here is blocking: call from a worker thread.
"""
from __future__ import annotations

import mmap
import os

from . import fetch

COUNT_PIECE = 1 << 20  # count() works through the map a piece at a time


class MappedMessage(mmap.mmap):
    """A message file mapped read-only, with bytes' startswith() and count(), and a find()
    that goes through the map a piece at a time.  The pages a long scan has passed are
    unmapped behind it (MADV_DONTNEED: they stay in the page cache), so the process's RSS
    holds about one piece of each map, not the file: several sessions mapping the same
    file would otherwise each count all of its pages."""

    def _release(self, start: int, end: int) -> None:
        start -= start % mmap.PAGESIZE
        if end > start:
            self.madvise(mmap.MADV_DONTNEED, start, end - start)

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = len(self) if end is None else min(end, len(self))
        if end - start <= COUNT_PIECE:
            return super().find(sub, start, end)
        pos = start
        while pos < end:
            stop = min(pos + COUNT_PIECE + len(sub) - 1, end)  # overlap: a match across two pieces
            i = super().find(sub, pos, stop)
            if i >= 0:
                return i
            self._release(pos, stop - len(sub) + 1)
            pos += COUNT_PIECE
        return -1

    def startswith(self, prefix: bytes, start: int = 0, end: int | None = None) -> bool:
        end = len(self) if end is None else min(end, len(self))
        return start + len(prefix) <= end and self[start:start + len(prefix)] == prefix

    def count(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = len(self) if end is None else min(end, len(self))
        if len(sub) != 1:  # a longer needle could straddle two pieces
            n, pos = 0, start
            while (pos := self.find(sub, pos, end)) >= 0:
                n, pos = n + 1, pos + len(sub)
            return n
        n = 0
        for i in range(start, end, COUNT_PIECE):
            n += self[i:min(i + COUNT_PIECE, end)].count(sub)
            self._release(i, min(i + COUNT_PIECE, end))
        return n


def open_mapped(path: str) -> MappedMessage | None:
    """The file mapped, or None when it is empty (mmap cannot map nothing)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        return MappedMessage(f.fileno(), 0, access=mmap.ACCESS_READ)


def cache_entry_of_file(path: str) -> dict:
    """fetch.cache_entry() of a message file, computed through the map."""
    mapped = open_mapped(path)
    if mapped is None:
        return fetch.cache_entry(b"")
    try:
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        return fetch.cache_entry(mapped)
    finally:
        mapped.close()


def section_range(data, root: fetch.Part, section) -> "tuple[int, int] | bytes":
    """What fetch.section_bytes(data, root, section) gives, as a (start, end) byte range of
    the file when it is one, or as bytes when it is made (HEADER.FIELDS, an empty MIME
    header) or nothing (a part that does not exist: b"", as Dovecot answers)."""
    text = section.text
    if not section.part:
        part = root
    else:
        part = fetch.find_part(root, section.part)
        if part is None:
            return b""
    if text == "MIME":
        return (part.start, part.body_start) if part.start != part.body_start else b"\r\n"
    if section.part and text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"):
        if part.message is None:
            return b""
        part = part.message
    if text == "":
        return (0, len(data)) if not section.part else (part.body_start, part.end)
    if text == "TEXT":
        return part.body_start, part.end
    hend, bstart = fetch.split_header(data, part.start, part.end)
    if text == "HEADER":
        return part.start, bstart
    return fetch.header_fields(data[part.start:hend], section.fields, text == "HEADER.FIELDS.NOT")


def sections_of_file(path: str, sections: list) -> dict[bytes, "tuple[int, int] | bytes"]:
    """{section.spec(): section_range(...)} for a message file, through the map."""
    mapped = open_mapped(path)
    if mapped is None:
        return {s.spec(): b"" for s in sections}
    try:
        root = fetch.parse(mapped)
        return {s.spec(): section_range(mapped, root, s) for s in sections}
    finally:
        mapped.close()
