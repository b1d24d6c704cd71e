"""CONDSTORE and QRESYNC (RFC 7162) on the session: enabling, MODSEQ in responses,
VANISHED instead of EXPUNGE, and the resynchronisation of SELECT ... (QRESYNC ...) and
UID FETCH ... (CHANGEDSINCE n VANISHED).

The store keeps the modseqs (store/modseq.py); a session reports those of its own view
(`Mailbox.messages`, `Mailbox.highestmodseq`), which is what keeps every HIGHESTMODSEQ it
gives consistent with the changes it has reported: a client that stores it misses nothing.
Expunges older than the store remembers are answered as RFC 7162 3.2.5.2 allows: every UID
of the asked range that does not exist any more (a client ignores UIDs it never knew).
"""
from __future__ import annotations

import bisect
import logging

from . import response
from .parser import Command

log = logging.getLogger("mailstack.imap")


def _ranges_set(ranges: list[tuple[int, int]]) -> bytes:
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges).encode("ascii")


class CondstoreCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    @property
    def condstore(self) -> bool:
        return "CONDSTORE" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    def enable_condstore(self, how: str) -> None:
        """Switch CONDSTORE on (RFC 7162 3.1: ENABLE, or implicitly by a command that uses
        it).  With a mailbox selected the client learns its HIGHESTMODSEQ at once."""
        if self.condstore:
            return
        self.enabled = self.enabled | {"CONDSTORE"}  # a frozenset: rebound (states.EMPTY)
        log.info("IMAP enable CONDSTORE (%s)", how, extra={"client": self.peer_ip})
        if self.mbox is not None and self.mbox.highestmodseq is not None:
            self.send(b"* OK [HIGHESTMODSEQ %d] Highest" % self.mbox.highestmodseq)

    def modseq_item(self, m) -> bytes:
        return b" MODSEQ (%d)" % m.modseq if self.condstore else b""

    def highestmodseq_code(self) -> str:
        """"[HIGHESTMODSEQ n] " for a tagged OK once CONDSTORE is on."""
        hm = self.mbox.highestmodseq if self.mbox is not None else None
        return f"[HIGHESTMODSEQ {hm}] " if self.condstore and hm is not None else ""

    def send_expunged(self, seqs: list[int], uids) -> None:
        """Announce messages gone from the view: EXPUNGE per sequence number (highest
        first), or one VANISHED with their UIDs once QRESYNC is on (RFC 7162 3.2.10)."""
        if not seqs:
            return
        if self.qresync:
            self.send(b"* VANISHED " + response.ordered_set(sorted(uids)))
            return
        for s in sorted(seqs, reverse=True):
            self.send(b"* %d EXPUNGE" % s)

    # ------------------------------------------------------------------ VANISHED (EARLIER)

    async def vanished_earlier(self, since: int, uid_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """UIDs within `uid_ranges` expunged after modseq `since` and no longer in the view,
        as ranges.  Beyond what the store remembers: every UID there that is not in the view
        (never wrong: a client ignores UIDs it never knew)."""
        mbox = self.mbox
        view = [m.uid for m in mbox.messages]
        limit = mbox.uidnext - 1
        gone = await mbox.vanished_since(since)
        if gone is not None:
            present = set(view)
            starts = [a for a, _ in uid_ranges]
            picked = []
            for u in gone:
                i = bisect.bisect_right(starts, u) - 1
                if i >= 0 and uid_ranges[i][0] <= u <= uid_ranges[i][1] and u not in present:
                    picked.append(u)
            return self._to_ranges(picked)
        out: list[tuple[int, int]] = []
        for lo, hi in uid_ranges:
            hi = min(hi, limit)
            if lo > hi:
                continue
            i = bisect.bisect_left(view, lo)
            cur = lo
            while i < len(view) and view[i] <= hi:
                if view[i] > cur:
                    out.append((cur, view[i] - 1))
                cur = view[i] + 1
                i += 1
            if cur <= hi:
                out.append((cur, hi))
        return out

    @staticmethod
    def _to_ranges(uids: list[int]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for u in uids:
            if out and out[-1][1] + 1 == u:
                out[-1] = (out[-1][0], u)
            else:
                out.append((u, u))
        return out

    def send_vanished_earlier(self, ranges: list[tuple[int, int]]) -> None:
        if ranges:
            self.send(b"* VANISHED (EARLIER) " + _ranges_set(ranges))

    # ------------------------------------------------------------------ SELECT (QRESYNC ...)

    async def qresync_select(self, params: tuple) -> None:
        """After the SELECT responses: what changed since the client's last look (RFC 7162
        3.2.5), as UID FETCH known-uids (FLAGS) (CHANGEDSINCE modseq VANISHED) would."""
        uidvalidity, since, known, match = params
        mbox = self.mbox
        if uidvalidity != mbox.uidvalidity or mbox.highestmodseq is None:
            return  # the client must resync from scratch; a plain SELECT tells it so
        msgs = mbox.messages
        top = max(mbox.uidnext - 1, 1)
        ranges = known.resolve(top) if known is not None else [(1, top)]
        asked = ranges
        if match is not None:  # 3.2.5.2: UIDs at or below the last pair still matching were not expunged
            floor = self._seq_match_floor(match)
            asked = [(max(a, floor + 1), b) for a, b in ranges if b > floor]
        self.send_vanished_earlier(await self.vanished_earlier(since, asked))
        starts = [a for a, _ in ranges]
        for seq, m in enumerate(msgs, 1):
            if m.modseq > since:
                i = bisect.bisect_right(starts, m.uid) - 1
                if i >= 0 and ranges[i][0] <= m.uid <= ranges[i][1]:
                    self.send(b"* %d FETCH (UID %d FLAGS " % (seq, m.uid) + response.flag_list(self.flags_of(m))
                              + b" MODSEQ (%d))" % m.modseq)
            if seq % 1000 == 0:
                await self.maybe_flush()

    def _seq_match_floor(self, match) -> int:
        """The highest UID the client's (sequence numbers, UIDs) pairs show unchanged in
        position: nothing at or below it was expunged since (RFC 7162 3.2.5.2)."""
        seqs, uids = match
        msgs = self.mbox.messages
        big = 1 << 32
        s_list = [n for a, b in seqs.resolve(big) for n in range(a, min(b, a + 10000) + 1)]
        u_list = [n for a, b in uids.resolve(big) for n in range(a, min(b, a + 10000) + 1)]
        floor = 0
        for s, u in zip(s_list, u_list):
            if s <= len(msgs) and msgs[s - 1].uid == u:
                floor = u
            else:
                break
        return floor

    # ------------------------------------------------------------------ FETCH

    async def condstore_fetch(self, cmd: Command, picked: list, atts: list) -> list | None:
        """FETCH's CONDSTORE part before anything is sent: implicit enabling, CHANGEDSINCE
        (only messages changed since, with their MODSEQ) and UID FETCH's VANISHED (RFC 7162
        3.1.4, 3.2.6).  None when the command was refused (answered here)."""
        from .parser import FetchAtt
        since = cmd.args.get("changedsince")
        if cmd.args.get("vanished") and (not cmd.uid or not self.qresync):
            self.tagged(cmd, "BAD", "VANISHED needs UID FETCH and QRESYNC enabled")
            return None
        if since is None and not any(a.name == "MODSEQ" for a in atts):
            return picked
        self.enable_condstore("FETCH CHANGEDSINCE" if since is not None else "FETCH MODSEQ")
        if since is None:
            return picked
        if not any(a.name == "MODSEQ" for a in atts):
            atts.append(FetchAtt("MODSEQ"))
        if cmd.args.get("vanished"):
            mbox = self.mbox
            top = max(mbox.uidnext - 1, mbox.messages[-1].uid if mbox.messages else 0, 1)
            self.send_vanished_earlier(await self.vanished_earlier(since, cmd.args["set"].resolve(top)))
        return [(s, m) for s, m in picked if m.modseq > since]

    # ------------------------------------------------------------------ UNCHANGEDSINCE

    def modified_code(self, cmd: Command, failed: list[int], seq_of_uid: dict[int, int]) -> str:
        if not failed:
            return ""
        nums = sorted(failed) if cmd.uid else sorted(seq_of_uid[u] for u in failed if u in seq_of_uid)
        return "[MODIFIED " + response.ordered_set(nums).decode() + "] " if nums else ""
