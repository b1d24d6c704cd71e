"""ClamAV's clamd over INSTREAM (zINSTREAM, length-prefixed chunks, a zero-length end).

Answers: "stream: OK", "stream: <Name> FOUND", "... ERROR".  A virus refuses the message
at the end of DATA with 554 5.7.0 (as clamav-milter does); clamd down, slow or in error
-> the configured default.  `parse_reply` is pure.
"""
from __future__ import annotations

import asyncio
import struct

from ..smtp.hooks import Connection, Transaction, Verdict
from .base import FilterUnavailable

CHUNK = 64 * 1024
MAX_REPLY = 4096


def parse_reply(reply: bytes) -> str | None:
    """clamd's answer -> virus name, or None when clean; FilterUnavailable on an error."""
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace")
    _, _, result = text.partition(": ") if text.startswith("stream") else ("", "", text)
    if result == "OK":
        return None
    if result.endswith(" FOUND") and len(result) > 6:
        return result[:-6].strip() or "unknown"
    raise FilterUnavailable(f"clamd: {text[:200] or 'empty answer'}")


class Clamd:
    name = "clamd"

    def __init__(self, host: str, port: int, socket_path: str, timeout: float) -> None:
        self.host, self.port, self.socket_path = host, port, socket_path
        self.timeout = timeout

    async def scan(self, conn: Connection, txn: Transaction, message: bytes) -> Verdict:
        virus = await self.scan_bytes(message)
        v = Verdict()
        if virus is None:
            v.log["clamd"] = "clean"
            v.headers.append(("X-Virus-Scanned", "clamd (mailstack)"))
            return v
        v.log["clamd"] = virus
        v.meta["virus"] = virus
        v.reply = f"554 5.7.0 Message rejected: virus found ({virus})"
        return v

    async def scan_bytes(self, data: bytes) -> str | None:
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                if self.socket_path:
                    reader, writer = await asyncio.open_unix_connection(self.socket_path)
                else:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(b"zINSTREAM\0")
                for i in range(0, len(data), CHUNK):
                    piece = data[i:i + CHUNK]
                    writer.write(struct.pack("!I", len(piece)) + piece)
                    await writer.drain()
                writer.write(struct.pack("!I", 0))
                reply = b""
                while not reply.endswith(b"\0") and len(reply) < MAX_REPLY:
                    chunk = await reader.read(MAX_REPLY)
                    if not chunk:
                        break
                    reply += chunk
        except TimeoutError:
            raise FilterUnavailable(f"clamd: no answer within {self.timeout:g}s") from None
        except OSError as e:
            raise FilterUnavailable(f"clamd: {e.strerror or e}") from None
        finally:
            if writer is not None:
                writer.close()
        return parse_reply(reply)
