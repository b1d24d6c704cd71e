"""IMAP command framing: the byte stream cut into whole commands, no I/O (the h11 way).

A command is a list of parts: line, literal, line, literal, ..., line (even indices are
line pieces, each ending with the `{n}` / `{n+}` marker that announces the next literal,
the last one without CRLF).  `CommandFramer` enforces the bounds: line length, literal
size (message size for APPEND, line length for everything else), total command size; and
it tells the session when a synchronising literal needs a "+" continuation.  parser.py
turns one framed command into a `Command`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

@dataclass
class Frame:
    parts: list[bytes]  # line, literal, line, ... (see module docstring)


@dataclass
class Continuation:
    """A synchronising literal was announced and accepted: send "+ ..." now (or, to refuse
    it after all, call CommandFramer.refuse_literal() and answer the command instead)."""

    tag: bytes | None = None
    size: int = 0


@dataclass
class FrameError:
    """A bound was exceeded. `tag` when known; `fatal`: the stream cannot be resynchronised
    (the client is sending literal bytes we refuse to hold), so the session must say BYE."""

    tag: bytes | None
    message: str
    fatal: bool = False
    code: str | None = None  # response code, e.g. "TOOBIG"


LITERAL_RE = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n?$")
_TAG_CMD_RE = re.compile(rb"([^ ]*) +(?:(?i:UID) +)?([A-Za-z]+)")


class CommandFramer:
    def __init__(self, max_line: int, max_literal: int, max_message: int) -> None:
        self.max_line = max_line  # bytes of one line piece
        self.max_literal = max_literal  # a literal outside APPEND
        self.max_message = max_message  # an APPEND literal
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._literal_left = 0  # > 0: reading literal bytes
        self._literal: bytearray | None = None
        self._total = 0
        self._discarding = False  # skipping the rest of an over-long line
        self._discard_tag: bytes | None = None
        self.events: list = []

    @property
    def buffered(self) -> int:
        return len(self._buf) + (len(self._literal) if self._literal is not None else 0)

    @property
    def discarding(self) -> bool:
        """Throwing away the rest of an over-long line (COMPRESS takes it for a bomb)."""
        return self._discarding

    def feed(self, data: bytes) -> None:
        """Consume bytes; complete events are appended to `self.events`."""
        self._buf += data
        self._run()

    def _command_limits(self) -> tuple[int, int]:
        first = self._parts[0] if self._parts else bytes(self._buf[:200])
        m = _TAG_CMD_RE.match(first)
        if m and m.group(2).upper() == b"APPEND":
            return self.max_message, self.max_message + 4 * self.max_line
        return self.max_literal, 4 * self.max_line + 4 * self.max_literal

    def _tag(self) -> bytes | None:
        first = self._parts[0] if self._parts else bytes(self._buf[:200])
        tag = first.split(b" ", 1)[0]
        return tag if 0 < len(tag) <= 64 and b"\n" not in tag else None

    def refuse_literal(self) -> None:
        """Drop the command whose synchronising literal was just announced (the client
        sends nothing more of it until it sees "+")."""
        self._reset()

    def _reset(self) -> None:
        self._parts = []
        self._total = 0
        self._literal = None
        self._literal_left = 0

    def _run(self) -> None:
        buf = self._buf
        while buf:
            if self._literal_left:
                take = min(self._literal_left, len(buf))
                self._literal += buf[:take]
                del buf[:take]
                self._literal_left -= take
                if not self._literal_left:
                    self._parts.append(bytes(self._literal))
                    self._literal = None
                continue
            nl = buf.find(b"\n")
            if self._discarding:
                if nl < 0:
                    buf.clear()
                    return
                del buf[:nl + 1]
                self._discarding = False
                self.events.append(FrameError(self._discard_tag, "command line too long"))
                self._reset()
                continue
            if nl < 0:
                if len(buf) > self.max_line:
                    self._discard_tag = self._tag()
                    self._discarding = True
                    buf.clear()
                return
            if nl + 1 > self.max_line + 2:
                self._discard_tag = self._tag()
                del buf[:nl + 1]
                self.events.append(FrameError(self._discard_tag, "command line too long"))
                self._reset()
                continue
            line = bytes(buf[:nl + 1])
            del buf[:nl + 1]
            self._total += len(line)
            m = LITERAL_RE.search(line)
            if m is None:
                piece = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                self._parts.append(piece)
                self.events.append(Frame(self._parts))
                self._reset()
                continue
            # A literal follows.
            piece = line[:m.end(2) + 1]  # keep "{n}" / "{n+}" for the parser
            self._parts.append(piece)
            size = int(m.group(1))
            sync = not m.group(2)
            max_lit, max_total = self._command_limits()
            if size > max_lit or self._total + size > max_total:
                tag = self._tag()
                if sync:
                    # The client waits for "+" and will not send it: just refuse the command.
                    self.events.append(FrameError(tag, "literal too big", code="TOOBIG"))
                    self._reset()
                    continue
                self.events.append(FrameError(tag, "non-synchronising literal too big", fatal=True,
                                              code="TOOBIG"))
                self._reset()
                buf.clear()
                return
            self._total += size
            self._literal = bytearray()
            self._literal_left = size
            if sync:
                self.events.append(Continuation(self._tag(), size))
            if size == 0:
                self._parts.append(b"")
                self._literal = None


