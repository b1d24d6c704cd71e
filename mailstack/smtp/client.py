"""SMTP client: one connection to one server address, and one mail transaction at a time.

The protocol pieces (reply parsing, commands, dot-stuffing) are in clientproto.py;
this module does the I/O, the timeouts and the decisions a conversation needs:
STARTTLS per policy (Postfix's smtp_tls_security_level), EHLO with HELO fallback,
AUTH for a relayhost, PIPELINING, SIZE, 8BITMIME and SMTPUTF8.

Errors are split the way routing needs them:
- HostError: this server cannot take the mail now (no connection, bad greeting,
  TLS required but missing, lost connection before the end of data...): try the
  next address, and defer when none is left.
- DataLost: the connection broke after the final "." was sent; the server may have
  the message, so the recipients are deferred (the Postfix way) rather than tried
  elsewhere at once.
Replies to the transaction itself (4xx/5xx per recipient) are results, not errors.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass

import aiofiles

from .clientproto import (DataEncoder, ProtocolError, Reply, ReplyParser, WireMessage, auth_mechanisms, auth_plain,
                          mail_command, needs_smtputf8, parse_ehlo, rcpt_command, size_limit)

log = logging.getLogger("mailstack.smtp.client")

CHUNK = 256 * 1024  # message text is written in slices, with drain() between, so nothing is copied whole


class HostError(Exception):
    """This server address cannot be used now. str() is "NNN X.Y.Z reason"."""

    def __init__(self, reply: str, retry_plaintext: bool = False, connected: bool = True) -> None:
        super().__init__(reply)
        self.reply = reply
        # A server we talked to says more than one we could not reach: the reason reported
        # for a deferral prefers it (e.g. "TLS required" over a backup MX's "Connection refused").
        self.connected = connected
        # "may" policy: the TLS handshake failed; the same server may be retried without TLS.
        self.retry_plaintext = retry_plaintext


class DataLost(Exception):
    """The connection broke after the end of data: outcome unknown."""


@dataclass(frozen=True)
class ClientSettings:
    helo_name: str
    tls_level: str = "may"  # none | may | encrypt | verify
    ca_file: str = ""
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    auth: tuple[str, str] | None = None  # (username, password), relayhost only
    implicit_tls: bool = False  # TLS from the first byte (port 465), relayhost only

    @classmethod
    def from_config(cls, cfg, auth: tuple[str, str] | None = None, implicit_tls: bool = False) -> "ClientSettings":
        d = cfg.delivery
        return cls(helo_name=d.helo_name or cfg.server.hostname, tls_level=d.tls_security_level,
                   ca_file=d.tls_ca_file, connect_timeout=d.connect_timeout, command_timeout=d.command_timeout,
                   data_timeout=d.data_timeout, auth=auth, implicit_tls=implicit_tls)


_contexts: dict[tuple[str, str], ssl.SSLContext] = {}


def tls_context(level: str, ca_file: str = "") -> ssl.SSLContext:
    """Client context for a policy level; built once per (level, CA file).

    `may` and `encrypt` do not check the certificate (as Postfix: opportunistic TLS
    still beats plaintext against a passive listener); `verify` checks chain and name.
    """
    key = (level, ca_file)
    ctx = _contexts.get(key)
    if ctx is None:
        if level == "verify":
            ctx = ssl.create_default_context(cafile=ca_file or None)
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        from ..tls import CLIENT_CIPHERS
        ctx.set_ciphers(CLIENT_CIPHERS)  # AEAD suites first (Mozilla intermediate), as the listeners
        _contexts[key] = ctx
    return ctx


@dataclass
class TransactionResult:
    recipient: str
    status: str  # "sent" | "deferred" | "bounced"
    reply: str


class SMTPConnection:
    """An open, greeted (and possibly TLS-protected, authenticated) SMTP session."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, ip: str,
                 port: int, settings: ClientSettings) -> None:
        self.reader, self.writer = reader, writer
        self.host, self.ip, self.port = host, ip, port
        self.settings = settings
        self.features: dict[str, str] = {}
        self.esmtp = True
        self.tls = False
        self.tls_verified = False
        self.reusable = True  # False once the server said 421 or anything went wrong
        self.broken = False
        self.created = time.monotonic()
        self.transactions = 0
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._stage = "connecting"

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.ip}]:{self.port}"

    # --- low level ---------------------------------------------------------
    def _fail(self, what: str, exc: BaseException | None = None) -> HostError:
        self.reusable = False
        self.broken = True  # no polite QUIT on a connection that timed out or broke
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return HostError(f"451 4.4.2 conversation with {self.relay} timed out while {what}")
        if isinstance(exc, ProtocolError):
            return HostError(f"451 4.5.0 protocol error from {self.relay} while {what}: {exc}")
        detail = f": {exc}" if exc and str(exc) else ""
        return HostError(f"451 4.4.2 lost connection with {self.relay} while {what}{detail}")

    async def _read_reply(self, timeout: float) -> Reply:
        async with asyncio.timeout(timeout):
            while not self._replies:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("connection closed by server")
                self._replies.extend(self._parser.feed(data))
        reply = self._replies.popleft()
        if reply.code == 421:
            self.reusable = False
        return reply

    async def _write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.settings.command_timeout):
            await self.writer.drain()

    async def command(self, line: bytes, what: str, timeout: float | None = None) -> Reply:
        try:
            await self._write(line)
            return await self._read_reply(timeout or self.settings.command_timeout)
        except (OSError, asyncio.TimeoutError, ProtocolError, ssl.SSLError) as e:
            raise self._fail(what, e) from None

    # --- session setup -------------------------------------------------------
    async def handshake(self, use_tls: bool) -> None:
        """Greeting, EHLO (HELO fallback), STARTTLS per policy, AUTH. Raises HostError."""
        s = self.settings
        try:
            greeting = await self._read_reply(s.command_timeout)
        except (OSError, asyncio.TimeoutError, ProtocolError) as e:
            raise self._fail("receiving the initial server greeting", e) from None
        if greeting.kind != 2:
            self.reusable = False
            raise HostError(_host_said(f"host {self.relay} refused to talk to me", greeting))
        await self._hello()
        offered = "STARTTLS" in self.features
        if self.tls:
            pass  # implicit TLS (port 465): already encrypted
        elif use_tls and s.tls_level != "none" and offered:
            await self._starttls()
            await self._hello()
        elif s.tls_level in ("encrypt", "verify"):
            self.reusable = False
            raise HostError(f"451 4.7.4 TLS is required, but was not offered by host {self.relay}")
        if s.auth and "AUTH" in self.features:
            await self._authenticate(*s.auth)

    async def _hello(self) -> None:
        name = self.settings.helo_name
        reply = await self.command(f"EHLO {name}\r\n".encode(), "sending EHLO")
        if reply.kind == 2:
            self.esmtp = True
            self.features = parse_ehlo(reply)
            return
        if reply.code in (500, 502, 504, 550) and not self.tls:
            reply = await self.command(f"HELO {name}\r\n".encode(), "sending HELO")
            if reply.kind == 2:
                self.esmtp, self.features = False, {}
                return
        raise HostError(_host_said(f"host {self.relay} refused to talk to me", reply, "EHLO/HELO"))

    async def _starttls(self) -> None:
        s = self.settings
        reply = await self.command(b"STARTTLS\r\n", "sending STARTTLS")
        if reply.kind != 2:
            if s.tls_level in ("encrypt", "verify"):
                raise HostError(_host_said(f"451 4.7.4 TLS is required, but host {self.relay} refused STARTTLS",
                                           reply, "STARTTLS"))
            raise HostError(_host_said(f"host {self.relay} refused STARTTLS", reply, "STARTTLS"),
                            retry_plaintext=True)
        if self._parser.buffered or self._replies:
            # Anything after the 220 was sent before TLS: a command injection attempt (CVE-2011-0411 class).
            raise HostError(f"451 4.7.0 host {self.relay} sent data after the STARTTLS reply")
        ctx = tls_context(s.tls_level, s.ca_file)
        server_name = self.host if not _is_ip_literal(self.host) else None
        if s.tls_level == "verify" and server_name is None:
            server_name = self.ip
        try:
            async with asyncio.timeout(s.command_timeout):
                await self.writer.start_tls(ctx, server_hostname=server_name)
        except ssl.SSLCertVerificationError as e:
            self.reusable, self.broken = False, True
            raise HostError(f"451 4.7.5 Server certificate not verified for {self.relay}: "
                            f"{e.verify_message or e.reason}") from None
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            self.reusable, self.broken = False, True
            raise HostError(f"451 4.7.5 TLS handshake with {self.relay} failed: {e}",
                            retry_plaintext=s.tls_level == "may") from None
        self.tls = True
        self.tls_verified = s.tls_level == "verify"
        self.features = {}

    async def _authenticate(self, username: str, password: str) -> None:
        if not self.tls:
            # Credentials never travel in the clear (Postfix's smtp_sasl_tls_security_options spirit).
            raise HostError(f"451 4.7.0 not sending AUTH credentials to {self.relay} without TLS")
        mechs = auth_mechanisms(self.features)
        if "PLAIN" in mechs:
            reply = await self.command(auth_plain(username, password), "sending AUTH")
        elif "LOGIN" in mechs:
            reply = await self.command(b"AUTH LOGIN\r\n", "sending AUTH")
            for secret in (username, password):
                if reply.code != 334:
                    break
                reply = await self.command(base64.b64encode(secret.encode()) + b"\r\n", "sending AUTH")
        else:
            raise HostError(f"451 4.7.0 no AUTH mechanism in common with {self.relay} "
                            f"(offered: {' '.join(sorted(mechs)) or 'none'})")
        if reply.code != 235:
            self.reusable = False
            raise HostError(_host_said(f"451 4.7.0 SASL authentication failed; host {self.relay}", reply,
                                       "AUTH", keep_code=False))

    # --- transactions ---------------------------------------------------------
    async def rset(self) -> bool:
        """Probe a cached connection before reuse (and clear any state)."""
        if self.writer.is_closing() or self.reader.at_eof():
            return False
        try:
            reply = await self.command(b"RSET\r\n", "sending RSET", timeout=min(20.0, self.settings.command_timeout))
        except HostError:
            return False
        return reply.kind == 2

    async def send(self, sender: str, recipients: list[str], message: WireMessage,
                   smtputf8_flag: bool = False) -> list[TransactionResult]:
        """One mail transaction. Returns a result per recipient; raises HostError (try
        elsewhere) or DataLost (outcome unknown)."""
        limit = size_limit(self.features)
        if limit is not None and message.size > limit:
            return _all(recipients, "bounced", f"552 5.3.4 message size {message.size} exceeds size limit "
                                                f"{limit} of server {self.relay}")
        utf8_needed = needs_smtputf8(sender, recipients, message.header_utf8 and smtputf8_flag)
        has_utf8 = "SMTPUTF8" in self.features
        if utf8_needed and not has_utf8:
            return _all(recipients, "bounced", f"554 5.6.7 SMTPUTF8 is required, but was not offered by "
                                                f"host {self.relay}")
        mail = mail_command(sender, message.size if "SIZE" in self.features else None,
                            message.eightbit and "8BITMIME" in self.features,
                            has_utf8 and (utf8_needed or smtputf8_flag))
        rcpts = [rcpt_command(r) for r in recipients]
        self.transactions += 1

        if "PIPELINING" in self.features:
            mail_reply, rcpt_replies, data_reply = await self._pipelined(mail, rcpts)
        else:
            mail_reply, rcpt_replies, data_reply = await self._lockstep(mail, rcpts)

        if mail_reply.kind != 2:
            if mail_reply.kind == 4:  # the server, not the recipients, has a problem now
                raise HostError(str(mail_reply))
            await self._reset_after_failure()
            return _all(recipients, "bounced", _reply_text(mail_reply, "MAIL FROM"))
        results: list[TransactionResult] = []
        accepted: list[str] = []
        for rcpt, reply in zip(recipients, rcpt_replies):
            if reply.kind == 2:
                accepted.append(rcpt)
            else:
                results.append(TransactionResult(rcpt, "bounced" if reply.kind == 5 else "deferred",
                                                 _reply_text(reply, "RCPT TO")))
        if not accepted:
            await self._reset_after_failure()
            return results
        if data_reply is None or data_reply.code != 354:
            if data_reply is not None and data_reply.kind == 4:
                raise HostError(str(data_reply))
            await self._reset_after_failure()
            status = "bounced" if data_reply is not None and data_reply.kind == 5 else "deferred"
            return results + _all(accepted, status, _reply_text(data_reply, "DATA") if data_reply
                                  else "451 4.5.0 no reply to DATA")
        final = await self._send_text(message)
        if final.kind == 2:
            status = "sent"
        else:
            status = "bounced" if final.kind == 5 else "deferred"
        return results + _all(accepted, status, _reply_text(final, "end of DATA") if status != "sent"
                              else str(final))

    async def _pipelined(self, mail: bytes, rcpts: list[bytes]):
        """RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order."""
        try:
            await self._write(b"".join([mail, *rcpts, b"DATA\r\n"]))
            t = self.settings.command_timeout
            mail_reply = await self._read_reply(t)
            rcpt_replies = [await self._read_reply(t) for _ in rcpts]
            data_reply = await self._read_reply(t)
        except (OSError, asyncio.TimeoutError, ProtocolError, ssl.SSLError) as e:
            raise self._fail("sending MAIL FROM/RCPT TO/DATA", e) from None
        if data_reply.code == 354 and (mail_reply.kind != 2 or not any(r.kind == 2 for r in rcpt_replies)):
            # The server opened DATA though nothing can be delivered: end it empty-handed.
            # An empty message would be delivered if it accepted anything, so this should not happen;
            # give up on the connection rather than send text.
            self.reusable = False
            raise HostError(f"451 4.5.0 host {self.relay} accepted DATA after rejecting the envelope")
        return mail_reply, rcpt_replies, data_reply

    async def _lockstep(self, mail: bytes, rcpts: list[bytes]):
        mail_reply = await self.command(mail, "sending MAIL FROM")
        if mail_reply.kind != 2:
            return mail_reply, [], None
        rcpt_replies = [await self.command(r, "sending RCPT TO") for r in rcpts]
        if not any(r.kind == 2 for r in rcpt_replies):
            return mail_reply, rcpt_replies, None
        return mail_reply, rcpt_replies, await self.command(b"DATA\r\n", "sending DATA")

    async def _send_text(self, message: WireMessage) -> Reply:
        try:
            if message.prefix:
                await self._write(message.prefix)
            if message.source is not None:
                await self._send_file(message.source)
            else:
                view = memoryview(message.body)
                for start in range(0, len(view), CHUNK):
                    await self._write(view[start:start + CHUNK])
            await self._write(b".\r\n")
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            raise self._fail("sending message body", e) from None
        try:
            return await self._read_reply(self.settings.data_timeout)
        except (OSError, asyncio.TimeoutError, ProtocolError, ssl.SSLError) as e:
            self.reusable = False
            raise DataLost(f"451 4.4.2 lost connection with {self.relay} after end of data "
                           f"(the message may be delivered twice): {_describe(e)}") from None

    async def _send_file(self, source: tuple[str, int, int]) -> None:
        """A big message's text from its queue file, read off the loop a piece at a time
        (aiofiles) and dot-stuffed piece by piece: memory stays one piece per transaction."""
        path, offset, size = source
        encoder = DataEncoder()
        async with aiofiles.open(path, "rb") as f:
            await f.seek(offset)
            left = size
            while left > 0:
                chunk = await f.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{path} is shorter than the {size} bytes queued")
                left -= len(chunk)
                await self._write(encoder.feed(chunk))
        await self._write(encoder.end())

    async def _reset_after_failure(self) -> None:
        if not self.reusable:
            return
        try:
            reply = await self.command(b"RSET\r\n", "sending RSET")
            if reply.kind != 2:
                self.reusable = False
        except HostError:
            self.reusable = False

    async def quit(self) -> None:
        """Polite goodbye, bounded in time; never raises."""
        try:
            if not self.broken and not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                async with asyncio.timeout(2):
                    await self.writer.drain()
                    await self._read_reply(2)
        except Exception:
            pass
        self.abort()

    def abort(self) -> None:
        self.reusable = False
        try:
            self.writer.close()
        except Exception:
            pass


