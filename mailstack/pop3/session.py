"""One POP3 session: the RFC 1939 state machine (AUTHORIZATION -> TRANSACTION -> UPDATE)
with RFC 2449 CAPA and response codes, RFC 2595 STLS and RFC 5034 AUTH PLAIN.

The session sees the INBOX as it was at login (RFC 1939: message numbers do not change
during a session).  DELE only marks; the store is changed in the UPDATE state after QUIT,
so a dropped connection deletes nothing.  Deletions go through the store's flag +
expunge, which publishes the events that IMAP sessions on the same mailbox act on.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
import urllib.parse
from typing import Awaitable, Callable

from .. import tlsclose
from ..defense import connections as floods
from ..store.base import MailboxNotFound, MessageInfo, StoreError
from .connection import Connection
from .parser import (LINE_TOO_LONG, Command, CommandError, MessageEncoder, decode_sasl_plain, err,
                     format_uidl, multiline, ok, parse_command, parse_number, TopCutter, uidl_for_key)
from .retrieve import READ_AHEAD_BYTES, READ_AHEAD_COUNT, SMALL_MESSAGE, FileStream, read_ahead
from .sizes import message_sizes

log = logging.getLogger("mailstack.pop3")

PROTOCOL = "pop3"  # SessionRegistry protocol name shared by the pop3 and pop3s listeners
IMPLEMENTATION = "mailstack"
AUTH_FAILURES_BEFORE_DISCONNECT = 3
# RETR streams the message in pieces of this size: memory per session stays bounded.
READ_CHUNK = 256 * 1024
# TOP reads this much first and more only when the header is longer.
TOP_FIRST_READ = 16 * 1024
# LIST/UIDL output is written in batches of about this many bytes, waiting for the client between.
OUTPUT_BATCH = 64 * 1024

AUTHORIZATION, TRANSACTION, CLOSED = "AUTHORIZATION", "TRANSACTION", "CLOSED"


class MailboxLocks:
    """One POP3 session per mailbox: an in-process table plus an flock()ed file, so that
    another process on the same data directory is kept out as well."""

    def __init__(self, lock_dir: os.PathLike | str) -> None:
        self.lock_dir = os.fspath(lock_dir)
        self._held: dict[str, int] = {}  # account -> fd (-1 while the file lock is being taken)

    def _path(self, account: str) -> str:
        return os.path.join(self.lock_dir, urllib.parse.quote(account, safe="@.-_+") + ".lock")

    def _take_file_lock(self, account: str) -> int | None:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        fd = os.open(self._path(account), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def acquire(self, account: str) -> bool:
        if account in self._held:
            return False
        self._held[account] = -1  # reserve before the await: two logins cannot both pass
        try:
            fd = await asyncio.to_thread(self._take_file_lock, account)
        except BaseException:
            del self._held[account]
            raise
        if fd is None:
            del self._held[account]
            return False
        self._held[account] = fd
        return True

    def release(self, account: str) -> None:
        fd = self._held.pop(account, None)
        if fd is not None and fd >= 0:
            os.close(fd)  # closing the descriptor drops the flock; the file stays (no unlink race)

    def held(self, account: str) -> bool:
        return account in self._held


class POP3Session:
    def __init__(self, services, listener: str, conn: Connection) -> None:
        self.services = services
        self.cfg = services.config.pop3  # a reload applies to new sessions only
        self.listener = listener
        self.conn = conn
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
        self._ahead: dict[int, bytes] = {}  # message index -> RETR's bytes, read ahead (retrieve.py)
        self._ahead_pending: set[int] = set()  # being read ahead now
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
        if self._ahead_task is not None:
            self._ahead_task.cancel()  # a read running in its thread finishes; its result is dropped
        self._ahead.clear()
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
            log.info("login failed user=<%s>", user[:320], extra=self._log_extra)
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
            from ..store.preserve import read_pop3_uidl
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

    async def cmd_retr(self, cmd: Command) -> bool:
        if len(cmd.args) != 1:
            raise CommandError("RETR takes one argument: RETR msg")
        i = self._message(cmd)
        if i is None:
            return True
        uid = self.messages[i].uid
        path = self.mailbox.path(uid)  # None: gone meanwhile, or a backend without files
        if path is not None:
            data = await self._read_ahead_result(i)
            if data is not None:  # read (and encoded) while the client handled the last one
                self._sent_message(i, len(data))
                self.conn.write(ok(f"{self.sizes[i]} octets") + data + b".\r\n")
                self._read_ahead_from(i)
                return True
            try:
                stream = await asyncio.to_thread(FileStream, path)
            except FileNotFoundError:  # renamed (a flag change) or removed: ask the store
                stream = None
            except OSError as e:
                log.warning("RETR %d (uid %d) failed: %s", i + 1, uid, e, extra=self._log_extra)
                self.conn.write(err("Message is no longer available", "SYS/TEMP"))
                return True
            if stream is not None:
                try:
                    return await self._retr_stream(i, stream)
                finally:
                    stream.close()
        return await self._retr_by_range(i, uid)

    def _sent_message(self, i: int, sent: int) -> None:
        self.bytes_sent += sent
        if sent < self.sizes[i]:  # would mean the file changed under us: Maildir files never do
            log.warning("RETR %d (uid %d) sent %d octets, LIST said %d", i + 1, self.messages[i].uid, sent,
                        self.sizes[i], extra=self._log_extra)
        self.retrieved.add(i)

    async def _read_ahead_result(self, i: int) -> bytes | None:
        """Message i as read ahead, or None when it was not (or could not be)."""
        task = self._ahead_task
        if i not in self._ahead and task is not None and i in self._ahead_pending:
            try:
                await asyncio.shield(task)  # being read now: waiting beats a second read
            except (OSError, StoreError):
                return None
        return self._ahead.pop(i, None)

    def _read_ahead_from(self, i: int) -> None:
        """After RETR i: read the next small messages in one thread hop, unless enough are
        read already or a read is running.  Bounded by READ_AHEAD_BYTES / _COUNT."""
        if self._ahead_task is not None and not self._ahead_task.done():
            return
        for k in [k for k in self._ahead if k <= i]:  # skipped by the client: not kept
            del self._ahead[k]
        held = sum(map(len, self._ahead.values()))
        if len(self._ahead) >= READ_AHEAD_COUNT // 2 or held >= READ_AHEAD_BYTES // 2:
            return
        wanted: list[tuple[int, str]] = []
        budget = READ_AHEAD_BYTES - held
        j = i + 1
        while j < len(self.messages) and len(wanted) + len(self._ahead) < READ_AHEAD_COUNT:
            if j not in self.deleted and j not in self._ahead:
                size = self.sizes[j]
                if size > SMALL_MESSAGE or size > budget:
                    break
                path = self.mailbox.path(self.messages[j].uid)
                if path is None:
                    break
                wanted.append((j, path))
                budget -= size
            j += 1
        if not wanted:
            return
        self._ahead_pending = {j for j, _ in wanted}
        task = asyncio.ensure_future(asyncio.to_thread(read_ahead, wanted))

        def done(t: asyncio.Future) -> None:
            if self._ahead_task is t:
                self._ahead_pending = set()
            if not t.cancelled() and t.exception() is None and self.state == TRANSACTION:
                self._ahead.update(t.result())
        task.add_done_callback(done)
        self._ahead_task = task

    async def _retr_stream(self, i: int, stream: FileStream) -> bool:
        """RETR from an open file: pieces read and encoded in a thread, one piece ahead."""
        uid = self.messages[i].uid
        try:
            out = await asyncio.to_thread(stream.next)
        except OSError as e:
            log.warning("RETR %d (uid %d) failed: %s", i + 1, uid, e, extra=self._log_extra)
            self.conn.write(err("Message is no longer available", "SYS/TEMP"))
            return True
        self._in_multiline = True
        head = ok(f"{self.sizes[i]} octets")
        sent = 0
        while True:
            ahead = None if stream.done else asyncio.ensure_future(asyncio.to_thread(stream.next))
            sent += len(out)
            if head:  # one write (one segment) for a message that fits in a piece
                out, head = head + out, b""
            self.conn.write(out + b".\r\n" if ahead is None else out)
            if ahead is None:
                break
            try:
                await self.conn.drain()
                out = await ahead
            except OSError as e:
                # Half a message is out: no way to say -ERR now, so hang up without the
                # terminator; the client sees a failed download, never a short message.
                log.error("RETR %d (uid %d) failed after %d bytes: %s", i + 1, uid, sent, e,
                          extra=self._log_extra)
                self.conn.abort()
                return False
            except BaseException:  # cancelled (shutdown): the read ahead goes too
                ahead.cancel()
                raise
        self._in_multiline = False
        self._sent_message(i, sent)
        self._read_ahead_from(i)
        return True

    async def _retr_by_range(self, i: int, uid: int) -> bool:
        """RETR through the store's read_range: a backend without files, or a file that moved."""
        # Read the first piece before saying +OK: a message that has gone (expunged over
        # IMAP meanwhile) or an I/O error still gets a proper -ERR.
        try:
            chunk = await self.mailbox.read_range(uid, 0, READ_CHUNK)
        except (StoreError, OSError, KeyError) as e:
            log.warning("RETR %d (uid %d) failed: %s", i + 1, uid, e, extra=self._log_extra)
            self.conn.write(err("Message is no longer available", "SYS/TEMP"))
            return True
        self._in_multiline = True
        self.conn.write(ok(f"{self.sizes[i]} octets"))
        encoder = MessageEncoder()
        sent = 0
        offset = 0
        while True:
            offset += len(chunk)
            # the next piece is read (in a thread) while this one goes out: one piece ahead
            ahead = asyncio.ensure_future(self.mailbox.read_range(uid, offset, READ_CHUNK)) \
                if len(chunk) == READ_CHUNK else None
            out = encoder.feed(chunk)
            sent += len(out)
            self.conn.write(out)
            if ahead is None:
                break
            try:
                await self.conn.drain()
            except BaseException:  # cancelled (shutdown): the read ahead goes too
                ahead.cancel()
                raise
            try:
                chunk = await ahead
            except (StoreError, OSError, KeyError) as e:
                # Half a message is out: no way to say -ERR now, so hang up without the
                # terminator; the client sees a failed download, never a short message.
                log.error("RETR %d (uid %d) failed after %d bytes: %s", i + 1, uid, offset, e,
                          extra=self._log_extra)
                self.conn.abort()
                return False
        out = encoder.end()
        sent += len(out)
        self.conn.write(out + b".\r\n")
        self._in_multiline = False
        self._sent_message(i, sent)
        return True

    async def cmd_top(self, cmd: Command) -> bool:
        if len(cmd.args) != 2:
            raise CommandError("TOP takes two arguments: TOP msg n")
        lines = parse_number(cmd.args[1], "line count")
        i = self._message(cmd)
        if i is None:
            return True
        uid = self.messages[i].uid
        # Read piece by piece, like RETR: TOP 1 1000000 of a 50 MB message must not hold it whole.
        try:
            chunk = await self.mailbox.read_range(uid, 0, TOP_FIRST_READ)
        except (StoreError, OSError, KeyError) as e:
            log.warning("TOP %d (uid %d) failed: %s", i + 1, uid, e, extra=self._log_extra)
            self.conn.write(err("Message is no longer available", "SYS/TEMP"))
            return True
        self._in_multiline = True
        self.conn.write(ok())
        cutter, encoder = TopCutter(lines), MessageEncoder()
        offset, want = 0, TOP_FIRST_READ
        while True:
            out = encoder.feed(cutter.feed(chunk))
            self.bytes_sent += len(out)
            self.conn.write(out)
            offset += len(chunk)
            if cutter.done or len(chunk) < want:
                break
            await self.conn.drain()
            want = READ_CHUNK
            try:
                chunk = await self.mailbox.read_range(uid, offset, want)
            except (StoreError, OSError, KeyError) as e:
                log.error("TOP %d (uid %d) failed after %d bytes: %s", i + 1, uid, offset, e, extra=self._log_extra)
                self.conn.abort()
                return False
        out = encoder.end()
        self.bytes_sent += len(out)
        self.conn.write(out + b".\r\n")
        self._in_multiline = False
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
