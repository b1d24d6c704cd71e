"""IMAP APPEND and its extensions (authenticated state), mixed into IMAPSession:

* MULTIAPPEND (RFC 3502): several messages in one command, all stored or none
  (Store.append_many), answered with [APPENDUID uidvalidity uid-set] (RFC 4315).
* CATENATE (RFC 4469): a message made of literal TEXT and URL parts naming messages or
  parts of messages of this user on this server (imapurl.py); NO [BADURL url] for any
  other URL, NO [TOOBIG] when the result would pass the size limit.
* BINARY (RFC 3516 4.4): data sent as literal8 (~{n}) may hold NUL; parts that do are
  stored base64-encoded (binary.make_storable), so BODY[] never carries a NUL.
* APPENDLIMIT (RFC 7889): the largest message accepted, the SMTP max_message_size that
  the framer already enforces per APPEND literal; the same for every mailbox.

Bounds: at most MAX_APPEND_MESSAGES messages per command; one APPEND command's literals
together at most `max_append_bytes` (the framer refuses more); synchronising literals over
64 KiB, and the bytes CATENATE copies from stored messages, are counted against the
process-wide budget of message bytes in memory shared with SMTP DATA (smtp/budget.py).
"""
from __future__ import annotations

import asyncio
import bisect
import logging

from ..smtp.budget import budget_for
from ..store.base import MailboxNotFound, StoreError
from . import binary, fetch, imapurl
from .mailboxes import check_mailbox_name
from .parse_append import AppendMessage
from .parser import Command

log = logging.getLogger("mailstack.imap")

MAX_APPEND_MESSAGES = 1000  # messages in one MULTIAPPEND command
THREAD_AT = 256 * 1024  # messages at least this big are parsed/converted in a worker thread


