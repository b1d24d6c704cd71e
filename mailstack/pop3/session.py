"""One POP3 session: the RFC 1939 state machine (AUTHORIZATION -> TRANSACTION -> UPDATE)
with RFC 2449 CAPA and response codes, RFC 2595 STLS and RFC 5034 AUTH PLAIN.

The session sees the INBOX as it was at login (RFC 1939: message numbers do not change
during a session).  DELE only marks; the store is changed in the UPDATE state after QUIT,
so a dropped connection deletes nothing.  Deletions go through the store's flag +
expunge, which publishes the events that IMAP sessions on the same mailbox act on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .. import tlsclose
from ..defense import connections as floods
from ..store.base import MailboxNotFound, MessageInfo, StoreError
# imported with the module, not at the first login: compiling it there (no .pyc written, as
# under PYTHONDONTWRITEBYTECODE) cost the first POP3 login of a server about 4 ms
from ..store.preserve import read_pop3_uidl
from .connection import Connection
from .locks import MailboxLocks
from .parser import (AUTHORIZATION, CLOSED, LINE_TOO_LONG, TRANSACTION, Command, CommandError, decode_sasl_plain,
                     err, format_uidl, multiline, ok, parse_command, parse_number, uidl_for_key)
from .sizes import message_sizes
from .transfer import Retrieval

log = logging.getLogger("mailstack.pop3")

PROTOCOL = "pop3"  # SessionRegistry protocol name shared by the pop3 and pop3s listeners
IMPLEMENTATION = "mailstack"
AUTH_FAILURES_BEFORE_DISCONNECT = 3
# LIST/UIDL output is written in batches of about this many bytes, waiting for the client between.
OUTPUT_BATCH = 64 * 1024



class POP3Session(Retrieval):
    def __init__(self, services, listener: str, conn: Connection) -> None:
        self.services = services
        self.cfg = services.config.pop3  # a reload applies to new sessions only
        self.listener = listener
        self.conn = conn
        conn.on_line = self.retr_at_once  # transfer.py: RETR of a message read ahead, without a wake-up
        self.peer_ip = conn.peer_ip
        self.state = AUTHORIZATION
        self.user: str | None = None  # from USER, waiting for PASS
        self.account: str | None = None
        self.mailbox = None
        self.messages: list[MessageInfo] = []
        self.uidl_style: tuple[str, dict[int, str]] | None = None
        self.sizes: list[int] = []  # octets RETR sends for each message
        self.deleted: set[int] = set()  # message indexes (0-based) marked by DELE
        self.total_octets = 0  # kept as running sums so STAT is O(1) in a big maildrop
        self.deleted_octets = 0
        self.retrieved: set[int] = set()
        # Read ahead (transfer.py, retrieve.py): message index -> (RETR's whole answer, octets
        # of the message in it); the bytes held; the indexes being read now and that read.
        self._ahead: dict[int, tuple[bytes, int]] = {}
        self._ahead_bytes = 0
        self._ahead_pending: set[int] = set()
        self._ahead_task: asyncio.Future | None = None
        self.errors = 0
        self.commands = 0
        self.auth_failures = 0
        self.bytes_sent = 0
        self._in_multiline = False
        self._started = time.monotonic()
        self._log_extra = {"client": self.peer_ip, "listener": listener}

    # --- lifecycle ------------------------------------------------------------------
    @property
    def locks(self) -> MailboxLocks:
        locks = self.services.extra.get("pop3_locks")
        if locks is None:
            locks = MailboxLocks(self.services.config.data_dir / "locks" / "pop3")
            self.services.extra["pop3_locks"] = locks
        return locks

    def close_for_shutdown(self) -> None:
        try:
            if not self._in_multiline:  # never inject a line into a message being sent
                self.conn.write(err("Server shutting down", "SYS/TEMP"))
            self.conn.close()
        except Exception:  # pragma: no cover - must not raise
            pass

    async def run(self) -> None:
        registry = self.services.sessions
        if not floods.admit(self.services, self, PROTOCOL, self.cfg.max_connections, self.cfg.max_connections_per_ip):
            self.services.metrics.connections_refused[self.listener] += 1
            self.conn.write(err("Too many connections, try again later", "SYS/TEMP"))
            self.conn.close()
            log.warning("connection refused: too many POP3 sessions", extra=self._log_extra)
            return
        registry.add(self, PROTOCOL)
        try:
            self.conn.write(ok(f"{IMPLEMENTATION} POP3 server ready"))
            await self._loop()
        except ConnectionError:
            pass
        except Exception:
            log.exception("POP3 session failed", extra=self._log_extra)
            if not self._in_multiline:
                self.conn.write(err("Internal error", "SYS/TEMP"))
        finally:
            await self._release()
            registry.discard(self)
            self.conn.close()
            # over TLS, close() alone waits up to 30 s for the client's close_notify
            tlsclose.close_soon(self.conn.transport)

    async def _release(self) -> None:
        self.conn.on_line = None
        if self._ahead_task is not None:
            self._ahead_task.cancel()  # a read running in its thread finishes; its result is dropped
            self._ahead_task = None
        self._ahead.clear()
        self._ahead_bytes = 0
        mailbox, self.mailbox = self.mailbox, None
        if mailbox is not None:
            try:
                await mailbox.close()
            except Exception:
                log.exception("closing mailbox failed", extra=self._log_extra)
        if self.account is not None and self.state != AUTHORIZATION:
            self.locks.release(self.account)
            log.info("logout user=<%s> retr=%d del=%d bytes=%d secs=%.1f", self.account, len(self.retrieved),
                     len(self.deleted) if self.state == CLOSED else 0, self.bytes_sent,
                     time.monotonic() - self._started, extra=self._log_extra)
        self.state = CLOSED

    async def _loop(self) -> None:
        cfg = self.cfg
        while True:
            timeout = cfg.idle_timeout
            if self.state == AUTHORIZATION:  # short before login, shorter under stress (defense/connections.py)
                timeout = floods.read_timeout(self.services, PROTOCOL, cfg.max_connections, True,
                                              min(timeout, self.services.config.defense.login_timeout))
            self.idle_since = asyncio.get_running_loop().time()
            try:
                line = await self.conn.readline(timeout)
            except TimeoutError:
                self.conn.write(err("Disconnected for inactivity"))
                return
            finally:
                self.idle_since = None
            if line is None:
                return
            self.commands += 1
            if self.commands > cfg.max_commands:
                self.conn.write(err("Too many commands in one session"))
                return
            if line is LINE_TOO_LONG:
                if not self._protocol_error(f"Line too long (max {cfg.max_line_length} octets)"):
                    return
                continue
            try:
                cmd = parse_command(line)
            except CommandError as e:
                if not self._protocol_error(str(e)):
                    return
                continue
            handler = self._handlers().get(cmd.name)
            if handler is None:
                known = cmd.name in _ALL_COMMANDS
                if not self._protocol_error("Command not valid in this state" if known else "Unknown command"):
                    return
                continue
            try:
                keep_going = await handler(self, cmd)
            except CommandError as e:
                keep_going = self._protocol_error(str(e))
            except TimeoutError:  # silent in the middle of a command (AUTH continuation)
                self.conn.write(err("Disconnected for inactivity"))
                return
            if not keep_going:
                return
            await self.conn.drain()

    def _protocol_error(self, reason: str) -> bool:
        """Answer -ERR; False once the client has made too many mistakes (then we hang up)."""
        self.errors += 1
        if self.errors >= self.cfg.max_errors:
            self.conn.write(err(f"{reason}; too many errors, closing connection"))
            return False
        self.conn.write(err(reason))
        return True

    def _handlers(self) -> dict[str, Callable[["POP3Session", Command], Awaitable[bool]]]:
        return _AUTH_HANDLERS if self.state == AUTHORIZATION else _TRANSACTION_HANDLERS

    # --- any state ----------------------------------------------------------------------
    def _auth_allowed(self) -> bool:
        return self.conn.tls_active or self.cfg.allow_plaintext_auth

    def _can_stls(self) -> bool:
        return self.state == AUTHORIZATION and not self.conn.tls_active

    async def cmd_capa(self, cmd: Command) -> bool:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if self._can_stls():
                caps.append("STLS")
            if self._auth_allowed():
                caps += ["USER", "SASL PLAIN"]
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        self.conn.write(multiline("Capability list follows", caps))
        return True

    async def cmd_quit(self, cmd: Command) -> bool:
        if cmd.args:
            raise CommandError("QUIT takes no arguments")
        if self.state == TRANSACTION:
            return await self._update()
        self.conn.write(ok(f"{IMPLEMENTATION} POP3 server signing off"))
        return False

    # --- AUTHORIZATION -------------------------------------------------------------------
    async def cmd_stls(self, cmd: Command) -> bool:
        if not self._can_stls():
            self.conn.write(err("Already using TLS" if self.conn.tls_active else "STLS not allowed now"))
            return True
        if cmd.args:
            raise CommandError("STLS takes no arguments")
        self.conn.write(ok("Begin TLS negotiation"))
        try:
            dropped = await self.conn.start_tls(self.services.tls.for_listener(self.listener))
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            log.info("STLS handshake failed: %s", e, extra=self._log_extra)
            self.conn.abort()
            return False
        if dropped:
            log.warning("dropped %d bytes of plaintext sent after STLS", dropped, extra=self._log_extra)
        self.user = None  # RFC 2595: forget anything learnt before TLS
        return True

    async def cmd_user(self, cmd: Command) -> bool:
        if not self._auth_allowed():
            self.conn.write(err("Plaintext authentication disallowed without TLS; use STLS", "AUTH"))
            return True
        if len(cmd.args) != 1:
            raise CommandError("USER takes one argument: USER name")
        self.user = cmd.args[0]
        self.conn.write(ok())
        return True

    async def cmd_pass(self, cmd: Command) -> bool:
        if not self._auth_allowed():
            self.conn.write(err("Plaintext authentication disallowed without TLS; use STLS", "AUTH"))
            return True
        if self.user is None:
            self.conn.write(err("USER first"))
            return True
        if not cmd.rest:
            raise CommandError("PASS takes one argument: PASS password")
        user, self.user = self.user, None
        return await self._login(user, cmd.rest)  # the password may contain spaces

    async def cmd_apop(self, cmd: Command) -> bool:
        self.conn.write(err("APOP is not supported; use USER/PASS or AUTH PLAIN over TLS"))
        return True

    async def cmd_auth(self, cmd: Command) -> bool:
        if not self._auth_allowed():
            self.conn.write(err("Plaintext authentication disallowed without TLS; use STLS", "AUTH"))
            return True
        if not cmd.args:  # RFC 1734 style probe, still sent by some clients: list mechanisms
            self.conn.write(multiline("Supported mechanisms", ["PLAIN"]))
            return True
        if cmd.args[0].upper() != "PLAIN":
            self.conn.write(err("Unsupported authentication mechanism"))
            return True
        if len(cmd.args) > 2:
            raise CommandError("AUTH takes a mechanism and an optional initial response")
        if len(cmd.args) == 2:
            response = cmd.args[1]
        else:
            self.conn.write(b"+ \r\n")
            line = await self.conn.readline(self.cfg.idle_timeout)
            if line is None:
                return False
            if line is LINE_TOO_LONG:
                raise CommandError("Authentication response too long")
            response = line.decode("ascii", "replace").strip()
            if response == "*":
                self.conn.write(err("Authentication cancelled"))
                return True
        try:
            authzid, authcid, password = decode_sasl_plain(response)
        except CommandError as e:
            self.conn.write(err(str(e)))
            return True
        if authzid and authzid.lower() != authcid.lower():
            # Logging in as someone else (proxy authorization) is not offered.
            self.services.throttle.failure(self.peer_ip, authcid)
            self.services.metrics.auth_failures["pop3"] += 1
            self.conn.write(err("Authorization identity must match the user", "AUTH"))
            return True
        return await self._login(authcid, password)

    # --- for the connection-flood defence -------------------------------------------------
    idle_since: float | None = None

    @property
    def preauth(self) -> bool:
        return self.state == AUTHORIZATION

    def close_idle(self) -> None:
        try:
            self.conn.write(err("Disconnected for inactivity"))
            self.conn.close()
        except Exception:  # noqa: BLE001 - must not raise
            pass

    async def _login(self, user: str, password: str) -> bool:
        services = self.services
        attempt = await services.throttle.attempt("pop3", self.peer_ip, user)
        if attempt.refused:  # blocked address or too many logins at once (defense/guard.py)
            self.conn.write(err("Too many failed logins from your address, try again later", "SYS/TEMP"))
            return True
        try:
            account = await services.directory.authenticate(user, password) if len(user) <= 320 else None
        except BaseException:
            attempt.abandoned()
            raise
        if account is None:
            attempt.failed()
            self.auth_failures += 1
            services.metrics.auth_failures["pop3"] += 1
            if self.auth_failures >= AUTH_FAILURES_BEFORE_DISCONNECT:
                self.conn.write(err("Authentication failed; too many failures, closing connection", "AUTH"))
                return False
            self.conn.write(err("Authentication failed", "AUTH"))
            return True
        attempt.succeeded(account)
        try:
            locked = await self.locks.acquire(account)
        except OSError as e:
            log.error("cannot take the POP3 lock of %s: %s", account, e, extra=self._log_extra)
            self.conn.write(err("Mailbox temporarily unavailable, try again later", "SYS/TEMP"))
            return True
        if not locked:
            self.conn.write(err("Mailbox is locked by another POP3 session", "IN-USE"))
            return True
        try:
            opened = await self._open_inbox(account)
        except BaseException:
            self.locks.release(account)
            raise
        if not opened:
            self.locks.release(account)
            self.conn.write(err("Mailbox temporarily unavailable, try again later", "SYS/TEMP"))
            return True
        self.account = account
        self.state = TRANSACTION
        log.info("login user=<%s> messages=%d", account, len(self.messages), extra=self._log_extra)
        self.conn.write(ok(f"Logged in, {len(self.messages)} messages ({self.total_octets} octets)"))
        return True

    async def _open_inbox(self, account: str) -> bool:
        store = self.services.store
        try:
            try:
                mailbox = await store.open(account, "INBOX")
            except MailboxNotFound:  # an account that has never received mail
                await store.ensure_account(account)
                mailbox = await store.open(account, "INBOX")
        except (StoreError, OSError) as e:
            log.error("cannot open INBOX of %s: %s", account, e, extra=self._log_extra)
            return False
        try:
            messages, sizes = await message_sizes(mailbox)
        except (StoreError, OSError) as e:
            log.error("cannot list INBOX of %s: %s", account, e, extra=self._log_extra)
            await mailbox.close()
            return False
        self.mailbox, self.messages, self.sizes = mailbox, messages, sizes
        self.total_octets = sum(sizes)
        # An INBOX imported from Dovecot keeps Dovecot's UIDLs (`mailstack import maildir`).
        mailbox_dir = getattr(store, "mailbox_dir", None)
        if mailbox_dir is not None:
            self.uidl_style = await asyncio.to_thread(read_pop3_uidl, mailbox_dir(account, "INBOX"))
        return True

    def _uidl(self, m: MessageInfo) -> str:
        if self.uidl_style:
            fmt, saved = self.uidl_style
            try:
                return saved.get(m.uid) or format_uidl(fmt, m.uid, self.mailbox.uidvalidity)
            except ValueError:
                pass
        return uidl_for_key(m.key)

    # --- TRANSACTION ----------------------------------------------------------------------
    def _message(self, cmd: Command, arg: int = 0) -> int | None:
        """Index of the message named by argument `arg`, or None after answering -ERR."""
        if len(cmd.args) <= arg:
            raise CommandError("Missing message number")
        number = parse_number(cmd.args[arg])
        if not 1 <= number <= len(self.messages):
            self.conn.write(err("No such message"))
            return None
        if number - 1 in self.deleted:
            self.conn.write(err(f"Message {number} already deleted"))
            return None
        return number - 1

    def _totals(self) -> tuple[int, int]:
        return len(self.messages) - len(self.deleted), self.total_octets - self.deleted_octets

    async def cmd_noop(self, cmd: Command) -> bool:
        self.conn.write(ok())
        return True

    async def cmd_stat(self, cmd: Command) -> bool:
        if cmd.args:
            raise CommandError("STAT takes no arguments")
        count, octets = self._totals()
        self.conn.write(ok(f"{count} {octets}"))
        return True

    async def _listing(self, cmd: Command, value: Callable[[int], str]) -> bool:
        if len(cmd.args) > 1:
            raise CommandError(f"{cmd.name} takes at most one argument")
        if cmd.args:
            i = self._message(cmd)
            if i is not None:
                self.conn.write(ok(f"{i + 1} {value(i)}"))
            return True
        count, octets = self._totals()
        self._in_multiline = True
        try:
            self.conn.write(ok(f"{count} messages ({octets} octets)"))
            batch: list[str] = []
            batch_len = 0
            for i in range(len(self.messages)):
                if i in self.deleted:
                    continue
                line = f"{i + 1} {value(i)}\r\n"
                batch.append(line)
                batch_len += len(line)
                if batch_len >= OUTPUT_BATCH:
                    self.conn.write("".join(batch).encode())
                    batch, batch_len = [], 0
                    await self.conn.drain()
            batch.append(".\r\n")
            self.conn.write("".join(batch).encode())
        finally:
            self._in_multiline = False
        return True

    async def cmd_list(self, cmd: Command) -> bool:
        return await self._listing(cmd, lambda i: str(self.sizes[i]))

    async def cmd_uidl(self, cmd: Command) -> bool:
        return await self._listing(cmd, lambda i: self._uidl(self.messages[i]))

    async def cmd_dele(self, cmd: Command) -> bool:
        if len(cmd.args) != 1:
            raise CommandError("DELE takes one argument: DELE msg")
        i = self._message(cmd)
        if i is not None:
            self.deleted.add(i)
            self.deleted_octets += self.sizes[i]
            self.conn.write(ok(f"Message {i + 1} marked for deletion"))
        return True

    async def cmd_rset(self, cmd: Command) -> bool:
        if cmd.args:
            raise CommandError("RSET takes no arguments")
        self.deleted.clear()
        self.deleted_octets = 0
        count, octets = self._totals()
        self.conn.write(ok(f"{count} messages ({octets} octets)"))
        return True

    async def _update(self) -> bool:
        """QUIT in TRANSACTION: the UPDATE state. Deletions happen here and only here."""
        mailbox = self.mailbox
        deleted = [self.messages[i].uid for i in sorted(self.deleted)]
        seen = [self.messages[i].uid for i in sorted(self.retrieved - self.deleted)
                if "\\Seen" not in self.messages[i].flags]
        self.state = CLOSED  # from here on _release() reports deletions
        try:
            if seen:
                # As Dovecot does: what was downloaded shows as read in IMAP clients.
                await mailbox.store_flags(seen, {"\\Seen"}, "+", origin=self)
            if deleted:
                await mailbox.store_flags(deleted, {"\\Deleted"}, "+", origin=self)
                # by UID, whatever the flags now: an IMAP client that cleared \Deleted since
                # must not undo the DELE this QUIT commits (Dovecot expunges by UID too)
                expunged = await mailbox.expunge(deleted, origin=self, flagged_only=False)
                missing = set(deleted) - set(expunged)
                if missing:
                    # Gone already (an IMAP client expunged them meanwhile) is as good as deleted.
                    log.info("%d messages were already gone at UPDATE", len(missing), extra=self._log_extra)
        except (StoreError, OSError) as e:
            log.error("UPDATE failed for %s: %s", self.account, e, extra=self._log_extra)
            self.conn.write(err("Some deleted messages not removed", "SYS/TEMP"))
            return False
        count = len(self.messages) - len(self.deleted)
        self.conn.write(ok(f"{IMPLEMENTATION} POP3 server signing off ({count} messages left)"))
        return False


def _table(*names: str) -> dict[str, Callable]:
    return {name: getattr(POP3Session, f"cmd_{name.lower()}") for name in names}


_AUTH_HANDLERS = _table("CAPA", "QUIT", "STLS", "USER", "PASS", "APOP", "AUTH")
_TRANSACTION_HANDLERS = _table("CAPA", "QUIT", "NOOP", "STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL")
_ALL_COMMANDS = set(_AUTH_HANDLERS) | set(_TRANSACTION_HANDLERS)
