"""Reading message files for FETCH (blocking: called in worker threads): a whole file in one
read, the part of a file that holds its header, a big message's header found in bounded
pieces.  Plain os calls where files are opened by the thousand."""
from __future__ import annotations

import os

from . import fetch

HEADER_PEEK = 16384  # bytes read first when only the header is needed
HEAD_KEEP = 1 << 20  # header bytes kept in memory for BODY[HEADER.FIELDS] of a streamed message
HEAD_PIECE = 256 * 1024  # bytes read per piece while looking for a big header's end


def head_of(path: str) -> tuple[bytes, int]:
    """(the header bytes, at most HEAD_KEEP of them; the offset where the body starts) of a
    message file, found by reading it in bounded pieces (blocking: run in a thread).  A
    header without an end runs to the end of the file, as fetch.split_header says."""
    with open(path, "rb") as f:
        data = f.read(HEADER_PEEK)
        _, bstart = fetch.split_header(data)
        if bstart < len(data) or len(data) < HEADER_PEEK:
            return data[:bstart], bstart
        head = bytearray(data)
        pos = len(data)  # file offset of the end of `data`
        tail = data[-3:]  # a blank line may straddle two reads
        while True:
            piece = f.read(HEAD_PIECE)
            if not piece:
                return bytes(head), pos
            if len(head) < HEAD_KEEP:
                head += piece[:HEAD_KEEP - len(head)]
            window = tail + piece
            m = fetch._BLANK.search(window)
            if m is not None:
                bstart = pos - len(tail) + m.end()
                return bytes(head[:bstart]), bstart
            pos += len(piece)
            tail = window[-3:]


HEADER_FIRST = 4096  # most headers end within the first page


def read_whole(path: str, size: int) -> bytes:
    """Blocking: a whole message file, in one read when `size` (the index's: the name's S=,
    or the size seen at the scan) is right.  Plain os calls: open() + read() costs ~3x as
    much per small file (a buffered object, an fstat, a second read to find the end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size + 1)
        if len(data) == size:  # asked one byte more and did not get it: the end
            return data
        chunks = [data]  # larger than said (read to the end), or shorter (make sure it ended)
        while piece := os.read(fd, 1 << 20):
            chunks.append(piece)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_header(path: str) -> bytes:
    """Blocking: the start of a message file that holds its whole header (or the whole
    file when it has no blank line): a page first, HEADER_PEEK next, then the rest.  Plain
    os calls: a cold listing opens thousands of files in a row."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, HEADER_FIRST)
        if len(data) < HEADER_FIRST or fetch._blank(data, 0, len(data)) is not None:
            return data
        chunks = [data]
        size = len(data)
        while size < HEADER_PEEK:  # to HEADER_PEEK, as the previous full read
            piece = os.read(fd, HEADER_PEEK - size)
            if not piece:
                return b"".join(chunks)
            chunks.append(piece)
            size += len(piece)
        data = b"".join(chunks)
        if fetch._blank(data, 0, len(data)) is not None:
            return data
        while True:  # no header end in HEADER_PEEK bytes: the whole file, as before
            piece = os.read(fd, 1 << 20)
            if not piece:
                return b"".join(chunks)
            chunks.append(piece)
    finally:
        os.close(fd)