async def connect(host: str, ip: str, port: int, settings: ClientSettings, use_tls: bool = True) -> SMTPConnection:
    """Open a connection to `ip` (which is `host`) and get it ready for transactions. Raises HostError."""
    label = f"{host}[{ip}]:{port}"
    tls_args: dict = {}
    if settings.implicit_tls:
        level = "verify" if settings.tls_level == "verify" else "encrypt"
        name = host if not _is_ip_literal(host) else (ip if level == "verify" else None)
        tls_args = {"ssl": tls_context(level, settings.ca_file), "server_hostname": name,
                    "ssl_handshake_timeout": settings.connect_timeout}
    try:
        async with asyncio.timeout(settings.connect_timeout):
            reader, writer = await asyncio.open_connection(ip, port, **tls_args)
    except (asyncio.TimeoutError, TimeoutError):
        raise HostError(f"451 4.4.1 connect to {label}: Connection timed out", connected=False) from None
    except ssl.SSLCertVerificationError as e:
        raise HostError(f"451 4.7.5 Server certificate not verified for {label}: "
                        f"{e.verify_message or e.reason}") from None
    except ssl.SSLError as e:
        raise HostError(f"451 4.7.5 TLS handshake with {label} failed: {e}") from None
    except OSError as e:
        # asyncio words it "Connect call failed (...)"; the errno text is what an operator knows.
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise HostError(f"451 4.4.1 connect to {label}: {reason}", connected=False) from None
    conn = SMTPConnection(reader, writer, host, ip, port, settings)
    if settings.implicit_tls:
        conn.tls, conn.tls_verified = True, settings.tls_level == "verify"
    try:
        await conn.handshake(use_tls)
    except HostError:
        await conn.quit()
        raise
    except BaseException:
        conn.abort()
        raise
    return conn


def _all(recipients: list[str], status: str, reply: str) -> list[TransactionResult]:
    return [TransactionResult(r, status, reply) for r in recipients]


def _reply_text(reply: Reply, command: str) -> str:
    return f"{reply} (in reply to {command} command)"


def _host_said(prefix: str, reply: Reply, command: str | None = None, keep_code: bool = True) -> str:
    """Our own 4xx wrapper around a server's reply, e.g. for a refused greeting."""
    text = f"{prefix}: {reply}" if keep_code else f"{prefix} said: {reply}"
    if command:
        text += f" (in reply to {command} command)"
    return text if text[:3].isdigit() else f"451 4.3.0 {text}"


def _describe(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return str(e) or type(e).__name__


def _is_ip_literal(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
