"""Command lines out of received bytes.  No I/O.

    buf = LineBuffer(bare="reject")
    buf.feed(data)
    event = buf.next_line(limit)     # None (need more bytes) or (kind, line)

kind is "line" (a good line, terminator removed), "too_long" (a line over `limit`
bytes including its CRLF; its bytes were dropped as they arrived, so a client cannot
make us hold more than `limit` plus one read), or "bare" (the line ended in, or
contained, a bare LF or bare CR: only reported with bare="reject").

With bare="normalize" a bare LF or a bare CR ends a line, as a CRLF would.  A CR at
the very end of the buffer is then undecided until the next byte arrives.
"""
from __future__ import annotations


class LineBuffer:
    def __init__(self, bare: str = "reject") -> None:
        self.buf = bytearray()
        self.normalize = bare == "normalize"
        self._discarding = False  # inside a line already reported too long

    def feed(self, data: bytes) -> None:
        self.buf += data

    def clear(self) -> None:
        """Forget everything received so far (after STARTTLS: RFC 3207 section 5)."""
        self.buf.clear()
        self._discarding = False

    def take(self) -> bytes:
        """Everything buffered, for the DATA reader."""
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def has_line(self) -> bool:
        return b"\n" in self.buf or (self.normalize and b"\r" in self.buf[:-1])

    def next_line(self, limit: int) -> tuple[str, bytes] | None:
        buf = self.buf
        nl = buf.find(b"\n")
        if self.normalize:
            cr = buf.find(b"\r", 0, len(buf) - 1 if nl < 0 else nl)
            if 0 <= cr and (cr + 1 != nl):
                end, cut = cr, cr + 1  # a bare CR ends the line
            elif nl >= 0:
                end, cut = (nl - 1 if nl and buf[nl - 1] == 13 else nl), nl + 1
            else:
                end = cut = -1
        else:
            end, cut = (nl - 1 if nl > 0 and buf[nl - 1] == 13 else nl), nl + 1
            if nl < 0:
                end = cut = -1
        if cut < 0:
            if len(buf) > limit:
                # Drop what we have but a trailing CR, which may pair with the next LF.
                keep = 1 if buf.endswith(b"\r") else 0
                del buf[:len(buf) - keep]
                self._discarding = True
            return None
        line = bytes(buf[:end])
        del buf[:cut]
        if self._discarding:
            self._discarding = False
            return "too_long", b""
        if cut > limit:
            return "too_long", b""
        if not self.normalize and (end == nl or b"\r" in line):
            return "bare", line
        return "line", line
