"""One IMAP connection: the state machine and its I/O.

This module reads bytes, frames and dispatches commands, and writes responses in large
batches; it holds the any-state and login commands.  The commands themselves live in
mixins by the state they run in: mailboxes.py (authenticated: CREATE, LIST, STATUS,
APPEND ...), selected.py (SELECT, IDLE, sync, STORE, COPY, SEARCH ...), fetching.py
(FETCH).  Parsing lives in parser.py, rendering in response.py/fetch.py.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl

from .. import proxy, tlsclose
from ..defense import connections as floods
from ..smtp.budget import budget_for
from ..store.base import MailboxExists, MailboxNotFound, StoreError, StoreFull, StoreIOError
from .appending import AppendCommands, max_append_bytes
from .compress import CompressCommands
from .notify import NotifyCommands
from ..store.quota import QuotaExceeded
from .condstore import CondstoreCommands
from .fetching import BIG_CHUNK, FetchCommands
from .listing import ListCommands
from .mailboxes import MailboxCommands
from .framer import CommandFramer, Continuation, Frame, FrameError
from .parser import Command, MailboxNameError, ParseError, parse_command, parse_tag
from .searching import SearchCommands
from .selected import SelectedCommands
from .quota import QuotaCommands
from .states import AUTH, EMPTY, LOGOUT, NOT_AUTH, READ_SIZE, SELECTED, Bye

log = logging.getLogger("mailstack.imap")

FLUSH_AT = 256 * 1024


# Offered once logged in, one per line so each extension adds its own line.  An extension
# is listed only when it is complete.
AUTHENTICATED_CAPABILITIES = [
    "NAMESPACE",
    "UIDPLUS",
    "MOVE",
    "UNSELECT",
    "SPECIAL-USE",
    "CHILDREN",
    "BINARY",  # RFC 3516 (fetching.py, binary.py; literal8 in APPEND: appending.py)
    "MULTIAPPEND",  # RFC 3502 (appending.py)
    "CATENATE",  # RFC 4469 (appending.py, imapurl.py)
    "APPENDLIMIT={appendlimit}",  # RFC 7889: filled in by capabilities()
    "LIST-EXTENDED",
    "LIST-STATUS",
    "STATUS=SIZE",
    "UTF8=ACCEPT",
    "CREATE-SPECIAL-USE",
    "COMPRESS=DEFLATE",
    "NOTIFY",
    "QUOTA",
    "QUOTA=RES-STORAGE",
    "QUOTA=RES-MESSAGE",
    "CONDSTORE",
    "QRESYNC",
    "SORT",
    "SORT=DISPLAY",
    "THREAD=ORDEREDSUBJECT",
    "THREAD=REFERENCES",
    "ESEARCH",
    "ESORT",
    "SEARCHRES",
    "WITHIN",
]
# LITERAL-: not offered.  RFC 7888: LITERAL- is LITERAL+ with non-synchronising literals
# limited to 4096 octets (a server offering only LITERAL- must refuse bigger ones with BAD
# [TOOBIG]).  We offer LITERAL+, the superset, to every client: a non-synchronising
# literal of any size up to the command's bound is accepted, and advertising LITERAL- too
# would announce a limit we do not apply.  Dovecot offers LITERAL+ only, as we do; RFC 9051
# puts LITERAL- into IMAP4rev2's base, which a LITERAL+ server satisfies already.
# What ENABLE (RFC 5161) can switch on; the session keeps what was enabled in
# self.enabled, and each extension checks it there.  One per line, as above.
ENABLEABLE = frozenset({
    "UTF8=ACCEPT",
    "IMAP4REV2",
    "CONDSTORE",
    "QRESYNC",
})

# IMAP commands being carried out now, in the whole process (IDLE excepted: it waits, it
# does not work): the background indexer starts no batch while there are any, whatever the
# process's CPU share says on a loaded machine (server.py, store/background.py)
commands_running = 0

_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_NOT_AUTH = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
_AUTH = {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
         "STATUS", "APPEND", "NAMESPACE", "ENABLE", "IDLE"}
_AUTH |= {"GETQUOTA", "GETQUOTAROOT", "SETQUOTA"}  # quota.py (RFC 9208)
_SELECTED = {"CHECK", "CLOSE", "EXPUNGE", "UNSELECT", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
             "SORT", "THREAD"}
# RFC 3501 7.4.1: no EXPUNGE while answering these (non-UID) commands.
_NO_EXPUNGE = {"FETCH", "STORE", "SEARCH", "SORT", "THREAD"}




class IMAPSession(AppendCommands, ListCommands, MailboxCommands, SelectedCommands, SearchCommands,
                  FetchCommands, CompressCommands, NotifyCommands, QuotaCommands, CondstoreCommands):
    # Every attribute a logged-in session in IDLE has is a slot (8 bytes each).  In an
    # instance __dict__ they cost far more once there are many: CPython 3.11 shares one key
    # table among a class's instances only up to 30 attribute names (all names ever set on
    # any instance of the class count), and past that every session carries its own combined
    # dict (~1.3-1.6 KiB).  The mixins' rarer attributes (NOTIFY, COMPRESS, extension use ...)
    # still go into the instance dict, which stays small and shared-key while they are few.
    # A slot must be set in __init__: it hides a class-level default of a mixin.
    # tests/test_imap_session_memory.py checks that an IDLE session's dict stays empty.
    __slots__ = ("services", "cfg", "listener", "reader", "writer", "peer_ip", "tls", "state", "account",
                 "out", "framer", "mbox", "recent", "keywords", "_unsubscribe", "dirty", "wake", "closing",
                 "uid_cmd", "reserved", "enabled", "used", "client_name", "idle_since", "search_result",
                 "_registry_protocol")

    def __init__(self, services, listener: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, tls: bool) -> None:
        cfg = services.config
        self.services = services
        self.cfg = cfg.imap
        self.listener = listener
        self.reader, self.writer = reader, writer
        self.peer_ip: str | None = proxy.client_ip(writer.transport)  # the real client, also behind a proxy
        self.tls = tls
        self.state = NOT_AUTH
        self.account: str | None = None
        self.out = bytearray()
        self.framer = CommandFramer(self.cfg.max_line_length, min(self.cfg.max_line_length, 1 << 20),
                                    cfg.smtp.max_message_size, max_append_bytes(cfg),
                                    reserve=lambda n: budget_for(services).reserve(n))  # LITERAL+ ones
        self.mbox = None  # selected Mailbox
        self.recent: set[int] | frozenset[int] = EMPTY  # a set of its own once something is \\Recent
        self.keywords: frozenset[str] = EMPTY
        self._unsubscribe = None
        self.dirty = False  # another session/delivery changed the selected mailbox
        self.wake = None  # an idlewait.Wake while idling
        self.closing = False
        self.uid_cmd = False
        self.reserved = 0  # bytes of the in-flight literal counted in the shared budget
        self.enabled: frozenset[str] = EMPTY  # extensions switched on by ENABLE (RFC 5161); rebound
        self.used: tuple[str, ...] = ()  # command names used after login (summary line): a few
        self.client_name: str | None = None  # from ID, for the summary line
        self.idle_since: float | None = None  # loop time the current read began (defense/connections.py)
        self.search_result: frozenset = EMPTY  # SEARCHRES "$" (RFC 5182; searching.py)
        self._registry_protocol: str | None = None  # set by SessionRegistry.add (services.py)

    # ------------------------------------------------------------------ output
    def send(self, line: bytes) -> None:
        self.out += line
        self.out += b"\r\n"

    async def flush(self) -> None:
        if self.out:
            self.writer.write(bytes(self.out))
            self.out.clear()
            await self.drain()

    async def drain(self) -> None:
        # A client that stops reading must not pin the session (and its buffers) for ever.
        try:
            await asyncio.wait_for(self.writer.drain(), self.cfg.idle_timeout)
        except asyncio.TimeoutError:
            self.writer.transport.abort()
            raise Bye() from None

    async def maybe_flush(self) -> None:
        if len(self.out) >= FLUSH_AT:
            await self.flush()

    def close_for_shutdown(self) -> None:
        self.closing = True
        try:
            self.writer.write(bytes(self.out) + b"* BYE Server shutting down\r\n")
            self.out.clear()
            self.writer.close()
            # A TLS close waits for the peer's close_notify; do not wait for ever.
            transport = self.writer.transport
            asyncio.get_running_loop().call_later(1.0, transport.abort)
        except Exception:  # noqa: BLE001 - shutdown must not raise
            pass

    # ------------------------------------------------------------------ capabilities
    def plaintext_ok(self) -> bool:
        return self.tls or self.cfg.allow_plaintext_auth

    def capabilities(self) -> str:
        # IMAP4rev2 (RFC 9051) folds in NAMESPACE, UNSELECT, UIDPLUS, ESEARCH, SEARCHRES, ENABLE,
        # IDLE, SASL-IR, LITERAL- (LITERAL+ is its superset), BINARY, SPECIAL-USE, LIST-EXTENDED,
        # LIST-STATUS, MOVE and STATUS=SIZE: all offered; rev2.py holds what ENABLE changes.
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == NOT_AUTH:
            if not self.tls:
                caps.append("STARTTLS")
            if self.plaintext_ok():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += [c.format(appendlimit=self.appendlimit()) for c in AUTHENTICATED_CAPABILITIES]
        return " ".join(caps)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        self.send(f"* OK [CAPABILITY {self.capabilities()}] mailstack IMAP ready".encode())
        try:
            await self.flush()
            while self.state != LOGOUT and not self.closing:
                ev = await self.next_event()
                if ev is None:
                    break
                await self.handle(ev)
                await self.flush()
        except Bye:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            await self.cleanup()

    async def read_more(self, timeout: float | None) -> bool:
        try:
            data = await asyncio.wait_for(self.read_or_notify(), timeout)  # NOTIFY news while waiting
        except asyncio.TimeoutError:
            self.send(b"* BYE Autologout; idle for too long")
            raise Bye() from None
        if not data:
            return False
        self.framer.feed(data)
        return True

    async def next_event(self):
        while not self.framer.events:
            timeout = self.cfg.idle_timeout
            if self.state == NOT_AUTH:  # short before login, shorter under stress (defense/connections.py)
                timeout = floods.read_timeout(self.services, "imap", self.cfg.max_connections, True,
                                              min(timeout, self.services.config.defense.login_timeout))
            self.idle_since = asyncio.get_running_loop().time()
            try:
                if not await self.read_more(timeout):
                    return None
            finally:
                self.idle_since = None
        return self.framer.events.pop(0)

    # --- for the connection-flood defence (idle_since: a slot, set in __init__) -------------
    @property
    def preauth(self) -> bool:
        return self.state == NOT_AUTH

    def close_idle(self) -> None:
        self.closing = True
        try:
            self.writer.write(bytes(self.out) + b"* BYE Autologout; idle for too long\r\n")
            self.out.clear()
            self.writer.close()
            asyncio.get_running_loop().call_later(1.0, self.writer.transport.abort)
        except Exception:  # noqa: BLE001 - must not raise
            pass

    async def handle(self, ev) -> None:
        if isinstance(ev, (Frame, FrameError)):  # big LITERAL+ literals the framer counted
            self.reserved += ev.reserved
        if isinstance(ev, Continuation):
            # Big literals (APPEND) count against the process-wide budget of message bytes
            # held in memory, shared with SMTP DATA: many clients uploading at once get a
            # "try again" instead of exhausting memory.
            if ev.size > BIG_CHUNK and not self.framer.events:
                budget = budget_for(self.services)
                if not budget.reserve(ev.size):
                    self.reserved += self.framer.refuse_literal()
                    self._release_reserved()
                    tag = (ev.tag or b"*").decode("ascii", "replace")
                    self.send(f"{tag} NO [LIMIT] Server busy, try again later".encode())
                    return
                self.reserved += ev.size
            self.send(b"+ Ready for literal data")
            return
        if isinstance(ev, FrameError):
            self._release_reserved()
            tag = (ev.tag or b"*").decode("ascii", "replace")
            if parse_tag([ev.tag or b""]) is None:
                tag = "*"
            if ev.fatal:
                self.send(f"* BYE [{ev.code or 'TOOBIG'}] {ev.message}".encode())
                raise Bye()
            code = f"[{ev.code}] " if ev.code else ""
            self.send(f"{tag} {'NO' if ev.code else 'BAD'} {code}{ev.message}".encode())
            return
        assert isinstance(ev, Frame)
        try:
            await self._run_frame(ev)
        finally:
            self._release_reserved()

    def _release_reserved(self) -> None:
        if self.reserved:
            budget_for(self.services).release(self.reserved)
            self.reserved = 0

    async def _run_frame(self, ev: Frame) -> None:
        try:
            cmd = parse_command(ev.parts, self.enabled)
        except ParseError as e:
            if getattr(e, "reset_search_result", False):  # RFC 5182: "$" is emptied
                self.search_result = EMPTY
            code = f"[{e.code}] " if e.code else ""
            # RFC 3501 6.4.4: an unsupported charset is NO [BADCHARSET], not a syntax error;
            # nor is a mailbox name that is not valid modified UTF-7
            refused = isinstance(e, MailboxNameError) or (e.code and e.code.startswith("BADCHARSET"))
            status = "NO" if refused and e.tag else "BAD"
            self.send(f"{e.tag or '*'} {status} {code}{e.message}".encode("utf-8", "replace"))
            return
        await self.dispatch(cmd)

    async def dispatch(self, cmd: Command) -> None:
        name = cmd.name
        if name in _ANY:
            pass
        elif name in _NOT_AUTH:
            if self.state != NOT_AUTH:
                return self.tagged(cmd, "BAD", "Already authenticated")
        elif name in _AUTH:
            if self.state < AUTH:
                return self.tagged(cmd, "BAD", "Not authenticated")
        elif name in _SELECTED or cmd.uid:
            if self.state != SELECTED:
                return self.tagged(cmd, "BAD", "No mailbox selected")
        handler = getattr(self, "cmd_" + name.lower())
        self.uid_cmd = cmd.uid
        if self.account is not None:  # for the summary line at the end (which extensions clients use)
            used = "UID " + name if cmd.uid else name
            if used not in self.used:
                self.used += (used,)
        global commands_running
        counted = name != "IDLE"
        commands_running += counted
        try:
            await handler(cmd)
        except MailboxNotFound as e:
            self.tagged(cmd, "NO", f"[NONEXISTENT] {e or 'Mailbox does not exist'}")
        except MailboxExists as e:
            self.tagged(cmd, "NO", f"[ALREADYEXISTS] {e or 'Mailbox exists'}")
        except QuotaExceeded as e:  # the account's quota (store/quota.py); nothing was changed
            self.tagged(cmd, "NO", f"[OVERQUOTA] {e}")
        except StoreFull as e:  # as Dovecot answers ENOSPC; the store changed nothing
            self.tagged(cmd, "NO", f"[OVERQUOTA] {e}")
        except StoreIOError as e:
            self.tagged(cmd, "NO", f"[SERVERBUG] {e}")
        except StoreError as e:
            self.tagged(cmd, "NO", str(e) or "Refused")
        except (Bye, ConnectionError, OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            raise
        except Exception:
            log.exception("IMAP %s failed", name, extra={"client": self.peer_ip})
            self.tagged(cmd, "NO", "[SERVERBUG] Internal error")
        finally:
            self.uid_cmd = False
            commands_running -= counted

    def tagged(self, cmd: Command, status: str, text: str) -> None:
        self.send(f"{cmd.tag} {status} {text}".encode("utf-8", "replace"))

    async def done(self, cmd: Command, text: str, status: str = "OK") -> None:
        """Finish a command: report mailbox changes (where allowed) and the tagged reply."""
        if self.state == SELECTED:
            await self.sync(allow_expunge=cmd.uid or cmd.name not in _NO_EXPUNGE)
        self.tagged(cmd, status, text)

    async def cleanup(self) -> None:
        if self.account is not None:
            # One line per session: which commands and extensions this client used
            # (docs/imap-clients.md is built from these lines).
            log.info("IMAP session summary: account=%s client=%s commands=%s enabled=%s",
                     self.account, self.client_name or "-", ",".join(sorted(self.used or ())) or "-",
                     ",".join(sorted(self.enabled)) or "-", extra={"client": self.peer_ip})
        self.state = LOGOUT
        self.reserved += self.framer.pending_reserved
        self._release_reserved()
        self.notify_stop()
        await self.unselect()
        try:
            if self.out and not self.writer.is_closing():
                self.writer.write(bytes(self.out))
                self.out.clear()
            # over TLS, close() alone waits up to 30 s for the client's close_notify
            tlsclose.close_soon(self.writer.transport)
        except Exception:  # noqa: BLE001
            pass
        self.services.sessions.discard(self)

    # ------------------------------------------------------------------ any state
    async def cmd_capability(self, cmd: Command) -> None:
        self.send(f"* CAPABILITY {self.capabilities()}".encode())
        await self.done(cmd, "CAPABILITY completed")

    async def cmd_noop(self, cmd: Command) -> None:
        await self.done(cmd, "NOOP completed")

    async def cmd_logout(self, cmd: Command) -> None:
        self.send(b"* BYE Logging out")
        self.tagged(cmd, "OK", "LOGOUT completed")
        self.state = LOGOUT

    async def cmd_id(self, cmd: Command) -> None:
        params = cmd.args["params"] or {}
        name = params.get("name") or params.get("Name")
        if name:
            self.client_name = " ".join((name + " " + (params.get("version") or "")).split())[:64]
        self.send(b'* ID ("name" "mailstack")')
        await self.done(cmd, "ID completed")

    # ------------------------------------------------------------------ not authenticated
    async def cmd_starttls(self, cmd: Command) -> None:
        if self.tls:
            return self.tagged(cmd, "BAD", "TLS is active already")
        if self.framer.buffered or self.framer.events or len(getattr(self.reader, "_buffer", b"")):
            # Commands pipelined after STARTTLS would be injected into the TLS session.
            self.tagged(cmd, "BAD", "Pipelined data after STARTTLS")
            raise Bye()
        # Stop reading before the OK goes out: the client's ClientHello answers the OK, and if
        # the loop read it into the plaintext buffer while the OK is flushed (flush awaits),
        # the TLS layer would never see it and the handshake would hang. start_tls resumes.
        self.writer.transport.pause_reading()
        self.tagged(cmd, "OK", "Begin TLS negotiation now")
        await self.flush()
        try:
            await self.writer.start_tls(self.services.tls.for_listener(self.listener))
        except (ssl.SSLError, OSError, ConnectionError):
            raise Bye() from None
        self.tls = True

    async def login(self, cmd: Command, user: str, password: bytes) -> None:
        attempt = await self.services.throttle.attempt("imap", self.peer_ip, user or None)
        if attempt.refused:  # blocked address or too many logins at once (defense/guard.py)
            return self.tagged(cmd, "NO", "[UNAVAILABLE] Too many failed logins from your address, try again later")
        try:
            account = await self.services.directory.authenticate(user, password) if user else None
        except BaseException:
            attempt.abandoned()
            raise
        if account is None:
            attempt.failed()
            self.services.metrics.auth_failures["imap"] += 1
            return self.tagged(cmd, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
        attempt.succeeded(account)
        try:
            await self.services.store.ensure_account(account)
        except StoreError as e:
            return self.tagged(cmd, "NO", f"[UNAVAILABLE] {e}")
        self.account = account
        self.state = AUTH
        log.info("IMAP login %s", account, extra={"client": self.peer_ip})
        self.tagged(cmd, "OK", f"[CAPABILITY {self.capabilities()}] Logged in")

    async def cmd_login(self, cmd: Command) -> None:
        if not self.plaintext_ok():
            return self.tagged(cmd, "NO", "[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
        try:
            user = cmd.args["user"].decode("utf-8")
        except UnicodeDecodeError:
            return self.tagged(cmd, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
        await self.login(cmd, user, cmd.args["password"])

    async def cmd_authenticate(self, cmd: Command) -> None:
        if cmd.args["mechanism"] != "PLAIN":
            return self.tagged(cmd, "NO", "Unsupported authentication mechanism")
        if not self.plaintext_ok():
            return self.tagged(cmd, "NO", "[PRIVACYREQUIRED] Authentication is disabled before STARTTLS")
        raw = cmd.args["initial"]
        if raw is None:
            self.send(b"+ ")
            await self.flush()
            ev = await self.next_event()
            if ev is None:
                raise Bye()
            if not isinstance(ev, Frame) or len(ev.parts) != 1:
                return self.tagged(cmd, "BAD", "Bad SASL response")
            raw = ev.parts[0].strip()
        if raw == b"*":
            return self.tagged(cmd, "BAD", "Authentication cancelled")
        try:
            decoded = b"" if raw == b"=" else base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return self.tagged(cmd, "BAD", "Bad base64 in SASL response")
        fields = decoded.split(b"\0")
        if len(fields) != 3:
            return self.tagged(cmd, "BAD", "Malformed PLAIN response")
        authz, authc, password = fields
        try:
            user = authc.decode("utf-8")
            authz_s = authz.decode("utf-8")
        except UnicodeDecodeError:
            return self.tagged(cmd, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
        if authz_s and authz_s.lower() != user.lower():
            return self.tagged(cmd, "NO", "[AUTHORIZATIONFAILED] Cannot act as another user")
        await self.login(cmd, user, password)

    # ------------------------------------------------------------------ authenticated


    # ------------------------------------------------------------------ selected: sync


    # ------------------------------------------------------------------ selected commands


    # ------------------------------------------------------------------ SEARCH


    # ------------------------------------------------------------------ FETCH


