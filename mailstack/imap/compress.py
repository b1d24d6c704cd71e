"""COMPRESS=DEFLATE (RFC 4978): the command, and the compression layer under the session.

Once COMPRESS succeeds the session's `reader` and `writer` are replaced by the two wrappers
below, so every byte read or written anywhere (the command loop, IDLE, FETCH streaming,
BYE on shutdown or idle) goes through zlib: there is no other path to the socket left to
forget.  Both directions are raw deflate (no zlib header), on the event loop, no thread.

Bounds:
- Inflating never makes more than `READ_SIZE` bytes per read (max_length), and inflates
  more only when the session asks for more, i.e. when the framer has consumed what it
  had: a small compressed input cannot fill memory, the framer's own bounds (line,
  literal and command sizes) apply to the plain text as they do without compression.
  A line longer than the framer accepts is, under compression, almost surely a bomb:
  the session says BYE instead of inflating it to its end.
- Deflate with a 16 KiB window and memLevel 5: about 125 KiB of zlib state per session
  for both directions (measured with tracemalloc, tests/test_imap_compress.py), against
  ~300 KiB at zlib's defaults (Dovecot's), for 10.6x instead of 10.9x on FETCH 1:*
  ENVELOPE of the bench corpus (bench/compress_wire.py; a 4 KiB window gave 7.9x).
Every write is followed by Z_SYNC_FLUSH: the session writes only at the points where it
flushes today, so pipelined replies and IDLE pushes reach the client at once.
"""
from __future__ import annotations

import asyncio
import logging
import zlib
from typing import TYPE_CHECKING, Callable

from .states import AUTH, READ_SIZE, Bye

if TYPE_CHECKING:
    from .parser import Command

log = logging.getLogger("mailstack.imap")

LEVEL = 6
DEFLATE_WBITS = -14  # raw deflate, 16 KiB window: what we send (the client inflates with any window)
INFLATE_WBITS = -15  # raw deflate, 32 KiB window: the client may compress with the largest
MEM_LEVEL = 5


def parse_compress(c) -> dict:
    """`COMPRESS algorithm` (RFC 4978 3)."""
    c.sp()
    return {"algorithm": c.atom("compression algorithm").upper()}


class DeflateWriter:
    """Stands in for the asyncio.StreamWriter: compresses each write and flushes it."""

    def __init__(self, raw: asyncio.StreamWriter) -> None:
        self.raw = raw
        self._deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, DEFLATE_WBITS, MEM_LEVEL)
        self.plain_bytes = 0  # what the session wrote (for the log line at the end)
        self.wire_bytes = 0

    def write(self, data: bytes) -> None:
        if not data or self.raw.is_closing():
            return
        out = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.plain_bytes += len(data)
        self.wire_bytes += len(out)
        self.raw.write(out)

    async def drain(self) -> None:
        await self.raw.drain()

    @property
    def transport(self):
        return self.raw.transport

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def close(self) -> None:
        self.raw.close()

    def get_extra_info(self, name, default=None):
        return self.raw.get_extra_info(name, default)

    async def start_tls(self, *args, **kwargs):
        raise ConnectionError("no TLS over a compressed stream")  # STARTTLS is refused before


class InflateReader:
    """Stands in for the asyncio.StreamReader: `read(n)` gives at most n plain bytes."""

    def __init__(self, raw: asyncio.StreamReader, writer: DeflateWriter,
                 overflowing: Callable[[], bool]) -> None:
        self.raw = raw
        self.writer = writer
        self.overflowing = overflowing  # the framer is throwing away an over-long line
        self._inflate = zlib.decompressobj(INFLATE_WBITS)
        self._pending = b""  # compressed bytes not inflated yet (the rest of a big expansion)
        self._full = False  # the last inflate filled its output: zlib may hold more

    async def read(self, n: int = READ_SIZE) -> bytes:
        n = max(1, min(n, READ_SIZE))
        while True:
            if self.overflowing():
                self.writer.write(b"* BYE [TOOBIG] Compressed command line too long\r\n")
                raise Bye()
            if self._inflate.eof:  # the client ended its deflate stream: nothing can follow
                return b""
            if self._pending or self._full:
                data, self._pending = self._pending, b""
            else:
                data = await self.raw.read(READ_SIZE)
                if not data:
                    return b""
            try:
                out = self._inflate.decompress(data, n)
            except zlib.error:
                self.writer.write(b"* BYE [PARSE] Corrupt compressed data\r\n")
                raise Bye() from None
            self._pending = self._inflate.unconsumed_tail
            self._full = len(out) == n
            if out:
                return out


class CompressCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    compression: DeflateWriter | None = None

    async def cmd_compress(self, cmd: Command) -> None:
        if self.state < AUTH:  # as Dovecot: offered and accepted once logged in
            return self.tagged(cmd, "BAD", "Not authenticated")
        if cmd.args["algorithm"] != "DEFLATE":  # NO, as Dovecot answers
            return self.tagged(cmd, "NO", "Unknown compression mechanism")
        if self.compression is not None:
            return self.tagged(cmd, "NO", "[COMPRESSIONACTIVE] DEFLATE is active already")
        if self.framer.buffered or self.framer.events or len(getattr(self.reader, "_buffer", b"")):
            # What the client sent after the command is compressed already, and the framer
            # may have read it as plain commands: the stream cannot be resynchronised.
            self.tagged(cmd, "BAD", "Pipelined data after COMPRESS")
            raise Bye()
        self.tagged(cmd, "OK", "DEFLATE active")
        await self.flush()  # the OK is the last plain line; compression starts after its CRLF
        self.compression = DeflateWriter(self.writer)
        self.writer = self.compression
        self.reader = InflateReader(self.reader, self.compression, lambda: self.framer.discarding)
        log.info("IMAP COMPRESS=DEFLATE on", extra={"client": self.peer_ip})
