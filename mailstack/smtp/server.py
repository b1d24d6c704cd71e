"""SMTP in: the listener and the session (ports 25, 465, 587).

The session is an aiosmtpd `SMTP` subclass.  aiosmtpd gives the protocol class
(a StreamReaderProtocol) and its address parser; the parts where its defaults fall
short of what this server promises are overridden here:

  - __init__: aiosmtpd's introspects the handler and the class on every connection
    (~90 us); a session here needs none of it.
  - the command loop (_handle_client): bounded lines with bare LF/CR handling
    (lines.py), enhanced status codes on every reply, PIPELINING (replies are
    written in one batch when the client's pipelined commands are used up),
    max_errors, command timeout and session time limit with 421 4.4.2.
  - smtp_DATA: our own incremental reader (data.py), one copy of the message,
    strict CRLF.CRLF end, bounded by smtp.max_data_in_flight across sessions.
  - smtp_STARTTLS: loop.start_tls(), which asyncio and uvloop both support, and
    the bytes pipelined after STARTTLS are thrown away (RFC 3207 section 5).
  - AUTH PLAIN / LOGIN against the directory, through the shared login guard (defense/guard.py).

Policy decisions live in policy.py, header fix-ups in cleanup.py, and what becomes of a
received message (the stages' verdict, delivery at accept or the queue, the reply) in
accept.py.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging

from aiosmtpd.smtp import SMTP

from .. import proxy, tlsclose
from ..defense import connections as floods
from . import hooks, policy
from .accept import AcceptMixin
from .address import simple_path
from .budget import budget_for
from .data import DataReader
from .lines import LineBuffer

log = logging.getLogger("mailstack.smtp")

COMMAND_LINE_MAX = 2048  # bytes including CRLF (Postfix's line_length_limit)
AUTH_LINE_MAX = 12288  # RFC 4954 section 4: AUTH lines may be this long
READ_SIZE = 256 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0
RDNS_TIMEOUT = 5.0

_MAIL_PARAMS = ("SIZE", "BODY", "SMTPUTF8", "AUTH")


class SMTPSession(AcceptMixin, SMTP):
    """One SMTP connection.  Attributes named in services.Session: listener, peer_ip.
    What happens to a message once its DATA is in is AcceptMixin's (accept.py)."""

    line_length_limit = READ_SIZE  # the StreamReader's flow-control limit

    def __init__(self, services, listener: str) -> None:  # noqa: D401 - see module doc for why no super().__init__
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=self.line_length_limit, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.loop = loop
        self.services = services
        self.cfg = services.config  # read once: a reload applies to new sessions
        self.listener = listener
        self.hostname = self.cfg.server.hostname
        self.peer_ip: str | None = None
        self.transport = None
        self.session = None  # aiosmtpd's; unused
        self.lines = LineBuffer(self.cfg.smtp.bare_lf)
        self.out: list[bytes] = []
        self.tls = False
        self.tls_info: str | None = None
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.trusted = False
        self.errors = 0
        self.closing = False
        self.busy = False  # enqueue in progress: a timeout or shutdown waits for its reply
        # Making the message durable: a hang-up must not cancel the command loop then (a
        # queue file or Maildir file cut short), so connection_lost leaves it to finish.
        self.storing = False
        self._close_after_reply: str | None = None
        self._refused = False
        self._handler: asyncio.Task | None = None
        # One idle timer a session, armed by the first read and re-armed only when it fires
        # early (see _read): a call_later and a cancel for each of a message's four reads
        # cost ~3 us each on the loop.
        self._idle: asyncio.TimerHandle | None = None
        self._idle_when = 0.0  # loop time the armed timer fires
        self._idle_deadline = 0.0  # loop time the current read times out
        self._session_timer: asyncio.TimerHandle | None = None
        self._rdns: asyncio.Task | None = None
        self._rdns_name: str | None = None
        self._in_data = False
        # Checks configured for this session (defence, sender authentication, filters):
        # see hooks.py.  Read once, like the config: a reload reaches new sessions.
        self.stages = services.stages
        self.conn: hooks.Connection | None = None
        self.txn: hooks.Transaction | None = None
        self._reset_transaction()

    # --- connection -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer_ip = proxy.client_ip(transport, self)  # the real client, also behind a proxy
        limits = self.cfg.smtp
        registry = self.services.sessions
        if not floods.admit(self.services, self, "smtp", limits.max_connections, limits.max_connections_per_ip):
            # Refused before the banner: the 421 is the greeting (RFC 5321 3.1).
            self._refused = True
            self.services.metrics.connections_refused[self.listener] += 1
            log.warning("refused connection on %s: too many connections", self.listener,
                        extra={"client": self.client})
            transport.write(f"421 4.7.0 {self.hostname} Error: too many connections\r\n".encode())
            transport.close()
            return
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        registry.add(self, "smtp")
        self.tls = transport.get_extra_info("ssl_object") is not None
        if self.tls:
            self.tls_info = _tls_description(transport)
        self.trusted = policy.is_trusted(self.peer_ip, limits.trusted_networks)
        self.conn = hooks.Connection(ip=self.client, listener=self.listener, hostname=self.hostname,
                                     tls=self.tls, trusted=self.trusted, early_talk=self._early_talk)
        self._session_timer = self.loop.call_later(limits.max_session_time, self._session_expired)
        if _is_loopback(self.peer_ip):
            self._rdns_name = "localhost"
        else:  # looked up while the client talks; used if it is known by the time of DATA
            self._rdns = self.loop.create_task(_reverse_name(self.peer_ip))
        self._handler = self.loop.create_task(self._handle_client())

    def connection_lost(self, exc) -> None:
        self.services.sessions.discard(self)
        if self.stages and self.conn is not None:
            hooks.close_all(self.stages, self.conn)
        for timer in (self._idle, self._session_timer):
            if timer is not None:
                timer.cancel()
        if self._rdns is not None and not self._rdns.done():
            self._rdns.cancel()
        asyncio.StreamReaderProtocol.connection_lost(self, exc)
        if self._handler is not None:
            if self.storing:  # the loop ends after the store (closing; no transport to reply on)
                self.closing = True
            else:
                self._handler.cancel()
        self.transport = None

    def eof_received(self):
        # The command loop sees the EOF after the commands before it, and closes.
        return asyncio.StreamReaderProtocol.eof_received(self)

    def close_for_shutdown(self) -> None:
        # A message being received or queued gets its reply first (within shutdown_grace):
        # cutting DATA short would make the client send the whole message again.
        if self.busy or self._in_data:
            self._close_after_reply = "421 4.3.2 Service shutting down"
            return
        self._abort("421 4.3.2 Service shutting down")

    def _abort(self, reply: str) -> None:
        """Say `reply` and close, from outside the command loop (timers, shutdown)."""
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            try:
                transport.write(reply.encode() + b"\r\n")
            except Exception:  # a transport in the middle of a TLS shutdown
                pass
            transport.close()

    def _session_expired(self) -> None:
        reply = f"421 4.4.2 {self.hostname} Error: session time limit exceeded"
        if self.busy:
            self._close_after_reply = reply
        else:
            log.info("session time limit exceeded", extra={"client": self.client})
            self._abort(reply)

    def _idle_timer_fired(self) -> None:
        self._idle = None
        if self.idle_since is None:  # working, not waiting: the next read arms it again
            return
        left = self._idle_deadline - self.loop.time()
        if left > 0.01:  # armed for an earlier read: this one began later
            self._arm_idle_timer(left)
            return
        self._idle_expired()

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_when = self.loop.time() + delay
        self._idle = self.loop.call_later(delay, self._idle_timer_fired)

    def _idle_expired(self) -> None:
        log.info("timeout after %s", "DATA" if self._in_data else "command", extra={"client": self.client})
        self._abort(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    @property
    def client(self) -> str:
        return self.peer_ip or "unknown"

    # --- I/O ----------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        """Queue one reply (sent at the next flush).  4xx/5xx count towards max_errors."""
        self.out.append(text.encode("utf-8", "replace") + b"\r\n")
        if text[0] in "45" and not text.startswith("421"):
            self.errors += 1
            if self.errors >= self.cfg.smtp.max_errors and not self.closing:
                log.warning("too many errors", extra={"client": self.client})
                self.services.metrics.smtp_rejected["too_many_errors"] += 1
                self.out.append(f"421 4.7.0 {self.hostname} Error: too many errors\r\n".encode())
                self.closing = True

    async def push(self, status) -> None:  # aiosmtpd's name for "send one reply now"
        self.reply(status if isinstance(status, str) else status.decode())
        await self.flush()

    async def flush(self) -> None:
        if not self.out or self.transport is None or self.transport.is_closing():
            self.out.clear()
            return
        data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
        self.out.clear()
        transport = self.transport
        transport.write(data)
        # A reply the kernel took whole leaves nothing buffered: no drain() coroutine for it
        # (four replies a message).  Something left means a slow reader: wait as before.
        if transport.get_write_buffer_size():
            await self._writer.drain()

    async def _read(self) -> bytes:
        """Next bytes from the client (b"" at EOF); replies waiting are sent first."""
        await self.flush()
        if self.closing:
            return b""
        limits = self.cfg.smtp
        timeout = floods.read_timeout(self.services, "smtp", limits.max_connections, self.preauth,
                                      limits.command_timeout)
        now = self.loop.time()
        self.idle_since = now
        self._idle_deadline = deadline = now + timeout
        idle = self._idle
        if idle is None or self._idle_when > deadline:  # none armed, or one too late (stress)
            if idle is not None:
                idle.cancel()
            self._arm_idle_timer(timeout)
        try:
            return await self._reader.read(READ_SIZE)
        finally:
            self.idle_since = None

    # --- for the connection-flood defence (defense/connections.py) ------------------------
    idle_since: float | None = None

    @property
    def preauth(self) -> bool:
        """Not yet in a mail transaction or logged in: may be closed early under stress."""
        return self.auth_user is None and self.mail_from is None and not self.busy and not self._in_data

    def close_idle(self) -> None:
        log.info("timeout before MAIL (server under stress)", extra={"client": self.client})
        self._abort(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    async def _early_talk(self, seconds: float) -> bytes | None:
        """Pregreet test (hooks.Connection.early_talk): anything the client sends before the banner."""
        try:
            async with asyncio.timeout(seconds):
                data = await self._reader.read(READ_SIZE)
        except TimeoutError:
            return None
        self.lines.feed(data)
        return data

    async def _next_line(self, limit: int) -> tuple[str, bytes] | None:
        while True:
            event = self.lines.next_line(limit)
            if event is not None:
                return event
            data = await self._read()
            if not data:
                return None
            self.lines.feed(data)

    # --- the command loop -------------------------------------------------------------
    async def _handle_client(self) -> None:
        try:
            refusal = await hooks.ask(self.stages, "connect", self.conn) if self.stages else None
            if refusal:  # the refusal is the greeting (RFC 5321 3.1); then we close
                self.services.metrics.smtp_reject(refusal)
                log.info("reject: CONNECT: %s", refusal, extra={"client": self.client})
                self.reply(refusal)
                self.closing = True
            else:
                self.reply(f"220 {self.hostname} ESMTP mailstack")
            while not self.closing:
                event = await self._next_line(COMMAND_LINE_MAX)
                if event is None:
                    break
                if not self.esmtp and self.lines.has_line() and self.conn is not None:
                    self.conn.pipelined = True  # more commands sent before PIPELINING was offered
                await self._dispatch(*event)
                if self._close_after_reply:
                    self.reply(self._close_after_reply)
                    self.closing = True
            await self.flush()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("session failed", extra={"client": self.client})
            self.reply("421 4.3.0 Error: internal server error")
            try:
                await self.flush()
            except Exception:
                pass
        finally:
            self.closing = True
            # Over TLS, close() alone waits up to 30 s for the client's close_notify.
            tlsclose.close_soon(self.transport)

    async def _dispatch(self, kind: str, line: bytes) -> None:
        if kind == "too_long":
            return self.reply("500 5.5.2 Error: line too long")
        if kind == "bare":
            self.services.metrics.smtp_rejected["bare_lf"] += 1
            return self.reply("500 5.5.2 Error: bare LF/CR not allowed")
        verb, _, arg = line.partition(b" ")
        try:
            name = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            return self.reply("500 5.5.2 Error: bad syntax")
        method = _COMMANDS.get(name)
        if method is None:
            return self.reply("500 5.5.1 Error: command not recognized")
        try:
            text = arg.strip().decode("utf-8")
        except UnicodeDecodeError:
            return self.reply("500 5.5.2 Error: invalid UTF-8 in command")
        await method(self, text)

    def _reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.txn = None
        self.smtputf8 = False
        self.body = "7BIT"

    def _policy_client(self) -> policy.Client:
        return policy.Client(ip=self.client, listener=self.listener, tls=self.tls, auth_user=self.auth_user,
                             trusted=self.trusted)

    # --- commands ---------------------------------------------------------------------
    async def smtp_HELO(self, arg: str) -> None:
        if not arg:
            return self.reply("501 5.5.4 Syntax: HELO hostname")
        self._reset_transaction()
        if await self._helo_refused(arg):
            return
        self.helo, self.esmtp = arg, False
        self.reply(f"250 {self.hostname}")

    async def _helo_refused(self, name: str) -> bool:
        if not self.stages:
            return False
        self.conn.helo = name
        refusal = await hooks.ask(self.stages, "helo", self.conn)
        if refusal:
            self.conn.helo = self.helo
            self.services.metrics.smtp_reject(refusal)
            self.reply(refusal)
        return bool(refusal)

    async def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            return self.reply("501 5.5.4 Syntax: EHLO hostname")
        self._reset_transaction()
        if await self._helo_refused(arg):
            return
        self.helo, self.esmtp = arg, True
        caps = [self.hostname, "PIPELINING", f"SIZE {self.cfg.smtp.max_message_size}", "8BITMIME",
                "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if policy.starttls_offered(self.listener, self.tls):
            caps.append("STARTTLS")
        if policy.auth_offered(self.listener, self.tls):
            caps.append("AUTH PLAIN LOGIN")
        caps.append("HELP")
        for cap in caps[:-1]:
            self.reply(f"250-{cap}")
        self.reply(f"250 {caps[-1]}")

    async def smtp_NOOP(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            return self.reply("501 5.5.4 Syntax: RSET")
        self._reset_transaction()
        self.reply("250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str) -> None:
        self.reply("221 2.0.0 Bye")
        self.closing = True

    async def smtp_HELP(self, arg: str) -> None:
        self.reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH")

    async def smtp_VRFY(self, arg: str) -> None:
        self.reply("502 5.5.1 Error: VRFY command is disabled")

    async def smtp_EXPN(self, arg: str) -> None:
        self.reply("502 5.5.1 Error: EXPN command is disabled")

    async def smtp_MAIL(self, arg: str) -> None:
        if not self.helo:
            return self.reply("503 5.5.1 Error: send HELO/EHLO first")
        refusal = policy.check_mail_allowed(self._policy_client())
        if refusal:
            self.services.metrics.smtp_reject(refusal)
            return self.reply(refusal)
        if self.mail_from is not None:
            return self.reply("503 5.5.1 Error: nested MAIL command")
        parsed = self._parse_path(arg, "FROM:", null_ok=True)
        if parsed is None:
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        address, params = parsed
        if address is None:
            return self.reply("501 5.1.7 Bad sender address syntax")
        if params and not self.esmtp:
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address> (parameters need EHLO)")
        size, body, smtputf8 = None, "7BIT", False
        for name, value in params:
            if name == "SIZE" and value is not None and value.isdigit() and len(value) < 20:
                size = int(value)
            elif name == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                body = value.upper()
            elif name == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif name == "AUTH" and value is not None:
                pass  # RFC 4954 5: the original submitter; we do not trust it from clients
            elif name in _MAIL_PARAMS:
                return self.reply(f"501 5.5.4 Bad {name} parameter")
            else:
                return self.reply(f"555 5.5.4 Unsupported option: {name}")
        refusal = (policy.check_declared_size(size, self.cfg.smtp.max_message_size)
                   or policy.check_address_charset(address, smtputf8)
                   or policy.check_sender(address, self._policy_client(), self.services.directory.owns_address))
        if refusal:
            log.info("reject: MAIL from=<%s>: %s", address, refusal, extra={"client": self.client})
            self.services.metrics.smtp_reject(refusal)
            return self.reply(refusal)
        if self.stages:
            txn = hooks.Transaction(mail_from=address, size=size)
            refusal = await hooks.ask(self.stages, "mail", self.conn, txn)
            if refusal:
                log.info("reject: MAIL from=<%s>: %s", address, refusal, extra={"client": self.client})
                self.services.metrics.smtp_reject(refusal)
                return self.reply(refusal)
            self.txn = txn
        self.mail_from, self.smtputf8, self.body = address, smtputf8, body
        self.reply("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            return self.reply("503 5.5.1 Error: need MAIL command")
        parsed = self._parse_path(arg, "TO:", null_ok=False)
        if parsed is None:
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
        address, params = parsed
        if not address:
            return self.reply("501 5.1.3 Bad recipient address syntax")
        if params:
            return self.reply(f"555 5.5.4 Unsupported option: {params[0][0]}")
        refusal = (policy.check_address_charset(address, self.smtputf8)
                   or policy.check_recipient_count(len(self.rcpts), self.cfg.smtp.max_recipients))
        if not refusal:
            kind = self.services.directory.resolve(address).kind
            refusal = policy.check_recipient(address, kind, self._policy_client())
        if not refusal and self.txn is not None:
            refusal = await hooks.ask(self.stages, "rcpt", self.conn, self.txn, address)
        elif refusal and refusal.startswith("550 5.1.1") and self.stages:
            # Failed recipients per address (directory harvesting): the defence may end the session.
            ended = await hooks.ask(self.stages, "rcpt_refused", self.conn, address, refusal)
            if ended:
                log.info("reject: RCPT from=<%s> to=<%s>: %s", self.mail_from, address, refusal,
                         extra={"client": self.client})
                self.services.metrics.smtp_reject(refusal)
                self.reply(ended)
                self.closing = True
                return
        if refusal:
            log.info("reject: RCPT from=<%s> to=<%s>: %s", self.mail_from, address, refusal,
                     extra={"client": self.client})
            self.services.metrics.smtp_reject(refusal)
            return self.reply(refusal)
        self.rcpts.append(address)
        if self.txn is not None:
            self.txn.rcpts.append(address)
        self.reply("250 2.1.5 Ok")

    def _parse_path(self, arg: str, keyword: str, null_ok: bool):
        """"FROM:<a@b> PARAM=x ..." -> (address or None if malformed, [(NAME, value|None)]);
        None when the keyword or the parameter syntax is wrong."""
        if arg[:len(keyword)].upper() != keyword:
            return None
        rest = arg[len(keyword):].strip()
        if rest.startswith("<>"):
            if not null_ok:
                return "", []
            address, rest = "", rest[2:]
        else:
            if not rest.startswith("<") or ">" not in rest:
                return None, []
            simple = simple_path(rest)
            if simple is not None:
                address, rest = simple
            else:
                try:  # aiosmtpd's general RFC 5321/5322 parser: quoting, source routes, comments
                    address, rest = self._getaddr(rest)
                except Exception:  # the email header parser on hostile input
                    address, rest = None, None
                if address is None:
                    return None, []
        params = []
        for word in (rest or "").split():
            name, eq, value = word.partition("=")
            if not name.isascii() or not name.replace("-", "").isalnum() or (eq and not value):
                return None
            params.append((name.upper(), value if eq else None))
        return address, params

    # --- DATA ---------------------------------------------------------------------------
    async def smtp_DATA(self, arg: str) -> None:
        if self.mail_from is None:
            return self.reply("503 5.5.1 Error: need MAIL command")
        if not self.rcpts:
            return self.reply("554 5.5.1 Error: no valid recipients")
        if arg:
            return self.reply("501 5.5.4 Syntax: DATA")
        limits = self.cfg.smtp
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        reader = DataReader(limits.max_message_size, limits.max_line_length, limits.bare_lf)
        budget = budget_for(self.services)
        reserved = 0
        self._in_data = True
        try:
            rest = reader.feed(self.lines.take())
            while True:
                grow = reader.size - reserved
                if grow > 0:
                    if budget.reserve(grow):
                        reserved += grow
                    else:
                        reader.fail("resources")
                if reader.error is not None and reserved:
                    budget.release(reserved)
                    reserved = 0
                if reader.done:
                    break
                data = await self._read()
                if not data:
                    self.closing = True
                    return
                rest = reader.feed(data)
            self._in_data = False
            self.lines.feed(rest)
            if reader.error is not None:
                self._refuse_data(reader)
            else:
                await self._enqueue(reader)
        finally:
            self._in_data = False
            budget.release(reserved)
            self._reset_transaction()

    # --- STARTTLS -----------------------------------------------------------------------
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls:
            return self.reply("554 5.5.1 Error: TLS already active")
        if not policy.starttls_offered(self.listener, self.tls):
            return self.reply("502 5.5.1 Error: command not implemented")
        if arg:
            return self.reply("501 5.5.4 Syntax: STARTTLS")
        # Stop reading before the 220 goes out, so the ClientHello that answers it cannot be
        # read into the plaintext buffer (and dropped below) if flush() yields; start_tls
        # resumes reading on the TLS transport.
        self.transport.pause_reading()
        self.reply("220 2.0.0 Ready to start TLS")
        await self.flush()
        # RFC 3207 section 5 / CVE-2011-0411: whatever the client pipelined after STARTTLS
        # was sent in the clear and must not be executed inside the TLS session.  Nothing
        # may be awaited between dropping it and handing the transport to TLS.
        self.lines.clear()
        self._reader._buffer.clear()
        try:
            transport = await self.loop.start_tls(self.transport, self, self.services.tls.for_listener(self.listener),
                                                  server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except Exception as e:  # any handshake failure: ssl.SSLError, timeout, reset
            log.info("TLS handshake failed: %s", e, extra={"client": self.client})
            self.closing = True
            return
        if transport is None:  # the connection closed during the handshake
            self.closing = True
            return
        self.transport = transport
        self._transport = transport
        self._over_ssl = True
        self._reader._transport = transport
        self._writer._transport = transport
        self.tls = True
        self.tls_info = _tls_description(transport)
        self.conn.tls, self.conn.helo, self.conn.auth_user = True, None, None
        # RFC 3207 4.2: forget everything learned before TLS.
        self.helo, self.esmtp, self.auth_user = None, False, None
        self._reset_transaction()

    # --- AUTH ---------------------------------------------------------------------------
    async def smtp_AUTH(self, arg: str) -> None:
        if not self.esmtp:
            return self.reply("503 5.5.1 Error: send EHLO first")
        if not policy.auth_offered(self.listener, self.tls):
            return self.reply("538 5.7.11 Encryption required for requested authentication mechanism")
        if self.auth_user is not None:
            return self.reply("503 5.5.1 Error: already authenticated")
        if self.mail_from is not None:
            return self.reply("503 5.5.1 Error: MAIL transaction in progress")
        words = arg.split()
        if not 1 <= len(words) <= 2:
            return self.reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mechanism == "PLAIN":
            blob = await self._auth_response(initial, b"")
            if blob is None:
                return
            parts = blob.split(b"\0")
            if len(parts) != 3:
                return self.reply("501 5.5.2 Error: malformed PLAIN response")
            authzid, user, password = parts
            if authzid and authzid != user:
                return self.reply("535 5.7.8 Error: authorization identity not permitted")
        elif mechanism == "LOGIN":
            user = await self._auth_response(initial, b"Username:")
            if user is None:
                return
            password = await self._auth_response(None, b"Password:")
            if password is None:
                return
        else:
            return self.reply("504 5.5.4 Error: unsupported authentication mechanism")
        await self._check_credentials(mechanism, user.decode("utf-8", "replace"), password)

    async def _auth_response(self, initial: str | None, challenge: bytes) -> bytes | None:
        """The client's decoded answer (from the AUTH line or after a 334), or None after replying."""
        if initial is None:
            self.reply("334 " + base64.b64encode(challenge).decode())
            event = await self._next_line(AUTH_LINE_MAX)
            if event is None:
                self.closing = True
                return None
            kind, line = event
            if kind != "line":
                self.reply("500 5.5.2 Error: line too long" if kind == "too_long"
                           else "500 5.5.2 Error: bare LF/CR not allowed")
                return None
            text = line.strip()
        else:
            text = initial.encode("ascii", "replace")
        if text == b"*":
            self.reply("501 5.7.0 Authentication aborted")
            return None
        if text == b"=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.reply("501 5.5.2 Error: cannot decode response")
            return None

    async def _check_credentials(self, mechanism: str, user: str, password: bytes) -> None:
        attempt = await self.services.throttle.attempt("smtp", self.peer_ip, user)
        if attempt.refused:  # blocked address or too many logins at once (defense/guard.py)
            return self.reply("454 4.7.0 Error: too many failed logins from your address, try again later")
        try:
            account = await self.services.directory.authenticate(user, password)
        except BaseException:
            attempt.abandoned()
            raise
        if account is None:
            attempt.failed()
            self.services.metrics.auth_failures["smtp"] += 1
            log.warning("AUTH %s failed for %r", mechanism, user[:100], extra={"client": self.client})
            return self.reply("535 5.7.8 Error: authentication failed")
        attempt.succeeded(account)
        self.auth_user = account
        self.conn.auth_user = account
        log.info("AUTH %s: %s", mechanism, account, extra={"client": self.client})
        self.reply("235 2.7.0 Authentication successful")


_COMMANDS = {name[5:]: fn for name, fn in vars(SMTPSession).items() if name.startswith("smtp_")}


def _tls_description(transport) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if not cipher:
        return ssl_object.version()
    name, _, bits = cipher
    return f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"


def _is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


async def _reverse_name(ip: str | None) -> str | None:
    """The client's reverse DNS name, for the Received: line; None when there is none."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_loopback:
        return "localhost"
    try:
        import dns.asyncresolver
        import dns.exception

        answer = await dns.asyncresolver.resolve_address(ip, lifetime=RDNS_TIMEOUT)
        return str(answer[0].target).rstrip(".") or None
    except (dns.exception.DNSException, IndexError, OSError):
        return None


async def start_listener(services, name: str, host: str, port: int, *,
                         start_serving: bool = True) -> asyncio.Server:
    """Serve SMTP for listener `name` ("smtp", "submission" or "submissions") on host:port."""
    if name not in ("smtp", "submission", "submissions"):
        raise ValueError(f"not an SMTP listener: {name}")
    implicit = name in policy.IMPLICIT_TLS_LISTENERS
    return await proxy.create_server(
        services, name, lambda: SMTPSession(services, name), host, port,
        ssl=services.tls.for_listener(name) if implicit else None,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None,
        reuse_address=True, backlog=1024, start_serving=start_serving)
