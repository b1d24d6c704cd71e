"""One IMAP connection: the state machine and its I/O.

Parsing lives in parser.py, rendering in response.py/fetch.py, search in search.py;
this module reads bytes, runs commands against the store and writes responses in
large batches.

Sequence numbers: the selected Mailbox's `messages` list is this session's view; it is
only refreshed at moments when RFC 3501 lets us announce EXPUNGE (never during a
non-UID FETCH, STORE or SEARCH), so numbers the client holds stay valid.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import logging
import re
import ssl
import time

from .. import proxy, tlsclose
from .. import proxy
from ..defense import connections as floods
from ..events import MailboxEvent
from ..filters import learn as filters_learn
from ..smtp.budget import budget_for
from ..store import fts
from ..store.base import SYSTEM_FLAGS, MailboxExists, MailboxNotFound, StoreError, StoreFull, StoreIOError
from . import fetch, response, search
from .parser import (Command, CommandFramer, Continuation, FetchAtt, Frame, FrameError, MailboxNameError,
                     ParseError, parse_command, parse_tag)

log = logging.getLogger("mailstack.imap")

NOT_AUTH, AUTH, SELECTED, LOGOUT = range(4)
READ_SIZE = 65536
FLUSH_AT = 256 * 1024
FETCH_BATCH = 500
HEADER_PEEK = 16384  # bytes read first when only the header is needed


_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_NOT_AUTH = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
_AUTH = {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
         "STATUS", "APPEND", "NAMESPACE", "ENABLE", "IDLE"}
_SELECTED = {"CHECK", "CLOSE", "EXPUNGE", "UNSELECT", "SEARCH", "FETCH", "STORE", "COPY", "MOVE"}
# RFC 3501 7.4.1: no EXPUNGE while answering these (non-UID) commands.
_NO_EXPUNGE = {"FETCH", "STORE", "SEARCH"}


BIG_CHUNK = 65536
STREAM_MIN = 1 << 20  # whole messages at least this big are streamed, not read whole
STREAM_CHUNK = 256 * 1024  # bytes read per piece when streaming


class _Lit:
    """A FETCH item whose value is a literal: kept apart so big bodies are not copied."""

    __slots__ = ("label", "data")

    def __init__(self, label: bytes, data: bytes) -> None:
        self.label, self.data = label, data


class _Stream:
    """A whole-message literal sent in bounded pieces read from the store as the client takes
    them (big messages: never whole in memory)."""

    __slots__ = ("label", "uid", "size")

    def __init__(self, label: bytes, uid: int, size: int) -> None:
        self.label, self.uid, self.size = label, uid, size


def _join_fetch(seq: int, items: list) -> "bytes | list":
    """One "* n FETCH (...)" response: bytes, or a list of chunks when it holds a big literal."""
    chunks: list[bytes] = []
    cur = bytearray(b"* %d FETCH (" % seq)
    for i, item in enumerate(items):
        if i:
            cur += b" "
        if isinstance(item, _Stream):
            cur += item.label + b" {%d}\r\n" % item.size
            chunks.append(bytes(cur))
            chunks.append(item)
            cur = bytearray()
        elif isinstance(item, _Lit):
            cur += item.label + b" {%d}\r\n" % len(item.data)
            if len(item.data) >= BIG_CHUNK:
                chunks.append(bytes(cur))
                chunks.append(item.data)
                cur = bytearray()
            else:
                cur += item.data
        else:
            cur += item
    cur += b")\r\n"
    if not chunks:
        return bytes(cur)
    chunks.append(bytes(cur))
    return chunks


class _Bye(Exception):
    """End the session (after writing what is queued)."""


def check_mailbox_name(name: str) -> str | None:
    """Why a mailbox name is refused, or None.  Names must stay inside the user's Maildir."""
    if not name:
        return "empty mailbox name"
    if len(name) > 512:
        return "mailbox name too long"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "mailbox name contains a control character"
    if name.startswith("/") or name.startswith("~"):
        return "mailbox name must not be an absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "mailbox name has an empty, '.' or '..' component"
    if any(p.startswith(".") for p in parts):
        return "mailbox name components must not start with '.'"
    if "\\" in name or "*" in name or "%" in name:
        return "mailbox name contains a reserved character"
    if len(parts) > 32:
        return "mailbox hierarchy too deep"
    return None


