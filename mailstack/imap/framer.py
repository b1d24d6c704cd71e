"""IMAP command framing: the byte stream cut into whole commands, no I/O (the h11 way).

A command is a list of parts: line, literal, line, literal, ..., line (even indices are
line pieces, each ending with the `{n}` / `{n+}` marker that announces the next literal,
the last one without CRLF).  `CommandFramer` enforces the bounds: line length, literal
size (message size for APPEND, line length for everything else), total command size; and
it tells the session when a synchronising literal needs a "+" continuation.  parser.py
turns one framed command into a `Command`.

A big non-synchronising literal (LITERAL+) is offered to the `reserve` callback (the
session's share of the process-wide budget of message bytes in memory) as soon as it is
announced; when that refuses, its bytes and the rest of the command are skipped and the
command is answered NO [LIMIT].  What was reserved for a command travels with its Frame /
FrameError (`reserved`), for the session to give back once it is done with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

@dataclass
class Frame:
    parts: list[bytes]  # line, literal, line, ... (see module docstring)
    reserved: int = 0  # bytes `reserve` granted for this command's literals (give back when done)


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
    reserved: int = 0  # as Frame.reserved


LITERAL_RE = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n?$")
RESERVE_AT = 65536  # non-synchronising literals bigger than this go through `reserve`

# --- literal8 (RFC 3516 BINARY, RFC 4466 append-data; UTF8=ACCEPT's APPEND uses it too) ----
# "~{n}" / "~{n+}" announces a literal that may hold any octet, NUL included.  It is framed
# exactly as a literal (LITERAL_RE finds its "{n}" at the end of the line piece, with the
# same continuation, LITERAL+ and size rules); the "~" stays in the line piece, so a grammar
# that allows literal8 reads it with `literal_at`.  A grammar that does not (everything but
# APPEND data) sees "~" where a string should start and answers BAD.
LITERAL8_RE = re.compile(rb"~\{(\d{1,20})(\+?)\}\r?\n?$")


def literal_at(line: bytes, pos: int, allow_literal8: bool = True) -> tuple[int, bool] | None:
    """The literal announced at `pos` of a line piece (which must end there): (size,
    is_literal8), or None when there is none."""
    m = LITERAL8_RE.match(line, pos) if allow_literal8 and line[pos:pos + 1] == b"~" else None
    if m is not None:
        return int(m.group(1)), True
    m = LITERAL_RE.match(line, pos)
    return (int(m.group(1)), False) if m is not None else None

_TAG_CMD_RE = re.compile(rb"([^ ]*) +(?:(?i:UID) +)?([A-Za-z]+)")


class CommandFramer:
    def __init__(self, max_line: int, max_literal: int, max_message: int,
                 max_append: int | None = None, reserve: Callable[[int], bool] | None = None) -> None:
        self.max_line = max_line  # bytes of one line piece
        self.max_literal = max_literal  # a literal outside APPEND
        self.max_message = max_message  # an APPEND literal
        # all literals of one APPEND (MULTIAPPEND: several messages; CATENATE: several parts)
        self.max_append = max(max_message, max_append or 0)
        self.reserve = reserve
        self._reserved = 0  # granted by `reserve` to the command being read
        self._skipping: FrameError | None = None  # the answer of a command whose bytes we skip
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
            return self.max_message, self.max_append + 4 * self.max_line
        return self.max_literal, 4 * self.max_line + 4 * self.max_literal

    def _tag(self) -> bytes | None:
        first = self._parts[0] if self._parts else bytes(self._buf[:200])
        tag = first.split(b" ", 1)[0]
        return tag if 0 < len(tag) <= 64 and b"\n" not in tag else None

    def refuse_literal(self) -> int:
        """Drop the command whose synchronising literal was just announced (the client
        sends nothing more of it until it sees "+").  Returns what `reserve` had granted to
        it, for the caller to give back."""
        reserved = self._reserved
        self._reset()
        return reserved

    @property
    def pending_reserved(self) -> int:
        """Granted by `reserve` to commands not handed over yet: the one being read and the
        events still queued (give back at disconnect)."""
        return self._reserved + sum(getattr(e, "reserved", 0) for e in self.events)

    def _reset(self) -> None:
        self._parts = []
        self._total = 0
        self._literal = None
        self._literal_left = 0
        self._reserved = 0
        self._skipping = None

    def _fail(self, tag: bytes | None, message: str, **kw) -> None:
        """Answer the command being read with an error; what it had reserved goes along."""
        self.events.append(FrameError(tag, message, reserved=self._reserved, **kw))
        self._reset()

    def _run(self) -> None:
        buf = self._buf
        while buf:
            if self._literal_left:
                take = min(self._literal_left, len(buf))
                if self._literal is not None:  # else skipped (see `reserve`)
                    self._literal += buf[:take]
                del buf[:take]
                self._literal_left -= take
                if not self._literal_left and self._literal is not None:
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
                self._fail(self._discard_tag, "command line too long")
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
                self._fail(self._discard_tag, "command line too long")
                continue
            line = bytes(buf[:nl + 1])
            del buf[:nl + 1]
            self._total += len(line)
            m = LITERAL_RE.search(line)
            if m is None:
                piece = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                self._parts.append(piece)
                if self._skipping is not None:
                    self._fail(self._skipping.tag, self._skipping.message, code=self._skipping.code)
                    continue
                self.events.append(Frame(self._parts, self._reserved))
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
                    self._fail(tag, "literal too big", code="TOOBIG")
                    continue
                self._fail(tag, "non-synchronising literal too big", fatal=True, code="TOOBIG")
                buf.clear()
                return
            if self._skipping is not None and sync:  # refused already: the client waits for "+"
                self._fail(self._skipping.tag, self._skipping.message, code=self._skipping.code)
                continue
            self._total += size
            self._literal = bytearray()
            self._literal_left = size
            if not sync and size > RESERVE_AT and self.reserve is not None and self._skipping is None:
                if self.reserve(size):
                    self._reserved += size
                else:  # its bytes are on their way: skip them and the rest of the command
                    self._skipping = FrameError(self._tag(), "Server busy, try again later", code="LIMIT")
            if self._skipping is not None:
                self._literal = None
            if sync:
                self.events.append(Continuation(self._tag(), size))
            if size == 0:
                self._parts.append(b"")
                self._literal = None


