"""One ManageSieve (RFC 5804) client: transport glue and the command state machine.

Before TLS only CAPABILITY, STARTTLS, NOOP and LOGOUT are of use: AUTHENTICATE PLAIN is
offered over TLS only.  Scripts live in sieve/scripts.ScriptStore; every disk access goes
to a worker thread.  Failed logins use the shared login throttle like IMAP and POP3.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl

from .. import proxy
from ..sieve.checker import SUPPORTED_EXTENSIONS
from ..sieve.deliver import script_store
from ..sieve.parser import SieveSyntaxError
from ..sieve.scripts import ScriptError
from .parser import Command, CommandError, CommandReader, quote

log = logging.getLogger("mailstack.managesieve")
PROTOCOL = "managesieve"
IMPLEMENTATION = "mailstack"
AUTH_FAILURES_BEFORE_DISCONNECT = 3
MAX_BAD_COMMANDS = 10
# what SIEVE advertises: the extensions a `require` accepts
SIEVE_EXTENSIONS = " ".join(e for e in SUPPORTED_EXTENSIONS)


class Connection(asyncio.Protocol):
    """Bytes in -> CommandReader; STARTTLS empties the buffer in the same loop step."""

    def __init__(self, reader: CommandReader, on_connect) -> None:
        self.reader = reader
        self.on_connect = on_connect
        self.transport = None
        self.tls_active = False
        self.closed = False
        self._eof = False
        self._waiter: asyncio.Future | None = None
        self._paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if len(self.reader) > 2 * (self.reader.max_literal + self.reader.max_line) and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self.closed = self._eof = True
        self._wake()

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def peer_ip(self) -> str | None:
        return proxy.client_ip(self.transport, self)

    async def next_command(self, timeout: float):
        async with asyncio.timeout(timeout):
            while True:
                item = self.reader.next()
                if self._paused and len(self.reader) < self.reader.max_line and not self.closed:
                    self._paused = False
                    self.transport.resume_reading()
                if item is not None:
                    return item
                if self._eof:
                    return None
                if self._paused:  # a huge pipelined input: let it in to make progress
                    self._paused = False
                    self.transport.resume_reading()
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self.reader.clear()  # nothing sent before the handshake counts as sent after it
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                              ssl_handshake_timeout=30.0)
        self.tls_active = True

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._eof = True
        self._wake()


def ok(text: str = "", code: str = "") -> bytes:
    return b"OK" + (f" ({code})".encode() if code else b"") + (b" " + quote(text) if text else b"") + b"\r\n"


def no(text: str, code: str = "") -> bytes:
    return b"NO" + (f" ({code})".encode() if code else b"") + b" " + quote(text) + b"\r\n"


def bye(text: str) -> bytes:
    return b"BYE " + quote(text) + b"\r\n"


class ManageSieveSession:
    def __init__(self, services, listener: str, conn: Connection) -> None:
        self.services = services
        self.cfg = services.config
        self.listener = listener
        self.conn = conn
        self.peer_ip = conn.peer_ip
        self.account: str | None = None
        self.store = script_store(self.cfg)
        self.auth_failures = 0
        self.bad = 0
        self.transport = None
        self._extra = {"client": self.peer_ip, "listener": listener}

    def close_for_shutdown(self) -> None:
        try:
            self.conn.write(bye("Server shutting down"))
            self.conn.close()
        except Exception:  # pragma: no cover
            pass

    def capabilities(self) -> bytes:
        lines = [f'"IMPLEMENTATION" "{IMPLEMENTATION}"',
                 '"SASL" "PLAIN"' if self.conn.tls_active else '"SASL" ""',
                 f'"SIEVE" "{SIEVE_EXTENSIONS}"',
                 f'"MAXREDIRECTS" "{self.cfg.sieve.max_redirects}"']
        if not self.conn.tls_active:
            lines.append('"STARTTLS"')
        if self.account:
            lines.append(f'"OWNER" {quote(self.account).decode()}')
        lines.append('"UNAUTHENTICATE"')
        lines.append('"VERSION" "1.0"')
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    async def run(self) -> None:
        registry = self.services.sessions
        mcfg = self.cfg.managesieve
        if (registry.count(PROTOCOL) >= mcfg.max_connections
                or registry.count(PROTOCOL, self.peer_ip or "") >= mcfg.max_connections_per_ip):
            self.services.metrics.connections_refused[self.listener] += 1
            self.conn.write(bye("Too many connections, try again later"))
            self.conn.close()
            return
        registry.add(self, PROTOCOL)
        try:
            self.conn.write(self.capabilities() + ok(f"{IMPLEMENTATION} ManageSieve ready"))
            while True:
                try:
                    item = await self.conn.next_command(mcfg.idle_timeout)
                except TimeoutError:
                    self.conn.write(bye("Idle for too long"))
                    break
                except CommandError as e:
                    self.conn.write(bye(str(e)))
                    break
                if item is None:
                    break
                if isinstance(item, CommandError):
                    self.bad += 1
                    if self.bad >= MAX_BAD_COMMANDS:
                        self.conn.write(bye("Too many bad commands"))
                        break
                    self.conn.write(no(str(item)))
                    continue
                if not await self.dispatch(item):
                    break
        except ConnectionError:
            pass
        except Exception:
            log.exception("ManageSieve session failed", extra=self._extra)
            self.conn.write(bye("Internal error"))
        finally:
            registry.discard(self)
            self.conn.close()

    async def dispatch(self, cmd: Command) -> bool:
        handler = getattr(self, "cmd_" + cmd.name.lower(), None)
        if handler is None:
            self.bad += 1
            self.conn.write(no(f"Unknown command {cmd.name}"))
            return self.bad < MAX_BAD_COMMANDS
        needs_auth = cmd.name not in ("CAPABILITY", "STARTTLS", "AUTHENTICATE", "LOGOUT", "NOOP")
        if needs_auth and self.account is None:
            self.conn.write(no("Authenticate first"))
            return True
        try:
            return await handler(cmd.args)
        except ScriptError as e:
            self.conn.write(no(str(e), e.code or ""))
            return True
        except _ArgError as e:
            self.conn.write(no(str(e)))
            return True

    # --- commands ------------------------------------------------------------------------
    async def cmd_capability(self, args) -> bool:
        self.conn.write(self.capabilities() + ok())
        return True

    async def cmd_noop(self, args) -> bool:
        if args:
            self.conn.write(b"OK (TAG " + quote(args[0]) + b') "Done"\r\n')
        else:
            self.conn.write(ok("Done"))
        return True

    async def cmd_logout(self, args) -> bool:
        self.conn.write(ok("Logout completed"))
        return False

    async def cmd_starttls(self, args) -> bool:
        if self.conn.tls_active:
            self.conn.write(no("TLS is already active"))
            return True
        self.conn.write(ok("Begin TLS negotiation now"))
        try:
            await self.conn.start_tls(self.services.tls.for_listener(self.listener))
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("STARTTLS failed: %s", e, extra=self._extra)
            return False
        self.conn.write(self.capabilities() + ok("TLS active"))
        return True

    async def cmd_authenticate(self, args) -> bool:
        if self.account is not None:
            self.conn.write(no("Already authenticated"))
            return True
        if not self.conn.tls_active:
            self.conn.write(no("Authentication needs TLS: use STARTTLS first", "ENCRYPT-NEEDED"))
            return True
        if not args or args[0].upper() != "PLAIN" or len(args) > 2:
            self.conn.write(no("Unsupported mechanism: only PLAIN"))
            return True
        if len(args) == 2:
            response = args[1]
        else:
            self.conn.write(b'""\r\n')
            item = await self._read_sasl_response()
            if item is None:
                return False
            response = item
            if response == "*":
                self.conn.write(no("Authentication cancelled"))
                return True
        try:
            raw = base64.b64decode(response.encode("ascii"), validate=True)
            authzid, authcid, password = (p.decode("utf-8") for p in raw.split(b"\0"))
        except (binascii.Error, ValueError, UnicodeError):
            self.conn.write(no("Invalid PLAIN response"))
            return True
        # The guard SMTP, IMAP and POP3 share: a blocked address is refused here too, logins
        # from one address are checked a few at a time, and a failure is logged once, by it.
        attempt = await self.services.throttle.attempt(PROTOCOL, self.peer_ip, authcid[:320] or None)
        if attempt.refused:
            self.conn.write(no("Too many failed logins from your address, try again later", "TRYLATER"))
            return True
        account = None
        try:
            if (not authzid or authzid.lower() == authcid.lower()) and len(authcid) <= 320:
                account = await self.services.directory.authenticate(authcid, password)
        except BaseException:
            attempt.abandoned()
            raise
        if account is None:
            attempt.failed()
            self.services.metrics.auth_failures[PROTOCOL] += 1
            self.auth_failures += 1
            if self.auth_failures >= AUTH_FAILURES_BEFORE_DISCONNECT:
                self.conn.write(bye("Too many authentication failures"))
                return False
            self.conn.write(no("Authentication failed"))
            return True
        attempt.succeeded(account)
        self.account = account
        log.info("login user=<%s>", account, extra=self._extra)
        self.conn.write(ok("Logged in"))
        return True

    async def _read_sasl_response(self) -> str | None:
        """A SASL client response: a quoted string or literal alone on a line (or a bare token)."""
        item = await self.conn.next_command(self.cfg.managesieve.idle_timeout)
        if item is None:
            return None
        if isinstance(item, CommandError):
            return "*"
        return item.first if not item.args else "*"

    async def cmd_unauthenticate(self, args) -> bool:
        self.account = None
        self.conn.write(ok())
        return True

    def _args(self, args, n: int) -> list[str]:
        if len(args) != n:
            raise _ArgError(f"Expected {n} argument{'s' if n != 1 else ''}")
        return args

    async def cmd_havespace(self, args) -> bool:
        name, size = self._args(args, 2)
        if not size.isdigit():
            raise _ArgError("Size must be a number")
        await asyncio.to_thread(self.store.have_space, self.account, name, int(size))
        self.conn.write(ok())
        return True

    async def _check(self, text: str) -> bool:
        from ..sieve.checker import compile_script
        try:
            await asyncio.to_thread(compile_script, text, self.cfg.sieve.max_script_size)
        except SieveSyntaxError as e:
            self.conn.write(no(f"line {e.line}: {e.message}"))
            return False
        return True

    async def cmd_putscript(self, args) -> bool:
        name, text = self._args(args, 2)
        if await self._check(text):
            await asyncio.to_thread(self.store.put, self.account, name, text)
            log.info("putscript user=<%s> name=%r bytes=%d", self.account, name, len(text), extra=self._extra)
            self.conn.write(ok())
        return True

    async def cmd_checkscript(self, args) -> bool:
        (text,) = self._args(args, 1)
        if await self._check(text):
            self.conn.write(ok())
        return True

    async def cmd_listscripts(self, args) -> bool:
        self._args(args, 0)
        out = b""
        for name, active in await asyncio.to_thread(self.store.list, self.account):
            out += quote(name) + (b" ACTIVE" if active else b"") + b"\r\n"
        self.conn.write(out + ok())
        return True

    async def cmd_setactive(self, args) -> bool:
        (name,) = self._args(args, 1)
        await asyncio.to_thread(self.store.set_active, self.account, name or None)
        self.conn.write(ok())
        return True

    async def cmd_getscript(self, args) -> bool:
        (name,) = self._args(args, 1)
        text = await asyncio.to_thread(self.store.get, self.account, name)
        b = text.encode("utf-8", "surrogateescape")
        self.conn.write(b"{%d}\r\n" % len(b) + b + b"\r\n" + ok())
        return True

    async def cmd_deletescript(self, args) -> bool:
        (name,) = self._args(args, 1)
        await asyncio.to_thread(self.store.delete, self.account, name)
        self.conn.write(ok())
        return True

    async def cmd_renamescript(self, args) -> bool:
        old, new = self._args(args, 2)
        await asyncio.to_thread(self.store.rename, self.account, old, new)
        self.conn.write(ok())
        return True


class _ArgError(Exception):
    pass