def list_pattern(pattern: str) -> re.Pattern:
    """LIST wildcards: * matches anything, % anything but the hierarchy separator."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch))
    rx = "".join(out)
    if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] in "/*%"):
        rx = "INBOX" + "".join(out[5:])
    return re.compile(rx + r"\Z", re.S)


class IMAPSession:
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
                                    cfg.smtp.max_message_size)
        self.mbox = None  # selected Mailbox
        self.recent: set[int] = set()
        self.keywords: set[str] = set()
        self._unsubscribe = None
        self.dirty = False  # another session/delivery changed the selected mailbox
        self.wake: asyncio.Event | None = None  # set while idling
        self.closing = False
        self.uid_cmd = False
        self.reserved = 0  # bytes of the in-flight literal counted in the shared budget

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
            raise _Bye() from None

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
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == NOT_AUTH:
            if not self.tls:
                caps.append("STARTTLS")
            if self.plaintext_ok():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += ["NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE", "CHILDREN"]
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
        except _Bye:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            await self.cleanup()

    async def read_more(self, timeout: float | None) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        except asyncio.TimeoutError:
            self.send(b"* BYE Autologout; idle for too long")
            raise _Bye() from None
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

    # --- for the connection-flood defence -------------------------------------------------
    idle_since: float | None = None

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
        if isinstance(ev, Continuation):
            # Big literals (APPEND) count against the process-wide budget of message bytes
            # held in memory, shared with SMTP DATA: many clients uploading at once get a
            # "try again" instead of exhausting memory.
            if ev.size > BIG_CHUNK and not self.framer.events:
                budget = budget_for(self.services)
                if not budget.reserve(ev.size):
                    self.framer.refuse_literal()
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
                raise _Bye()
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
            cmd = parse_command(ev.parts)
        except ParseError as e:
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
        try:
            await handler(cmd)
        except MailboxNotFound as e:
            self.tagged(cmd, "NO", f"[NONEXISTENT] {e or 'Mailbox does not exist'}")
        except MailboxExists as e:
            self.tagged(cmd, "NO", f"[ALREADYEXISTS] {e or 'Mailbox exists'}")
        except StoreFull as e:  # as Dovecot answers ENOSPC; the store changed nothing
            self.tagged(cmd, "NO", f"[OVERQUOTA] {e}")
        except StoreIOError as e:
            self.tagged(cmd, "NO", f"[SERVERBUG] {e}")
        except StoreError as e:
            self.tagged(cmd, "NO", str(e) or "Refused")
        except (_Bye, ConnectionError, OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            raise
        except Exception:
            log.exception("IMAP %s failed", name, extra={"client": self.peer_ip})
            self.tagged(cmd, "NO", "[SERVERBUG] Internal error")
        finally:
            self.uid_cmd = False

    def tagged(self, cmd: Command, status: str, text: str) -> None:
        self.send(f"{cmd.tag} {status} {text}".encode("utf-8", "replace"))

    async def done(self, cmd: Command, text: str, status: str = "OK") -> None:
        """Finish a command: report mailbox changes (where allowed) and the tagged reply."""
        if self.state == SELECTED:
            await self.sync(allow_expunge=cmd.uid or cmd.name not in _NO_EXPUNGE)
        self.tagged(cmd, status, text)

    async def cleanup(self) -> None:
        self.state = LOGOUT
        self._release_reserved()
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
        self.send(b'* ID ("name" "mailstack")')
        await self.done(cmd, "ID completed")

    # ------------------------------------------------------------------ not authenticated
    async def cmd_starttls(self, cmd: Command) -> None:
        if self.tls:
            return self.tagged(cmd, "BAD", "TLS is active already")
        if self.framer.buffered or self.framer.events or len(getattr(self.reader, "_buffer", b"")):
            # Commands pipelined after STARTTLS would be injected into the TLS session.
            self.tagged(cmd, "BAD", "Pipelined data after STARTTLS")
            raise _Bye()
        # Stop reading before the OK goes out: the client's ClientHello answers the OK, and if
        # the loop read it into the plaintext buffer while the OK is flushed (flush awaits),
        # the TLS layer would never see it and the handshake would hang. start_tls resumes.
        self.writer.transport.pause_reading()
        self.tagged(cmd, "OK", "Begin TLS negotiation now")
        await self.flush()
        try:
            await self.writer.start_tls(self.services.tls.for_listener(self.listener))
        except (ssl.SSLError, OSError, ConnectionError):
            raise _Bye() from None
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
            log.info("IMAP login failed for %s", user[:64], extra={"client": self.peer_ip})
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
                raise _Bye()
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
    def _bad_name(self, cmd: Command, name: str) -> bool:
        reason = check_mailbox_name(name)
        if reason:
            self.tagged(cmd, "NO", f"[CANNOT] {reason}")
            return True
        return False

    async def cmd_select(self, cmd: Command, read_only: bool = False) -> None:
        await self.unselect()
        self.state = AUTH
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        read_only = read_only or cmd.name == "EXAMINE"
        mbox = await self.services.store.open(self.account, name, read_only=read_only)
        self.mbox = mbox
        self.state = SELECTED
        self.recent = set()
        self._claim_recent(m.uid for m in mbox.messages)
        self._unsubscribe = self.services.events.subscribe(self.account, mbox.name, self._on_event)
        msgs = mbox.messages
        self.keywords = {f for m in msgs for f in m.flags if not f.startswith("\\")}
        self._send_flags()
        self.send(b"* %d EXISTS" % len(msgs))
        self.send(b"* %d RECENT" % len(self.recent))
        for i, m in enumerate(msgs):
            if "\\Seen" not in m.flags:
                self.send(b"* OK [UNSEEN %d] First unseen" % (i + 1))
                break
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % mbox.uidvalidity)
        self.send(b"* OK [UIDNEXT %d] Predicted next UID" % mbox.uidnext)
        mode = "READ-ONLY" if mbox.read_only else "READ-WRITE"
        self.tagged(cmd, "OK", f"[{mode}] {cmd.name} completed")

    async def cmd_examine(self, cmd: Command) -> None:
        await self.cmd_select(cmd, read_only=True)

    def _send_flags(self) -> None:
        kws = sorted(self.keywords)
        self.send(response.flag_list(list(SYSTEM_FLAGS) + kws).join([b"* FLAGS ", b""]))
        perm = list(SYSTEM_FLAGS) + kws + ["\\*"] if not self.mbox.read_only else []
        self.send(b"* OK [PERMANENTFLAGS " + response.flag_list(perm) + b"] Flags permitted")

    def _claim_recent(self, uids) -> None:
        # RFC 3501 2.3.2: only the first session to see a message is told it is \Recent;
        # EXAMINE shows it as recent too but does not take it away from later sessions.
        mbox = self.mbox
        self.recent |= self.services.store.claim_recent(mbox.account, mbox.name, mbox.uidvalidity,
                                                        uids, take=not mbox.read_only)

    def _on_event(self, ev: MailboxEvent) -> None:
        if ev.origin is self:
            return
        self.dirty = True
        if self.wake is not None:
            self.wake.set()

    async def unselect(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.mbox is not None:
            mbox, self.mbox = self.mbox, None
            self.recent = set()
            self.keywords = set()
            try:
                await mbox.close()
            except Exception:  # noqa: BLE001
                log.exception("closing mailbox failed", extra={"client": self.peer_ip})
        if self.state == SELECTED:
            self.state = AUTH

    async def cmd_create(self, cmd: Command) -> None:
        name = cmd.args["mailbox"].rstrip("/") or cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        if name.upper() == "INBOX":
            return self.tagged(cmd, "NO", "[ALREADYEXISTS] INBOX exists always")
        await self.services.store.create_mailbox(self.account, name)
        await self.done(cmd, "CREATE completed")

    async def cmd_delete(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        if name == "INBOX":
            return self.tagged(cmd, "NO", "[CANNOT] INBOX cannot be deleted")
        if self.mbox is not None and self.mbox.name == name:
            await self.unselect()
        await self.services.store.delete_mailbox(self.account, name)
        await self.done(cmd, "DELETE completed")

    async def cmd_rename(self, cmd: Command) -> None:
        old, new = cmd.args["old"], cmd.args["new"]
        if self._bad_name(cmd, old) or self._bad_name(cmd, new):
            return
        if new.upper() == "INBOX":
            return self.tagged(cmd, "NO", "[ALREADYEXISTS] INBOX exists always")
        await self.services.store.rename_mailbox(self.account, old, new)
        await self.done(cmd, "RENAME completed")

    async def cmd_subscribe(self, cmd: Command, subscribed: bool = True) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        await self.services.store.subscribe(self.account, name, subscribed)
        await self.done(cmd, f"{cmd.name} completed")

    async def cmd_unsubscribe(self, cmd: Command) -> None:
        await self.cmd_subscribe(cmd, subscribed=False)

    async def cmd_list(self, cmd: Command, lsub: bool = False) -> None:
        ref, pattern = cmd.args["reference"], cmd.args["pattern"]
        word = b"* LSUB" if lsub else b"* LIST"
        if ref is None or pattern is None:  # not valid modified UTF-7: no mailbox has that name
            return await self.done(cmd, f"{cmd.name} completed")
        if pattern == "":
            self.send(word + b' (\\Noselect) "/" ""')
            return await self.done(cmd, f"{cmd.name} completed")
        full = ref + pattern if not ref.endswith("/") or not pattern.startswith("/") else ref + pattern[1:]
        rx = list_pattern(full)
        boxes = await self.services.store.list_mailboxes(self.account)
        names = {b.name: b for b in boxes}
        lines: dict[str, list[str]] = {}
        for b in boxes:
            if lsub and not b.subscribed:
                continue
            if rx.match(b.name):
                attrs = []
                if not b.selectable:
                    attrs.append("\\Noselect")
                if not lsub:
                    has_children = b.has_children or any(n.startswith(b.name + "/") for n in names)
                    attrs.append("\\HasChildren" if has_children else "\\HasNoChildren")
                    if b.special_use:
                        attrs.append(b.special_use)
                lines[b.name] = attrs
            # a parent that does not exist (or, for LSUB, is not subscribed) but matches "%".
            # RFC 3501 6.3.9: only where "%" stopped at the parent; LSUB "" "x*" lists the
            # subscribed "x/y" itself, not its unsubscribed parent "x".
            parts = b.name.split("/")
            if lsub and (not b.subscribed or rx.match(b.name)):
                parts = []
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in lines or not rx.match(parent):
                    continue
                if parent in names and (not lsub or names[parent].subscribed):
                    continue
                lines[parent] = ["\\Noselect"] + ([] if lsub else ["\\HasChildren"])
        order = sorted(lines, key=lambda n: (n != "INBOX", n))
        for n in order:
            self.send(word + b" (" + " ".join(lines[n]).encode() + b') "/" ' + response.mailbox(n))
        await self.done(cmd, f"{cmd.name} completed")

    async def cmd_lsub(self, cmd: Command) -> None:
        await self.cmd_list(cmd, lsub=True)

    async def cmd_status(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        st = await self.services.store.status(self.account, name)
        items = []
        for item in cmd.args["items"]:
            items.append(f"{item} {int(st.get(item, 0))}")
        self.send(b"* STATUS " + response.mailbox(name) + b" (" + " ".join(items).encode() + b")")
        await self.done(cmd, "STATUS completed")

    async def cmd_append(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        message = cmd.args["message"]
        if not message:
            return self.tagged(cmd, "NO", "Cannot append an empty message")
        try:
            uidvalidity, uid = await self.services.store.append(
                self.account, name, message, cmd.args["flags"], cmd.args["date"], origin=self)
        except MailboxNotFound:
            return self.tagged(cmd, "NO", "[TRYCREATE] Mailbox does not exist")
        if self.mbox is not None and self.mbox.name == name:
            self.dirty = True
        await self.done(cmd, f"[APPENDUID {uidvalidity} {uid}] APPEND completed")

    async def cmd_namespace(self, cmd: Command) -> None:
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        await self.done(cmd, "NAMESPACE completed")

    async def cmd_enable(self, cmd: Command) -> None:
        # No ENABLE-able extension is offered (CONDSTORE, UTF8=ACCEPT ...), so none is enabled.
        self.send(b"* ENABLED")
        await self.done(cmd, "ENABLE completed")

    async def cmd_idle(self, cmd: Command) -> None:
        # The wake-up exists before "+ idling" goes out: a delivery the client triggers as
        # soon as it sees "+" must not fall between the two.
        self.wake = asyncio.Event()
        self.send(b"+ idling")
        if self.state == SELECTED:
            await self.sync(allow_expunge=True)
        await self.flush()
        deadline = time.monotonic() + self.cfg.idle_timeout
        read_task = None
        try:
            while True:
                if self.framer.events:
                    break
                if self.wake.is_set() and self.state == SELECTED:
                    self.wake.clear()
                    await self.sync(allow_expunge=True)
                    await self.flush()
                    continue
                if read_task is None:
                    read_task = asyncio.ensure_future(self.reader.read(READ_SIZE))
                wake_task = asyncio.ensure_future(self.wake.wait())
                timeout = min(self.cfg.idle_refresh, deadline - time.monotonic())
                if timeout <= 0:
                    wake_task.cancel()
                    self.send(b"* BYE Autologout; idle for too long")
                    raise _Bye()
                finished, _ = await asyncio.wait({read_task, wake_task}, timeout=timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                wake_task.cancel()
                if read_task in finished:
                    data = read_task.result()
                    read_task = None
                    if not data:
                        raise _Bye()
                    self.framer.feed(data)
                    continue
                self.wake.clear()
                if self.state == SELECTED:
                    await self.sync(allow_expunge=True)
                    await self.flush()
        finally:
            self.wake = None
            if read_task is not None and not read_task.done():
                read_task.cancel()
            elif read_task is not None and not read_task.cancelled():
                read_task.exception()  # a reset seen while flushing: retrieved, not logged as a crash
        ev = self.framer.events.pop(0)
        if isinstance(ev, Frame) and len(ev.parts) == 1 and ev.parts[0].strip().upper() == b"DONE":
            await self.done(cmd, "IDLE terminated")
        else:
            self.tagged(cmd, "BAD", "Expected DONE")
            await self.handle(ev)  # a client that forgot DONE still gets its command answered

    # ------------------------------------------------------------------ selected: sync
    async def sync(self, allow_expunge: bool) -> None:
        """Tell the client what changed in the selected mailbox since it last heard."""
        mbox = self.mbox
        if mbox is None or not allow_expunge:
            return
        before = len(mbox.messages)
        try:
            changes = await mbox.refresh()
        except MailboxNotFound:
            self.send(b"* BYE [NONEXISTENT] The selected mailbox was deleted")
            raise _Bye() from None
        except StoreError as e:  # e.g. UIDVALIDITY changed: the client must start over
            self.send(b"* BYE " + str(e).encode("utf-8", "replace"))
            raise _Bye() from None
        self.dirty = False
        msgs = mbox.messages
        if changes.expunged:
            gone = sorted(changes.expunged)
            seqs = []
            for i, uid in enumerate(gone):
                seqs.append(bisect.bisect_left(msgs, uid, key=lambda m: m.uid) + i + 1)
            for s in reversed(seqs):
                self.send(b"* %d EXPUNGE" % s)
            self.recent.difference_update(gone)
        if changes.flags:
            new_uids = {m.uid for m in changes.new}
            for info in changes.flags:
                if info.uid in new_uids:
                    continue
                seq = self.seq_of(info.uid)
                if seq:
                    self._note_keywords(info.flags)
                    self.send(b"* %d FETCH (" % seq + self._uid_item(info.uid) + b"FLAGS " +
                              response.flag_list(self.flags_of(info)) + b")")
        if changes.new or len(msgs) != before - len(changes.expunged):
            self._claim_recent(m.uid for m in changes.new)
            for m in changes.new:
                self._note_keywords(m.flags)
            self.send(b"* %d EXISTS" % len(msgs))
            self.send(b"* %d RECENT" % len(self.recent))

    def _note_keywords(self, flags) -> None:
        new = {f for f in flags if not f.startswith("\\")} - self.keywords
        if new:
            self.keywords |= new
            self._send_flags()

    def _uid_item(self, uid: int) -> bytes:
        return b"UID %d " % uid if self.uid_cmd else b""

    def seq_of(self, uid: int) -> int:
        msgs = self.mbox.messages
        i = bisect.bisect_left(msgs, uid, key=lambda m: m.uid)
        return i + 1 if i < len(msgs) and msgs[i].uid == uid else 0

    def flags_of(self, info) -> list[str]:
        flags = sorted(info.flags)
        if info.uid in self.recent:
            flags.append("\\Recent")
        return flags

    def resolve(self, cmd: Command) -> list[tuple[int, object]] | None:
        """(seq, MessageInfo) for the command's set, in ascending order; None if invalid."""
        msgs = self.mbox.messages
        seqset = cmd.args["set"]
        if cmd.uid:
            if not msgs:
                return []
            top = msgs[-1].uid
            out = []
            for lo, hi in seqset.resolve(top):  # sorted and disjoint
                i = bisect.bisect_left(msgs, lo, key=lambda m: m.uid)
                while i < len(msgs) and msgs[i].uid <= hi:
                    out.append((i + 1, msgs[i]))
                    i += 1
            return out
        n = len(msgs)
        out = []
        for lo, hi in seqset.resolve(n):  # sorted and disjoint
            if lo < 1 or hi > n:
                return None
            out.extend((i + 1, msgs[i]) for i in range(lo - 1, hi))
        return out

    # ------------------------------------------------------------------ selected commands
    async def cmd_check(self, cmd: Command) -> None:
        await self.done(cmd, "CHECK completed")

    async def cmd_close(self, cmd: Command) -> None:
        if not self.mbox.read_only:
            await self.mbox.expunge(origin=self)
        await self.unselect()
        self.tagged(cmd, "OK", "CLOSE completed")

    async def cmd_unselect(self, cmd: Command) -> None:
        await self.unselect()
        self.tagged(cmd, "OK", "UNSELECT completed")

    async def cmd_expunge(self, cmd: Command) -> None:
        if self.mbox.read_only:
            return self.tagged(cmd, "NO", "[READ-ONLY] Mailbox is read-only")
        uids = None
        if cmd.uid:
            uids = [m.uid for _, m in self.resolve(cmd)]
        await self._expunge(uids)
        await self.done(cmd, "EXPUNGE completed")

    async def _expunge(self, uids) -> list[int]:
        """Expunge (\\Deleted messages, limited to `uids`) and announce it."""
        mbox = self.mbox
        # Every message of the view, not only those this session knows as \Deleted: another
        # session may have set \Deleted since we last told the client, and the store
        # expunges by what is on disk.  Each message that leaves the view is announced.
        seq_before = {m.uid: i + 1 for i, m in enumerate(mbox.messages)}
        gone = await mbox.expunge(uids, origin=self)
        seqs = sorted((seq_before[u] for u in gone if u in seq_before), reverse=True)
        for s in seqs:
            self.send(b"* %d EXPUNGE" % s)
        self.recent.difference_update(gone)
        return gone

    async def cmd_store(self, cmd: Command) -> None:
        if self.mbox.read_only:
            return self.tagged(cmd, "NO", "[READ-ONLY] Mailbox is read-only")
        picked = self.resolve(cmd)
        if picked is None:
            return self.tagged(cmd, "BAD", "Invalid message sequence number")
        flags = cmd.args["flags"]
        if picked:
            await self.mbox.store_flags([m.uid for _, m in picked], flags, cmd.args["mode"], origin=self)
        self._note_keywords(flags)
        if not cmd.args["silent"]:
            msgs = self.mbox.messages
            for seq, info in picked:
                cur = msgs[seq - 1] if seq <= len(msgs) and msgs[seq - 1].uid == info.uid else info
                # the file may carry keywords another session set: FLAGS announces them first
                self._note_keywords(cur.flags)
                self.send(b"* %d FETCH (" % seq + self._uid_item(cur.uid) + b"FLAGS " +
                          response.flag_list(self.flags_of(cur)) + b")")
        await self.done(cmd, "STORE completed")

    async def cmd_copy(self, cmd: Command, move: bool = False) -> None:
        dest = cmd.args["mailbox"]
        if self._bad_name(cmd, dest):
            return
        picked = self.resolve(cmd)
        if picked is None:
            return self.tagged(cmd, "BAD", "Invalid message sequence number")
        if move and self.mbox.read_only:
            return self.tagged(cmd, "NO", "[READ-ONLY] Mailbox is read-only")
        uids = [m.uid for _, m in picked]
        if not uids:
            return await self.done(cmd, f"{cmd.name} completed")
        store = self.services.store
        try:
            st = await store.status(self.account, dest)
        except MailboxNotFound:
            return self.tagged(cmd, "NO", "[TRYCREATE] Mailbox does not exist")
        if move and hasattr(self.mbox, "move"):
            seq_before = {m.uid: s for s, m in picked}
            pairs = await self.mbox.move(uids, dest, origin=self)
            filters_learn.moved(self.services, self.account, self.mbox.name, dest, pairs)  # Junk moves teach
            code = self._copyuid(st, pairs)
            if code:
                self.send(b"* OK " + code + b" Moved")
            gone = [s for s, _ in pairs]
            for s in sorted((seq_before[u] for u in gone if u in seq_before), reverse=True):
                self.send(b"* %d EXPUNGE" % s)
            self.recent.difference_update(gone)
            return await self.done(cmd, "MOVE completed")
        pairs = await self.mbox.copy(uids, dest, origin=self)
        filters_learn.moved(self.services, self.account, self.mbox.name, dest, pairs)  # Junk moves teach
        code = self._copyuid(st, pairs)
        if move:
            if code:
                self.send(b"* OK " + code + b" Moved")
            await self.mbox.store_flags(uids, ["\\Deleted"], "+", origin=self)
            await self._expunge(uids)
            return await self.done(cmd, "MOVE completed")
        await self.done(cmd, (code.decode() + " " if code else "") + "COPY completed")

    def _copyuid(self, st: dict, pairs) -> bytes:
        if not pairs:
            return b""
        pairs = sorted(pairs)
        return b"[COPYUID %d " % int(st["UIDVALIDITY"]) + response.ordered_set(p[0] for p in pairs) + \
            b" " + response.ordered_set(p[1] for p in pairs) + b"]"

    async def cmd_move(self, cmd: Command) -> None:
        await self.cmd_copy(cmd, move=True)

    # ------------------------------------------------------------------ SEARCH
    def _render_streamed(self, m, a, entries) -> "bytes | _Stream | None":
        """One FETCH item of a message that is streamed (only whole-message literals)."""
        name = a.name
        if name == "UID":
            return b"UID %d" % m.uid
        if name == "FLAGS":
            return b"FLAGS " + response.flag_list(self.flags_of(m))
        if name == "INTERNALDATE":
            return b"INTERNALDATE " + response.internaldate(m.internaldate)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % m.size
        if name == "RFC822":
            return _Stream(b"RFC822", m.uid, m.size)
        if name == "BODY[]":
            return _Stream(b"BODY[]", m.uid, m.size)
        if name in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
            value = fetch.cached(entries.get(m.uid), {"ENVELOPE": "env", "BODYSTRUCTURE": "bs", "BODY": "body"}[name])
            return None if value is None else name.encode() + b" " + value
        return None

    async def cmd_search(self, cmd: Command) -> None:
        key = cmd.args["key"]
        msgs = list(self.mbox.messages)
        n = len(msgs)
        max_uid = msgs[-1].uid if msgs else 0
        wanted = [k for k in dict.fromkeys(search.fulltext_keys(key)) if fts.usable(k[1])]
        if wanted and msgs:  # BODY / TEXT from the full-text index when the store has one
            sets = await self.mbox.fulltext_search([(needle, op == "BODY") for op, needle in wanted])
            if sets is not None:
                key = search.substitute(key, {k: frozenset(s) for k, s in zip(wanted, sets)})
        need = search.needs(key)
        found: list[int] = []
        for start in range(0, n, FETCH_BATCH):
            batch = msgs[start:start + FETCH_BATCH]
            cands = [search.Candidate(start + i + 1, m.uid, m.flags, m.size, m.internaldate,
                                      m.uid in self.recent, n, max_uid) for i, m in enumerate(batch)]
            if need in ("sent", "index"):  # answered from the metadata index
                entries = await self._cache_entries([(c.seq, m) for c, m in zip(cands, batch)],
                                                    search_fields=need == "index")
                for c, m in zip(cands, batch):
                    e = entries.get(m.uid)
                    c.sent = e.get("sent") if e else None
                    c.hs = e.get("hs") if e else None
                    if need == "index" and c.hs is None:
                        c.hs = {}  # vanished meanwhile and never indexed: matches no header
            elif need in ("header", "full"):
                datas = await self._read_many(batch, header_only=need == "header")
                for c, m in zip(cands, batch):
                    c.data = datas.get(m.uid)
                    if c.data is None:
                        c.data = b""
                # matching bodies costs CPU: off the loop
                found += await asyncio.to_thread(
                    lambda cs=cands: [c.uid if cmd.uid else c.seq for c in cs if search.matches(key, c)])
                continue
            found += [c.uid if cmd.uid else c.seq for c in cands if search.matches(key, c)]
        line = bytearray(b"* SEARCH")
        for x in found:
            line += b" %d" % x
        self.send(bytes(line))
        await self.done(cmd, "SEARCH completed")

    # ------------------------------------------------------------------ FETCH
    async def _read_many(self, infos, header_only: bool = False) -> dict[int, bytes]:
        """Message bytes for several messages, read in one worker thread when the store
        gives file paths; messages that vanished meanwhile are left out."""
        mbox = self.mbox
        paths = {m.uid: mbox.path(m.uid) for m in infos}

        def work() -> dict[int, bytes | None]:
            out: dict[int, bytes | None] = {}
            for uid, path in paths.items():
                if path is None:
                    out[uid] = None
                    continue
                try:
                    with open(path, "rb") as f:
                        if header_only:
                            data = f.read(HEADER_PEEK)
                            if len(data) == HEADER_PEEK and fetch._BLANK.search(data) is None:
                                data += f.read()
                        else:
                            data = f.read()
                    out[uid] = data
                except OSError:
                    out[uid] = None
            return out

        got = await asyncio.to_thread(work)
        for uid, data in list(got.items()):
            if data is None:
                try:
                    got[uid] = await mbox.read(uid)
                except (StoreError, OSError, KeyError):
                    del got[uid]
        return got  # type: ignore[return-value]

    async def _compute_entries(self, infos, structure: bool) -> dict[int, dict]:
        """Read and parse messages in one worker-thread call (the cold-cache path). Without
        `structure` only the header is read and parsed (enough for ENVELOPE and SENT*)."""
        mbox = self.mbox
        paths = {m.uid: mbox.path(m.uid) for m in infos}

        def entry(data: bytes) -> dict:
            # the searchable header texts come along (cheap once the envelope parsed the
            # addresses): a header SEARCH after a first listing reads no file again
            return fetch.cache_entry(data) if structure else fetch.header_entry(data)

        def work() -> tuple[dict[int, dict], list[int]]:
            out: dict[int, dict] = {}
            retry: list[int] = []
            for uid, path in paths.items():
                try:
                    if path is None:
                        raise FileNotFoundError
                    with open(path, "rb") as f:
                        if structure:
                            data = f.read()
                        else:
                            data = f.read(HEADER_PEEK)
                            if len(data) == HEADER_PEEK and fetch._BLANK.search(data) is None:
                                data += f.read()
                except OSError:
                    retry.append(uid)
                    continue
                out[uid] = entry(data)
            return out, retry

        out, retry = await asyncio.to_thread(work)
        for uid in retry:  # renamed meanwhile, or a backend without files
            try:
                data = await mbox.read(uid)
            except (StoreError, OSError, KeyError):
                continue
            out[uid] = await asyncio.to_thread(entry, data)
        return out

    async def _cache_entries(self, picked, structure: bool = False, search_fields: bool = False) -> dict[int, dict]:
        """Metadata cache entries for these messages; missing ones are computed (one thread
        call for the batch) and written back with one cache_put. An entry made from the header
        alone lacks the body structure: it is completed when `structure` is asked for."""
        mbox = self.mbox
        entries: dict[int, dict] = {}
        missing = []
        old: dict[int, dict] = {}
        for _, m in picked:
            e = await mbox.cache_get(m.uid)
            if e and e.get("v") == fetch.CACHE_VERSION and (not structure or "bs" in e) and \
                    (not search_fields or "hs" in e):
                entries[m.uid] = e
            else:
                missing.append(m)
                if e:
                    old[m.uid] = e  # keep what other modules (POP3 sizes) put there
        if missing:
            fresh = await self._compute_entries(missing, structure)
            fresh = {uid: {**old.get(uid, {}), **e} for uid, e in fresh.items()}
            entries.update(fresh)
            if fresh:
                try:
                    await mbox.cache_put(fresh)
                except (StoreError, OSError):
                    log.warning("cache_put failed", exc_info=True, extra={"client": self.peer_ip})
        return entries

    async def cmd_fetch(self, cmd: Command) -> None:
        picked = self.resolve(cmd)
        if picked is None:
            return self.tagged(cmd, "BAD", "Invalid message sequence number")
        atts: list[FetchAtt] = list(cmd.args["atts"])
        if cmd.uid and not any(a.name == "UID" for a in atts):
            atts.insert(0, FetchAtt("UID"))
        need_cache = any(a.name in ("ENVELOPE", "BODYSTRUCTURE", "BODY") for a in atts)
        need_structure = any(a.name in ("BODYSTRUCTURE", "BODY") for a in atts)
        need_data = None  # None, "header", "full"
        for a in atts:
            if a.name in ("RFC822", "RFC822.TEXT") or (a.name == "BODY[]" and not fetch.header_only(a.section)):
                need_data = "full"
            elif a.name in ("RFC822.HEADER", "BODY[]") and need_data is None:
                need_data = "header"
        sets_seen = not self.mbox.read_only and any(
            a.name in ("RFC822", "RFC822.TEXT") or (a.name == "BODY[]" and not a.peek) for a in atts)
        if sets_seen:
            unseen = [m.uid for _, m in picked if "\\Seen" not in m.flags]
            if unseen:
                await self.mbox.store_flags(unseen, ["\\Seen"], "+", origin=self)
                if not any(a.name == "FLAGS" for a in atts):
                    atts.append(FetchAtt("FLAGS"))
                # refresh the infos from the view so FLAGS shows \Seen
                msgs = self.mbox.messages
                picked = [(s, msgs[s - 1] if s <= len(msgs) and msgs[s - 1].uid == m.uid else m)
                          for s, m in picked]
        if any(a.name == "FLAGS" for a in atts):
            # A keyword shows in a FETCH only after an untagged FLAGS announced it.
            self._note_keywords({f for _, m in picked for f in m.flags})
        # Whole messages only (BODY[] / RFC822, no part, no partial): big ones are streamed.
        streamable = need_data == "full" and all(
            a.name == "RFC822" or (a.name == "BODY[]" and not a.section.part and not a.section.text
                                   and a.partial is None)
            for a in atts if a.name.startswith(("RFC822", "BODY[")) and a.name != "RFC822.SIZE")
        missing = False
        for start in range(0, len(picked), FETCH_BATCH):
            batch = picked[start:start + FETCH_BATCH]
            entries = await self._cache_entries(batch, need_structure) if need_cache else {}
            if need_data:
                streams = {m.uid for _, m in batch if m.size >= STREAM_MIN} if streamable else set()
                datas = await self._read_many([m for _, m in batch if m.uid not in streams],
                                              header_only=need_data == "header")
                rendered, gone = await asyncio.to_thread(self._render_batch, batch, atts, entries, datas,
                                                         streams)
            else:
                rendered, gone = self._render_batch(batch, atts, entries, None)
            missing = missing or gone
            for item in rendered:
                if isinstance(item, bytes):
                    self.out += item
                else:  # big literals go to the transport as they are, not copied into `out`
                    for chunk in item:
                        if isinstance(chunk, _Stream):
                            await self.flush()
                            await self._stream(chunk)
                        elif len(chunk) >= BIG_CHUNK:
                            await self.flush()
                            self.writer.write(chunk)
                            await self.drain()
                        else:
                            self.out += chunk
                await self.maybe_flush()
        if missing:
            # RFC 2180 4.1.3 lets us choose.  As Dovecot: what is still known (UID, FLAGS,
            # sizes, a cached ENVELOPE) and NIL for the contents, then OK: a NO makes clients
            # count the whole FETCH as failed and retry it; with OK they go on and learn of
            # the EXPUNGE at the next command that may announce it.
            await self.done(cmd, "[EXPUNGEISSUED] Some messages were already expunged")
        else:
            await self.done(cmd, "FETCH completed")

    async def _stream(self, item: _Stream) -> None:
        """Send a message literal piece by piece.  The size was announced: a file that
        shrank or vanished meanwhile (Maildir files never change; a person could) cannot
        be answered any more, so the connection is closed rather than the literal faked."""
        offset = 0
        while offset < item.size:
            want = min(STREAM_CHUNK, item.size - offset)
            try:
                chunk = await self.mbox.read_range(item.uid, offset, want)
            except (StoreError, OSError) as e:
                chunk, why = b"", str(e)
            else:
                why = "the file is shorter than its size"
            if not chunk:
                log.error("FETCH of UID %d cut after %d of %d bytes: %s", item.uid, offset, item.size,
                          why, extra={"client": self.peer_ip})
                self.writer.transport.abort()
                raise _Bye()
            chunk = chunk[:item.size - offset]
            self.writer.write(chunk)
            offset += len(chunk)
            await self.drain()

    def _render_batch(self, batch, atts, entries, datas, streams=frozenset()) -> tuple[list, bool]:
        """The FETCH responses of a batch, and whether a message had vanished meanwhile."""
        out: list = []
        gone = False
        for seq, m in batch:
            data = None
            root = None
            if m.uid in streams:
                items = [self._render_streamed(m, a, entries) for a in atts]
                out.append(_join_fetch(seq, [x for x in items if x is not None]))
                continue
            if datas is not None:
                data = datas.get(m.uid)
            vanished = datas is not None and data is None
            gone = gone or vanished
            items: list[bytes] = []
            for a in atts:
                name = a.name
                if name == "UID":
                    items.append(b"UID %d" % m.uid)
                elif name == "FLAGS":
                    items.append(b"FLAGS " + response.flag_list(self.flags_of(m)))
                elif name == "INTERNALDATE":
                    items.append(b"INTERNALDATE " + response.internaldate(m.internaldate))
                elif name == "RFC822.SIZE":
                    items.append(b"RFC822.SIZE %d" % m.size)
                elif name in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
                    key = {"ENVELOPE": "env", "BODYSTRUCTURE": "bs", "BODY": "body"}[name]
                    value = fetch.cached(entries.get(m.uid), key)
                    if value is None:  # expunged meanwhile, and never parsed
                        gone = True
                        continue
                    items.append(name.encode() + b" " + value)
                elif vanished and name.startswith(("RFC822", "BODY[")):
                    label = name.encode() if name != "BODY[]" else b"BODY[" + a.section.spec() + b"]"
                    if a.partial is not None:
                        label += b"<%d>" % a.partial[0]
                    items.append(label + b" NIL")
                elif name == "RFC822":
                    items.append(_Lit(b"RFC822", data))
                elif name == "RFC822.HEADER":
                    hend, bstart = fetch.split_header(data)
                    items.append(_Lit(b"RFC822.HEADER", data[:bstart]))
                elif name == "RFC822.TEXT":
                    hend, bstart = fetch.split_header(data)
                    items.append(_Lit(b"RFC822.TEXT", data[bstart:]))
                elif name == "BODY[]":
                    sec = a.section
                    if not sec.part and not sec.text:
                        body = data
                    else:
                        if root is None:
                            root = fetch.parse(data)
                        body = fetch.section_bytes(data, root, sec)
                    label = b"BODY[" + sec.spec() + b"]"
                    if a.partial is not None:
                        off, length = a.partial
                        body = body[off:off + length]
                        label += b"<%d>" % off
                    items.append(_Lit(label, body))
            if items:  # "* n FETCH ()" is not valid: nothing left to say of a vanished message
                out.append(_join_fetch(seq, items))
        return out, gone
