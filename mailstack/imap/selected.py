"""IMAP commands on the selected mailbox: SELECT/EXAMINE, IDLE, the sync that announces
changes, STORE, COPY, MOVE, EXPUNGE, SEARCH.

Sequence numbers: the selected Mailbox's `messages` list is this session's view; it is
only refreshed at moments when RFC 3501 lets us announce EXPUNGE (never during a
non-UID FETCH, STORE or SEARCH), so numbers the client holds stay valid."""
from __future__ import annotations

import asyncio
import bisect
import logging
import time

from ..events import MailboxEvent
from ..filters import learn as filters_learn
from ..store import fts
from ..store.base import SYSTEM_FLAGS, MailboxNotFound, StoreError
from . import response, search
from .idlewait import Wake, read_soon, wait_read_or_wake
from .parser import Command, Frame
from .states import AUTH, FETCH_BATCH, READ_SIZE, SELECTED, Bye

log = logging.getLogger("mailstack.imap")

class SelectedCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

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
        # a frozenset: the empty one is shared (most mailboxes have no keywords); `|=` rebinds
        self.keywords = frozenset(f for fs in {frozenset(m.flags) for m in msgs} for f in fs if not f.startswith("\\"))
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
            self.keywords = frozenset()
            try:
                await mbox.close()
            except Exception:  # noqa: BLE001
                log.exception("closing mailbox failed", extra={"client": self.peer_ip})
        if self.state == SELECTED:
            self.state = AUTH

    async def cmd_idle(self, cmd: Command) -> None:
        # The wake-up exists before "+ idling" goes out: a delivery the client triggers as
        # soon as it sees "+" must not fall between the two.
        self.wake = Wake()
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
                    read_task = read_soon(self.reader, READ_SIZE)  # no task (idlewait.py)
                timeout = min(self.cfg.idle_refresh, deadline - time.monotonic())
                if timeout <= 0:
                    self.send(b"* BYE Autologout; idle for too long")
                    raise Bye()
                if await wait_read_or_wake(read_task, self.wake, timeout):  # idlewait.py: small per session
                    data = read_task.result()
                    read_task = None
                    if not data:
                        raise Bye()
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
            raise Bye() from None
        except StoreError as e:  # e.g. UIDVALIDITY changed: the client must start over
            self.send(b"* BYE " + str(e).encode("utf-8", "replace"))
            raise Bye() from None
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
            out.extend(zip(range(lo, hi + 1), msgs[lo - 1:hi]))  # C speed: 100,000 pairs for 1:*
        return out

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
