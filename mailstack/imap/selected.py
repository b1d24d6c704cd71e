"""IMAP commands on the selected mailbox: SELECT/EXAMINE, IDLE, the sync that announces
changes, STORE, COPY, MOVE, EXPUNGE (SEARCH, SORT, THREAD: searching.py).

Sequence numbers: the selected Mailbox's `messages` list is this session's view; it is
only refreshed at moments when RFC 3501 lets us announce EXPUNGE (never during a
non-UID FETCH, STORE or SEARCH), so numbers the client holds stay valid."""
from __future__ import annotations

import asyncio
import bisect
import logging
import operator
import time

from ..events import MailboxEvent
from ..filters import learn as filters_learn
from ..store.base import SYSTEM_FLAGS, MailboxNotFound, StoreError
from . import flaglisting, response, rev2
from .idlewait import Wake, read_soon, wait_read_or_wake
from .parser import Command, Frame, SearchResult
from .states import AUTH, EMPTY, READ_SIZE, SELECTED, Bye

log = logging.getLogger("mailstack.imap")

_uid_of = operator.attrgetter("uid")
_flags_of = operator.attrgetter("flags")


def _first_unseen(msgs, distinct, summary: dict | None) -> int | None:
    """Index of the first message without \\Seen.  `distinct`: the flag sets of `msgs`.
    The first of each flag set without \\Seen is found by list.index (a C loop comparing
    identity first: the store shares the sets), not by a Python step per message of a
    mailbox mostly read.  `summary`: the store's view summary of `msgs` (or None), where
    the answer is kept for the next SELECT of the same view."""
    if msgs and "\\Seen" not in msgs[0].flags:
        return 0
    unseen = [fs for fs in distinct if "\\Seen" not in fs]
    if not unseen:
        return None
    if summary is not None and "first_unseen" in summary:
        return summary["first_unseen"]
    flag_sets = list(map(_flags_of, msgs))
    first = min(flag_sets.index(fs) for fs in unseen)  # equal sets compare equal, frozen or not
    if summary is not None:
        summary["first_unseen"] = first
    return first


class SelectedCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    async def cmd_select(self, cmd: Command, read_only: bool = False) -> None:
        qresync = cmd.args.get("qresync")  # RFC 7162 3.2.5: only once ENABLE QRESYNC was given
        if qresync is not None and not self.qresync:
            return self.tagged(cmd, "BAD", "QRESYNC is not enabled")
        if self.mbox is not None and self.enabled & rev2.CLOSED_FOR:
            self.send(b"* OK [CLOSED] Previous mailbox closed.")  # as Dovecot words it; RFC 9051 7.1, RFC 7162 3.2.11
        await self.unselect()
        self.state = AUTH
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        if cmd.args.get("condstore"):
            self.enable_condstore("SELECT")
        read_only = read_only or cmd.name == "EXAMINE"
        mbox = await self.services.store.open(self.account, name, read_only=read_only)
        self.mbox = mbox
        self.state = SELECTED
        self.recent = EMPTY
        msgs = mbox.messages
        # Only UIDs above the store's \Recent mark can be recent: the view is in UID order,
        # so the others (all of them, in a mailbox opened before) are not looked at one by one.
        mark = self.services.store.recent_mark(mbox.account, mbox.name, mbox.uidvalidity)
        self._claim_recent(m.uid for m in msgs[bisect.bisect_right(msgs, mark, key=_uid_of):])
        self._unsubscribe = self.services.events.subscribe(self.account, mbox.name, self._on_event)
        # The flag sets of the view: the store's summary of a view shared with other
        # sessions (no pass over 100,000 messages), else a C loop (the store shares the sets)
        summary = mbox.view_summary()
        distinct = summary["flag_sets"] if summary is not None else flaglisting.distinct_of(msgs)
        # a frozenset, the shared EMPTY when there are none (most mailboxes); `|=` rebinds
        self.keywords = frozenset(f for fs in distinct for f in fs if not f.startswith("\\")) or EMPTY
        self._send_flags()
        self.send(b"* %d EXISTS" % len(msgs))
        if self.imap4rev2:  # RFC 9051: a LIST of the mailbox; no RECENT, no UNSEEN code
            self.send(b'* LIST () "/" ' + response.mailbox(mbox.name, True))
        else:
            self.send(b"* %d RECENT" % len(self.recent))
        if not self.imap4rev2:  # rev2 dropped [UNSEEN n]
            first = _first_unseen(msgs, distinct, summary)
            if first is not None:
                self.send(b"* OK [UNSEEN %d] First unseen" % (first + 1))
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % mbox.uidvalidity)
        self.send(b"* OK [UIDNEXT %d] Predicted next UID" % mbox.uidnext)
        if mbox.highestmodseq is not None:  # RFC 7162 3.1.1
            self.send(b"* OK [HIGHESTMODSEQ %d] Highest" % mbox.highestmodseq)
        else:
            self.send(b"* OK [NOMODSEQ] No permanent modsequences")
        if qresync is not None:
            await self.qresync_select(qresync)
        mode = "READ-ONLY" if mbox.read_only else "READ-WRITE"
        self.tagged(cmd, "OK", f"[{mode}] {cmd.name} completed")

    async def cmd_examine(self, cmd: Command) -> None:
        await self.cmd_select(cmd, read_only=True)

    def _send_flags(self) -> None:
        kws = sorted(self.keywords)
        self.send(response.flag_list(list(SYSTEM_FLAGS) + kws).join([b"* FLAGS ", b""]))
        perm = list(SYSTEM_FLAGS) + kws + ["\\*"] if not self.mbox.read_only else []
        self.send(b"* OK [PERMANENTFLAGS " + response.flag_list(perm) + b"] Flags permitted")

    @property
    def imap4rev2(self) -> bool:
        """The client ENABLEd IMAP4rev2 (rev2.py lists what that changes)."""
        return rev2.REV2 in self.enabled

    def _claim_recent(self, uids) -> None:
        # RFC 3501 2.3.2: only the first session to see a message is told it is \Recent;
        # EXAMINE shows it as recent too but does not take it away from later sessions.
        mbox = self.mbox
        claimed = self.services.store.claim_recent(mbox.account, mbox.name, mbox.uidvalidity,
                                                   uids, take=not mbox.read_only)
        if claimed:
            if not self.recent:  # the shared EMPTY: a set of this session's own from now on
                self.recent = set()
            self.recent |= claimed

    def _forget_recent(self, gone) -> None:
        if self.recent:  # never the shared EMPTY (see _claim_recent)
            self.recent.difference_update(gone)

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
        self.search_result = EMPTY  # "$" starts empty in every mailbox (RFC 5182)
        if self.mbox is not None:
            mbox, self.mbox = self.mbox, None
            self.recent = EMPTY
            self.keywords = EMPTY
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
                    await self.notify_push()  # NOTIFY (notify.py): news of other mailboxes too
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
                await self.notify_push()  # NOTIFY (notify.py), also when no mailbox is selected
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
            self.send_expunged(seqs, gone)  # EXPUNGE, or VANISHED under QRESYNC (condstore.py)
            self._forget_recent(gone)
        if changes.flags:
            new_uids = {m.uid for m in changes.new}
            for info in changes.flags:
                if info.uid in new_uids:
                    continue
                seq = self.seq_of(info.uid)
                if seq:
                    self._note_keywords(info.flags)
                    self.send(b"* %d FETCH (" % seq + self._uid_item(info.uid) + b"FLAGS " +
                              response.flag_list(self.flags_of(info)) + self.modseq_item(info) + b")")
        if changes.new or len(msgs) != before - len(changes.expunged):
            self._claim_recent(m.uid for m in changes.new)
            for m in changes.new:
                self._note_keywords(m.flags)
            self.send(b"* %d EXISTS" % len(msgs))
            if not self.imap4rev2:
                self.send(b"* %d RECENT" % len(self.recent))

    def _note_keywords(self, flags) -> None:
        new = {f for f in flags if not f.startswith("\\")} - self.keywords
        if new:
            self.keywords |= new
            self._send_flags()

    def _uid_item(self, uid: int) -> bytes:
        # RFC 7162 3.2.4: under QRESYNC, FETCH responses the server volunteers carry the UID
        return b"UID %d " % uid if self.uid_cmd or self.qresync else b""

    def seq_of(self, uid: int) -> int:
        msgs = self.mbox.messages
        i = bisect.bisect_left(msgs, uid, key=lambda m: m.uid)
        return i + 1 if i < len(msgs) and msgs[i].uid == uid else 0

    def flags_of(self, info) -> list[str]:
        flags = sorted(info.flags)
        if info.uid in self.recent and not self.imap4rev2:  # IMAP4rev2 has no \\Recent
            flags.append("\\Recent")
        return flags

    def resolve(self, cmd: Command) -> list[tuple[int, object]] | None:
        """(seq, MessageInfo) for the command's set, in ascending order; None if invalid."""
        msgs = self.mbox.messages
        seqset = cmd.args["set"]
        if isinstance(seqset, SearchResult):  # "$": UIDs, also in a non-UID command (RFC 5182)
            saved = self.search_result
            return [(i + 1, m) for i, m in enumerate(msgs) if m.uid in saved]
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
            if lo == hi:  # a picked message ("1,101,201,..."): no slice, range and zip for one pair
                out.append((lo, msgs[lo - 1]))
            else:
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
        if self.condstore:  # the tagged OK tells the HIGHESTMODSEQ after it (RFC 7162; Dovecot too)
            await self.sync(allow_expunge=True)
        await self.done(cmd, self.highestmodseq_code() + "EXPUNGE completed")

    async def _expunge(self, uids) -> list[int]:
        """Expunge (\\Deleted messages, limited to `uids`) and announce it."""
        mbox = self.mbox
        # Every message of the view, not only those this session knows as \Deleted: another
        # session may have set \Deleted since we last told the client, and the store
        # expunges by what is on disk.  Each message that leaves the view is announced.
        seq_before = {m.uid: i + 1 for i, m in enumerate(mbox.messages)}
        gone = await mbox.expunge(uids, origin=self)
        seqs = sorted((seq_before[u] for u in gone if u in seq_before), reverse=True)
        self.send_expunged(seqs, [u for u in gone if u in seq_before])
        self._forget_recent(gone)
        return gone

    async def cmd_store(self, cmd: Command) -> None:
        if self.mbox.read_only:
            return self.tagged(cmd, "NO", "[READ-ONLY] Mailbox is read-only")
        picked = self.resolve(cmd)
        if picked is None:
            return self.tagged(cmd, "BAD", "Invalid message sequence number")
        flags = cmd.args["flags"]
        unchanged_since = cmd.args.get("unchanged_since")  # RFC 7162 3.1.3
        cond = {} if unchanged_since is None else {"unchanged_since": unchanged_since}
        if cond:
            self.enable_condstore("STORE UNCHANGEDSINCE")
        modseq_before = {m.uid: m.modseq for _, m in picked}
        failed: list[int] = []
        if picked:
            stored = await self.mbox.store_flags([m.uid for _, m in picked], flags, cmd.args["mode"], origin=self,
                                                 **cond)
            failed = getattr(stored, "failed", [])
        self._note_keywords(flags)
        msgs = self.mbox.messages
        skip = set(failed)
        for seq, info in picked:
            cur = msgs[seq - 1] if seq <= len(msgs) and msgs[seq - 1].uid == info.uid else info
            if cur.uid in skip:
                continue
            if cmd.args["silent"]:  # with CONDSTORE a changed message's new MODSEQ is told all the same
                if self.condstore and cur.modseq != modseq_before.get(cur.uid):
                    self.send(b"* %d FETCH (" % seq + self._uid_item(cur.uid) + self.modseq_item(cur)[1:] + b")")
                continue
            # the file may carry keywords another session set: FLAGS announces them first
            self._note_keywords(cur.flags)
            self.send(b"* %d FETCH (" % seq + self._uid_item(cur.uid) + b"FLAGS " +
                      response.flag_list(self.flags_of(cur)) + self.modseq_item(cur) + b")")
        code = self.modified_code(cmd, failed, {m.uid: s for s, m in picked})
        await self.done(cmd, code + ("Conditional STORE failed" if code else "STORE completed"))

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
            self.send_expunged([seq_before[u] for u in gone if u in seq_before], [u for u in gone if u in seq_before])
            self._forget_recent(gone)
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
