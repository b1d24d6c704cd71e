"""RETR's reading side for messages that are files: what RETR sends, made in worker threads.

Two shapes, both bounded in memory and both exact (the bytes MessageEncoder gives):

* Small messages are read whole, several at a time, ahead of the client: a client that
  downloads its mailbox asks RETR 1, RETR 2, ... one after the other, and each would
  otherwise wait for its own thread hand-off to read a 10 KB file.  `read_ahead` reads
  and encodes the next few messages in one hop while the client is busy with the last
  one; their RETR is then one write.  Content is safe to keep: a Maildir file's bytes
  never change under its name (the session still checks the message exists at RETR).
* Big messages are streamed from one open descriptor (`FileStream`), a chunk at a time,
  encoded (CRLF, dot-stuffing) in the worker thread too, so the event loop only writes.
"""
from __future__ import annotations

import errno
import os
import threading

from .parser import MessageEncoder, ok

# A big message is read and encoded in pieces of this size (memory per session stays bounded).
STREAM_CHUNK = 512 * 1024
# Messages up to this POP3 size are read whole, and may be read ahead.
SMALL_MESSAGE = 256 * 1024
# What one session may hold read ahead: bytes and messages.  A read starts when half of it
# is taken: each is a thread hop and a wake-up of the loop when it ends, which on a loaded
# 2-core machine cost more than the reads (32 and 512 KiB: RETR 1,000 took ~15 % longer).
READ_AHEAD_BYTES = 1024 * 1024
READ_AHEAD_COUNT = 64


def _read_fd(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    parts = [data]  # grew since the stat (never for Maildir files): read to the end
    while chunk := os.read(fd, STREAM_CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def encode_file(path: str, max_size: int | None = None) -> bytes:
    """Blocking: the whole message at `path` as RETR sends it (without the terminator).
    OSError (EFBIG) for a file over `max_size` octets."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        if max_size is not None and file_size > max_size:  # its name's W= said small
            raise OSError(errno.EFBIG, "bigger than its size said")
        data = _read_fd(fd, file_size)
    finally:
        os.close(fd)
    enc = MessageEncoder()
    return enc.feed(data) + enc.end()


def read_ahead(wanted: list[tuple[int, str, int]]) -> dict[int, tuple[bytes, int]]:
    """Blocking: (key, path, POP3 size) -> {key: (RETR's whole answer, octets of the encoded
    message in it)}: built here, so RETR is one write of ready bytes.  A file that cannot be
    read now is left out: RETR reads it again the ordinary way and reports what went wrong."""
    out: dict[int, tuple[bytes, int]] = {}
    for key, path, size in wanted:
        try:
            body = encode_file(path, SMALL_MESSAGE)
        except OSError:
            continue
        # one copy of the body (two + would make two)
        out[key] = (b"".join((ok(f"{size} octets"), body, b".\r\n")), len(body))
    return out


class FileStream:
    """One message read from one descriptor, `STREAM_CHUNK` at a time, encoded.

    `next()` runs in a worker thread, one call at a time; `close()` may be called from the
    event loop at any moment (a session cancelled at shutdown while a read is running): the
    descriptor is then closed by that read when it ends, never under it."""

    def __init__(self, path: str) -> None:
        """Blocking: opens the file (FileNotFoundError when it has been renamed or removed)."""
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.file_size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise
        self._encoder = MessageEncoder()
        self._offset = 0
        self._lock = threading.Lock()
        self._busy = False
        self._close_wanted = False
        self._closed = False
        self.done = False  # the last piece (with the encoder's end) has been handed out

    def next(self) -> bytes:
        """Blocking: the next encoded piece; the last one carries the encoder's end."""
        with self._lock:
            if self._closed or self._close_wanted:
                raise OSError("stream closed")
            self._busy = True
        try:
            chunk = os.pread(self._fd, STREAM_CHUNK, self._offset)
            self._offset += len(chunk)
            out = self._encoder.feed(chunk)
            # a short read is the end (a Maildir file does not grow); so is the size seen at open
            if len(chunk) < STREAM_CHUNK or self._offset >= self.file_size and \
                    not os.pread(self._fd, 1, self._offset):
                out += self._encoder.end()
                self.done = True
            return out
        finally:
            with self._lock:
                self._busy = False
                if self._close_wanted:
                    self._close_locked()

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def close(self) -> None:
        with self._lock:
            self._close_wanted = True
            if not self._busy:
                self._close_locked()
