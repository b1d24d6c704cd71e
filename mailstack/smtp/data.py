"""The DATA reader: message text in, one copy of the message out.  No I/O.

    reader = DataReader(max_size=25 << 20, max_line=4096, bare="reject")
    rest = reader.feed(chunk)        # call with each chunk received after "354"
    if reader.done: ...              # `rest` is what followed the end of data (pipelined commands)
    reader.error                     # None | "size" | "line" | "bare" | "resources"
    reader.chunks                    # the message, dot-unstuffed, CRLF line ends (only if no error)

The end of data is found on the raw byte stream, before and independently of any
other processing: it is the first "<CR><LF>.<CR><LF>", where the data is taken to
start right after the <CR><LF> that ended the DATA command.  Nothing else ends
DATA: not "<LF>.<LF>", "<LF>.<CR><LF>", "<CR>.<CR>", "<CR><LF>.<LF>" or any other
mix (SMTP smuggling, see https://www.postfix.org/smtp-smuggling.html).

A bare LF or bare CR in the text (one not part of a CRLF pair):
  - bare="reject": the message is refused (error "bare"); we keep reading to the
    real end of data so that the client and we agree on where the next command starts.
  - bare="normalize": each one becomes a CRLF line end.  A line that then consists of
    "." alone is *not* the end of data (only the raw CRLF.CRLF above is); like every
    line that starts with ".", it loses its first dot (RFC 5321 4.5.2), so the client's
    "<LF>.<LF>" arrives as an empty line.  Postfix 3.9 `smtpd_forbid_bare_newline =
    normalize` also requires the standard CRLF.CRLF end and treats a bare-LF line end
    as CRLF; we treat bare CR the same way, so no mix of line ends passes through.

Once an error is set, the bytes are dropped as they arrive (memory stays bounded) and
only the search for the end continues.  Kept bytes are the chunks as received where
possible (the common case costs no extra copy): a chunk is sliced only around a
stuffed dot or at a chunk boundary that splits a line.
"""
from __future__ import annotations

import re

END = b"\r\n.\r\n"
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


class DataReader:
    def __init__(self, max_size: int, max_line: int, bare: str = "reject") -> None:
        if bare not in ("reject", "normalize"):
            raise ValueError(f"bare must be 'reject' or 'normalize', not {bare!r}")
        self.max_size = max_size
        # A raw line may carry one transparency dot on top of the limit (RFC 5321 4.5.3.1.6).
        self.line_limit = max_line + 1
        self.normalize = bare == "normalize"
        self.chunks: list[bytes] = []
        self.size = 0  # bytes kept in `chunks` (the message size as stored)
        self.received = 0  # raw bytes of message text seen, kept or not
        self.error: str | None = None
        self.done = False
        self._prev = b"\r\n"  # the last (up to 4) bytes of processed text: the CRLF before the data
        self._held = b""  # a trailing CR whose partner (LF or not) has not arrived yet
        self._at_bol = True
        self._line_len = 0

    # --- input -----------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume `data`; return the bytes after the end of data ("" until it is found)."""
        if self.done:
            return data
        if self._held:
            data = self._held + data
            self._held = b""
        end = self._find_end(data)
        if end is None:
            if data.endswith(b"\r"):
                self._held = b"\r"
                self._text(data, 0, len(data) - 1)
            else:
                self._text(data, 0, len(data))
            self._remember(data, len(data) - len(self._held))
            return b""
        start, body_end = end
        self._text(data, 0, body_end)
        self.done = True
        return data[start + 5:]

    def fail(self, reason: str) -> None:
        """Refuse the message: drop what was kept, keep looking for the end. First reason wins."""
        if self.error is None:
            self.error = reason
        self.chunks = []
        self.size = 0

    # --- end of data ------------------------------------------------------------
    def _find_end(self, data: bytes) -> tuple[int, int] | None:
        """(start of CRLF.CRLF in data, end of message text in data) or None.  `start` may be
        negative when the marker began in bytes already processed."""
        prev = self._prev
        probe = prev + data[:4]
        i = probe.find(END)
        if i >= 0:
            start = i - len(prev)
        else:
            start = data.find(END)
            if start < 0:
                return None
        return start, max(0, start + 2)

    def _remember(self, data: bytes, upto: int) -> None:
        if upto >= 4:
            self._prev = data[upto - 4:upto]
        else:
            self._prev = (self._prev + data[:upto])[-4:]

    # --- message text -------------------------------------------------------------
    def _text(self, p: bytes, a: int, b: int) -> None:
        """Process text p[a:b]: never ends with a CR whose partner is unknown."""
        if b <= a:
            return
        self.received += b - a
        if self.error is not None:
            return
        crlf = p.count(b"\r\n", a, b)
        if crlf == p.count(b"\r", a, b) == p.count(b"\n", a, b):
            self._lines(p, a, b)
        elif not self.normalize:
            self.fail("bare")
        else:
            fixed = _LINE_ENDS.sub(b"\r\n", p[a:b])
            self._lines(fixed, 0, len(fixed))

    def _lines(self, p: bytes, a: int, b: int) -> None:
        """p[a:b] has CRLF line ends only: check line lengths, unstuff dots, keep."""
        limit = self.line_limit
        first = p.find(b"\n", a, b)
        if first < 0:
            self._line_len += b - a
            if self._line_len > limit:
                return self.fail("line")
        else:
            if self._line_len + first + 1 - a > limit:
                return self.fail("line")
            last = p.rfind(b"\n", a, b)
            if last - first > limit and max(map(len, p[first + 1:last].split(b"\n"))) + 1 > limit:
                return self.fail("line")
            self._line_len = b - last - 1
            if self._line_len > limit:
                return self.fail("line")
        # Dot-unstuffing: cut out the first byte of every line that starts with ".".
        cuts = []
        if self._at_bol and p[a:a + 1] == b".":
            cuts.append(a)
        i = p.find(b"\n.", a, b)
        while i >= 0:
            cuts.append(i + 1)
            i = p.find(b"\n.", i + 2, b)
        self._at_bol = p[b - 1:b] == b"\n"
        if not cuts:
            self._keep(p if a == 0 and b == len(p) else p[a:b])
            return
        pos = a
        for cut in cuts:
            if cut > pos:
                self._keep(p[pos:cut])
            pos = cut + 1
        if pos < b:
            self._keep(p[pos:b])

    def _keep(self, piece: bytes) -> None:
        if self.error is not None:
            return
        self.size += len(piece)
        if self.size > self.max_size:
            self.fail("size")
            return
        self.chunks.append(piece)
