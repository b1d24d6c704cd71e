"""The MTA side of a milter conversation: one socket per (SMTP connection, milter).

A `MilterSession` is opened when the SMTP client connects and follows the SMTP session
(connect, helo, mail, rcpt, then header/eoh/body/eom at the end of DATA), as Postfix
does.  Every read is bounded by the milter's timeouts; a milter that fails or is slow
raises `MilterUnavailable` and the caller applies that milter's default action.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from . import codec

log = logging.getLogger("mailstack.filters")


class MilterUnavailable(Exception):
    """The milter could not be reached, timed out or broke the protocol."""


@dataclass(frozen=True)
class MilterConfig:
    """One configured milter (see config key filters.milters)."""

    name: str  # as configured: "inet:127.0.0.1:8891" or "unix:/run/x.sock"
    host: str | None
    port: int | None
    path: str | None
    default_action: str = "tempfail"  # accept | tempfail | reject
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0


def parse_milter(spec: str, defaults: dict) -> MilterConfig:
    """"inet:HOST:PORT" or "unix:PATH", optionally followed by space-separated key=value
    settings (default_action=accept, connect_timeout=5, command_timeout=10, content_timeout=60).
    Raises ValueError with a one-line reason."""
    words = spec.split()
    if not words:
        raise ValueError("empty milter address")
    address, settings = words[0], dict(defaults)
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or key not in settings:
            raise ValueError(f"{word!r}: expected one of {', '.join(f'{k}=' for k in settings)}")
        if key == "default_action":
            if value not in ("accept", "tempfail", "reject"):
                raise ValueError(f"{word!r}: default_action must be accept, tempfail or reject")
            settings[key] = value
        else:
            try:
                settings[key] = float(value.rstrip("s"))
            except ValueError:
                raise ValueError(f"{word!r}: {key} must be a number of seconds") from None
            if not 0 < settings[key] <= 3600:
                raise ValueError(f"{word!r}: {key} must be between 0 and 3600 seconds")
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return MilterConfig(spec, None, None, rest, **settings)
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return MilterConfig(spec, host, int(port), None, **settings)
    raise ValueError(f"{address!r}: expected inet:HOST:PORT or unix:/PATH")


class MilterSession:
    """One conversation with one milter.  Not reentrant: the SMTP session awaits each call."""

    def __init__(self, cfg: MilterConfig) -> None:
        self.cfg = cfg
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = codec.Decoder()
        self.pending: list[codec.Response] = []
        self.actions = 0
        self.protocol = 0
        self.symlists: dict[int, list[str]] = {}

    # --- connection --------------------------------------------------------------------
    async def open(self) -> None:
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                if self.cfg.path is not None:
                    self.reader, self.writer = await asyncio.open_unix_connection(self.cfg.path)
                else:
                    self.reader, self.writer = await asyncio.open_connection(self.cfg.host, self.cfg.port)
        except (OSError, TimeoutError) as e:
            raise MilterUnavailable(f"cannot connect: {e or 'timed out'}") from None
        self.writer.write(codec.encode_optneg())
        answer = await self._next(self.cfg.command_timeout)
        if answer.code != codec.R_OPTNEG:
            raise MilterUnavailable(f"expected option negotiation, got {answer.code!r}")
        if answer.version < 2:
            raise MilterUnavailable(f"milter protocol version {answer.version} is too old")
        self.actions = answer.actions & codec.ALL_ACTIONS
        self.protocol = answer.protocol & codec.MTA_PROTOCOL  # never more than we offered
        self.symlists = answer.symlists

    def close(self, quit: bool = True) -> None:
        if self.writer is None:
            return
        try:
            if quit:
                self.writer.write(codec.packet(codec.QUIT))
            self.writer.close()
        except Exception:  # the transport may already be gone
            pass
        self.writer = None

    @property
    def is_open(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    # --- commands ------------------------------------------------------------------------
    def _macros(self, command: bytes, stage: int, macros: dict[str, str]) -> bytes:
        wanted = self.symlists.get(stage)
        if wanted is not None:
            names = set(wanted) | {w.strip("{}") for w in wanted}
            macros = {k: v for k, v in macros.items() if k in names or k.strip("{}") in names}
        macros = {k: v for k, v in macros.items() if v is not None}
        return codec.encode_macros(command, macros) if macros else b""

    def wants(self, command: bytes) -> bool:
        return not self.protocol & codec.SKIP_BIT.get(command, 0)

    async def send(self, command: bytes, data: bytes, macros: dict[str, str] | None = None,
                   stage: int | None = None) -> codec.Response | None:
        """Send one command (with its macros first); return the final answer, or None when the
        milter asked for this step not to be sent or not to be answered."""
        if macros and stage is not None:
            self.writer.write(self._macros(command, stage, macros))
        if not self.wants(command):
            return None
        self.writer.write(data)
        if self.protocol & codec.NOREPLY_BIT.get(command, 0):
            return None
        answer = await self._final(self.cfg.command_timeout)
        if answer.code in codec.MODIFICATIONS:
            raise MilterUnavailable(f"modification {answer.code!r} outside end of message")
        return answer

    async def send_body(self, body: bytes) -> codec.Response | None:
        """Body chunks; stops early if the milter answers skip (or anything final but continue)."""
        if not self.wants(codec.BODY):
            return None
        for chunk in codec.encode_body(body):
            self.writer.write(chunk)
            if self.protocol & codec.P_NR_BODY:
                continue
            answer = await self._final(self.cfg.command_timeout)
            if answer.code != codec.R_CONTINUE:
                return answer
        return None

    async def end_of_message(self, macros: dict[str, str]) -> tuple[codec.Response, list[codec.Response]]:
        """SMFIC_BODYEOB: modifications (in order) and the final answer."""
        self.writer.write(self._macros(codec.BODYEOB, codec.STAGE_EOM, macros))
        self.writer.write(codec.packet(codec.BODYEOB))
        mods: list[codec.Response] = []
        while True:
            answer = await self._next(self.cfg.content_timeout)
            if answer.code == codec.R_PROGRESS:
                continue  # "still working": the timeout starts again
            if answer.code in codec.MODIFICATIONS:
                if len(mods) >= 10000:
                    raise MilterUnavailable("too many modifications")
                mods.append(answer)
                continue
            if answer.code not in codec.FINAL:
                raise MilterUnavailable(f"unexpected answer {answer.code!r} at end of message")
            return answer, mods

    def abort(self) -> None:
        """SMFIC_ABORT: forget the current transaction (the connection goes on)."""
        if self.is_open:
            self.writer.write(codec.packet(codec.ABORT))

    # --- reading ---------------------------------------------------------------------------
    async def _final(self, timeout: float) -> codec.Response:
        while True:
            answer = await self._next(timeout)
            if answer.code != codec.R_PROGRESS:
                return answer

    async def _next(self, timeout: float) -> codec.Response:
        try:
            async with asyncio.timeout(timeout):
                while not self.pending:
                    data = await self.reader.read(65536)
                    if not data:
                        raise MilterUnavailable("connection closed by the milter")
                    self.pending.extend(self.decoder.feed(data))
        except TimeoutError:
            raise MilterUnavailable(f"no answer within {timeout:g}s") from None
        except codec.ProtocolError as e:
            raise MilterUnavailable(f"protocol error: {e}") from None
        except OSError as e:
            raise MilterUnavailable(f"read failed: {e}") from None
        return self.pending.pop(0)