def max_append_bytes(cfg) -> int:
    """All literals of one APPEND command (the framer's bound): a quarter of the shared
    in-memory budget, and at least one message of the largest size."""
    return max(cfg.smtp.max_message_size, cfg.smtp.max_data_in_flight // 4)


def uid_set(uids: list[int]) -> str:
    """UIDs as an IMAP uid-set with ranges ("4:6,9")."""
    out: list[str] = []
    run_start = prev = None
    for u in sorted(uids):
        if prev is not None and u == prev + 1:
            prev = u
            continue
        if run_start is not None:
            out.append(str(run_start) if run_start == prev else f"{run_start}:{prev}")
        run_start = prev = u
    if run_start is not None:
        out.append(str(run_start) if run_start == prev else f"{run_start}:{prev}")
    return ",".join(out)


class _Refused(Exception):
    """The APPEND is answered NO with this text (nothing was stored)."""


def _url_text(url: str) -> str:
    """A URL as it may appear inside [BADURL ...] (no "]", no control characters)."""
    return "".join(ch for ch in url[:300] if " " <= ch <= "~" and ch != "]")


class AppendCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    def appendlimit(self) -> int:
        return self.services.config.smtp.max_message_size

    def note_extension(self, name: str) -> None:
        """Log once per session that the client used an extension (the real-client matrix)."""
        used = self.__dict__.setdefault("_extensions_used", set())
        if name not in used:
            used.add(name)
            log.info("IMAP %s used", name, extra={"client": self.peer_ip})

    async def cmd_append(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        messages: list[AppendMessage] = cmd.args["messages"]
        if len(messages) > MAX_APPEND_MESSAGES:
            return self.tagged(cmd, "NO", f"[LIMIT] At most {MAX_APPEND_MESSAGES} messages in one APPEND")
        if len(messages) > 1:
            self.note_extension("MULTIAPPEND")
        built = []
        try:
            for m in messages:
                built.append((await self._message_of(m), m.flags, m.date))
        except _Refused as e:
            return self.tagged(cmd, "NO", str(e))
        store = self.services.store
        try:
            if len(built) == 1:
                uidvalidity, uid = await store.append(self.account, name, *built[0], origin=self)
                uids = [uid]
            else:
                uidvalidity, uids = await store.append_many(self.account, name, built, origin=self)
        except MailboxNotFound:
            return self.tagged(cmd, "NO", "[TRYCREATE] Mailbox does not exist")
        if self.mbox is not None and self.mbox.name == name:
            self.dirty = True
        await self.done(cmd, f"[APPENDUID {uidvalidity} {uid_set(uids)}] APPEND completed")

    async def _message_of(self, m: AppendMessage) -> bytes:
        """The bytes to store for one message of the command (_Refused: why not)."""
        limit = self.appendlimit()
        if m.catenate:
            self.note_extension("CATENATE")
            pieces: list[bytes] = []
            total = 0
            for kind, value in m.parts:
                piece = value if kind == "text" else await self._url_bytes(value, limit - total)
                total += len(piece)
                if total > limit:
                    raise _Refused(f"[TOOBIG] The message would be larger than {limit} bytes")
                pieces.append(piece)
            data = b"".join(pieces)
        else:
            data = m.parts[0][1]
        if not data:
            raise _Refused("Cannot append an empty message")
        if m.binary:
            self.note_extension("BINARY")
        if b"\0" in data:
            try:
                data = await asyncio.to_thread(binary.make_storable, data) if len(data) >= THREAD_AT \
                    else binary.make_storable(data)
            except binary.NotStorable as e:
                raise _Refused(f"[UNKNOWN-CTE] Cannot store binary data: {e}") from None
            if len(data) > limit:  # base64 makes it a third bigger
                raise _Refused(f"[TOOBIG] The message would be larger than {limit} bytes once encoded")
        return data

    async def _url_bytes(self, url: str, room: int) -> bytes:
        """The bytes a CATENATE URL names, as FETCH BODY[section]<partial> gives them."""
        def bad(why: str) -> _Refused:
            return _Refused(f"[BADURL {_url_text(url)}] {why}")

        try:
            u = imapurl.parse(url, self.mbox.name if self.mbox is not None else None)
        except imapurl.URLError as e:
            raise bad(str(e)) from None
        if check_mailbox_name(u.mailbox):
            raise bad("no such mailbox")
        own = self.mbox is not None and self.mbox.name == u.mailbox
        try:
            box = self.mbox if own else await self.services.store.open(self.account, u.mailbox, read_only=True)
        except MailboxNotFound:
            raise bad("no such mailbox") from None
        try:
            if u.uidvalidity is not None and u.uidvalidity != box.uidvalidity:
                raise bad("UIDVALIDITY does not match")
            msgs = box.messages
            i = bisect.bisect_left(msgs, u.uid, key=lambda m: m.uid)
            if i == len(msgs) or msgs[i].uid != u.uid:
                raise bad("no such message")
            if u.section is None and u.partial is None and msgs[i].size > room:
                raise _Refused(f"[TOOBIG] The message would be larger than {self.appendlimit()} bytes")
            # counted in the shared budget of message bytes in memory: the whole message while
            # it is read, then what is kept of it until the command ends
            budget = budget_for(self.services)
            held = msgs[i].size
            if not budget.reserve(held):
                raise _Refused("[LIMIT] Server busy, try again later")
            self.reserved += held
            try:
                data = await box.read(u.uid)
            except (StoreError, OSError, KeyError):
                raise bad("message no longer exists") from None
        finally:
            if not own:
                await box.close()
        if u.section is not None:
            root = await asyncio.to_thread(fetch.parse, data) if len(data) >= THREAD_AT else fetch.parse(data)
            if u.section.part and fetch.find_part(root, u.section.part) is None:
                raise bad("no such body part")
            data = fetch.section_bytes(data, root, u.section)
        if u.partial is not None:
            off, length = u.partial
            data = data[off:] if length is None else data[off:off + length]
        excess = max(0, held - len(data))
        budget.release(excess)
        self.reserved -= excess
        return data
