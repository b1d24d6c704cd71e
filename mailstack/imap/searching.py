"""IMAP SEARCH, SORT and THREAD on the selected mailbox, with their extensions: ESEARCH
result options (RFC 4731), the saved result "$" (RFC 5182 SEARCHRES), ESORT and PARTIAL
(RFC 5267 / RFC 9394), WITHIN's OLDER/YOUNGER (RFC 5032), SORT and THREAD (RFC 5256,
DISPLAY sort of RFC 5957).

Matching is search.py's; sorting and threading are sort.py's and thread.py's.  Their keys
come from the metadata index (the "sort" value of an entry; the SUBJECT key and sent date a
listing keeps, "sl"; else the first and last items of the envelope it holds) and are kept
in memory for the mailbox's sessions (sort.Keys in Mailbox.derived()), with the last SORT
and THREAD answers: a message never changes under its UID, so an unchanged view gets the
same answer, and a changed one (new, expunged) is sorted again from the kept keys.  So are the
header texts a header SEARCH compares (search.HeaderTexts, from the entries' "hs")."""
from __future__ import annotations

import asyncio
import logging
import time

from ..store import fts
from ..store.base import StoreError
from . import fetch, response, search, sort, thread
from .parser import Command, SearchResult
from .states import EMPTY, FETCH_BATCH

log = logging.getLogger("mailstack.imap")

THREAD_AT = 500  # threading more messages than this runs in a worker thread
SORT_AT = 50_000  # sorting by key columns: ~0.5 µs a message, on the loop up to this many


class SearchCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    # "$" (RFC 5182): the UIDs the last SEARCH/SORT ... RETURN (SAVE) kept; emptied when a
    # mailbox is selected or closed (selected.py's unselect) and by a failed SEARCH that
    # would have saved.
    search_result: frozenset = frozenset()

    def _note_extension(self, name: str) -> None:
        """Log once per session which of these extensions the client used (the real-client
        matrix of docs/ is built from these lines)."""
        used = self.__dict__.setdefault("_extensions_used", set())
        if name not in used:
            used.add(name)
            log.info("IMAP uses %s", name, extra={"client": self.peer_ip})

    # ------------------------------------------------------------------ SEARCH
    async def _matching_command(self, cmd: Command, options) -> list:
        """The messages a SEARCH or SORT command's key picks (what _matching gives)."""
        if search.uses_modseq(cmd.args["key"]):
            self.enable_condstore("SEARCH MODSEQ")  # RFC 7162 3.1: a CONDSTORE-enabling command
        try:
            return await self._matching(cmd.args["key"])
        except Exception:
            if options and "SAVE" in options:
                self.search_result = EMPTY  # RFC 5182: a failed SEARCH (SAVE) empties "$"
            raise

    async def cmd_search(self, cmd: Command) -> None:
        options = cmd.args.get("return")
        picked = await self._matching_command(cmd, options)
        if options is None and self.imap4rev2:  # IMAP4rev2 (RFC 9051 6.4.4): ESEARCH as RETURN (ALL)
            options = ["ALL"]
        if options is None:
            line = bytearray(b"* SEARCH")
            for seq, m in picked:
                line += b" %d" % (m.uid if cmd.uid else seq)
            if picked and search.uses_modseq(cmd.args["key"]):  # RFC 7162 3.1.5: the highest found
                line += b" (MODSEQ %d)" % max(m.modseq for _, m in picked)
            self.send(bytes(line))
        else:
            self._note_extension("ESEARCH")
            self._answer_esearch(cmd, picked, options)
        await self.done(cmd, "SEARCH completed")

    def _answer_esearch(self, cmd: Command, picked: list, options: list[str], in_order: bool = False) -> None:
        """The ESEARCH response (RFC 4731; RFC 5267 for SORT: MIN/MAX/ALL in the sort
        order) and the saved result (RFC 5182).  `picked` is (seq, MessageInfo) in the
        answer's order (mailbox order for SEARCH)."""
        numbers = [m.uid if cmd.uid else seq for seq, m in picked]
        partial = cmd.args.get("partial")
        window = _window(numbers, partial) if partial else None
        if "SAVE" in options:
            self._note_extension("SEARCHRES")
            kept = picked
            others = set(options) - {"SAVE"}
            if window is not None:  # RFC 9394: SAVE keeps what PARTIAL returns
                kept = _window(picked, partial)
            elif others and others <= {"MIN", "MAX"} and picked:  # RFC 5182 2.4
                kept = ([picked[0]] if "MIN" in others else []) + ([picked[-1]] if "MAX" in others else [])
            self.search_result = frozenset(m.uid for _, m in kept)
            if options == ["SAVE"]:  # SAVE alone: no ESEARCH response (RFC 5182 2.1)
                return
        line = bytearray(b'* ESEARCH (TAG "%s")' % cmd.tag.encode("ascii"))
        if cmd.uid:
            line += b" UID"
        if numbers:
            if "MIN" in options:
                line += b" MIN %d" % (numbers[0] if in_order else min(numbers))
            if "MAX" in options:
                line += b" MAX %d" % (numbers[-1] if in_order else max(numbers))
            if "ALL" in options:
                line += b" ALL " + (response.ordered_set(numbers) if in_order else response.sequence_set(numbers))
        if partial:
            label = b"%d:%d" % partial
            got = response.ordered_set(window) if in_order else response.sequence_set(window)
            line += b" PARTIAL (" + label + b" " + (got or b"NIL") + b")"
        if "COUNT" in options:
            line += b" COUNT %d" % len(numbers)
        if picked and search.uses_modseq(cmd.args.get("key") or ("ALL",)):  # RFC 7162 3.1.5 with ESEARCH
            line += b" MODSEQ %d" % max(m.modseq for _, m in picked)
        self.send(bytes(line))

    def _substitute(self, key: tuple, msgs) -> tuple:
        """The search key with what the session answers put in as UID sets: "$" (RFC
        5182: UIDs, also where a sequence set stands) and OLDER/YOUNGER (RFC 5032: now
        minus that many seconds, against the internal date, both ends included)."""
        op = key[0]
        if op in ("SEQ", "UID") and isinstance(key[1], SearchResult):
            self._note_extension("SEARCHRES")
            return ("INSET", self.search_result)
        if op in ("OLDER", "YOUNGER"):
            self._note_extension("WITHIN")
            edge = time.time() - key[1]
            if op == "OLDER":
                return ("INSET", frozenset(m.uid for m in msgs if m.internaldate <= edge))
            return ("INSET", frozenset(m.uid for m in msgs if m.internaldate >= edge))
        if op == "AND":
            return ("AND", [self._substitute(k, msgs) for k in key[1]])
        if op == "OR":
            return ("OR", self._substitute(key[1], msgs), self._substitute(key[2], msgs))
        if op == "NOT":
            return ("NOT", self._substitute(key[1], msgs))
        return key

    async def _matching(self, key: tuple) -> list:
        """(seq, MessageInfo) of the messages of the view that match, in mailbox order."""
        msgs = list(self.mbox.messages)
        if key == ("ALL",):  # what SORT and THREAD mostly ask: nothing to match
            return list(enumerate(msgs, 1))
        key = self._substitute(key, msgs)
        n = len(msgs)
        max_uid = msgs[-1].uid if msgs else 0
        wanted = [k for k in dict.fromkeys(search.fulltext_keys(key)) if fts.usable(k[1])]
        if wanted and msgs:  # BODY / TEXT from the full-text index when the store has one
            sets = await self.mbox.fulltext_search([(needle, op == "BODY") for op, needle in wanted])
            if sets is not None:
                key = search.substitute(key, {k: frozenset(s) for k, s in zip(wanted, sets)})
        if key[0] == "INSET":  # a lone BODY / TEXT answered by the index: no Candidate each
            uids = key[1]
            return [(seq, m) for seq, m in enumerate(msgs, 1) if m.uid in uids]
        need = search.needs(key)
        # header fields and flags only: one compiled test per message, no Candidate
        quick = search.compile_indexed(key) if need == "index" else None
        if quick is not None:
            return await self._matching_indexed(key, quick, msgs)
        found: list = []
        for start in range(0, n, FETCH_BATCH):
            batch = msgs[start:start + FETCH_BATCH]
            if need in ("sent", "index"):  # answered from the metadata index
                entries = await self.mbox.cache_get_many([m.uid for m in batch])
                # _indexed, inline: a call per message costs as much as the test itself
                version, fields = fetch.CACHE_VERSION, need == "index"
                lacking = [(start + i + 1, m) for i, m in enumerate(batch)
                           if not (e := entries.get(m.uid)) or e.get("v") != version or (fields and "hs" not in e)]
                if lacking:  # computed from the files (and kept) by FETCH's code
                    entries.update(await self._cache_entries(lacking, search_fields=need == "index"))
            cands = [search.Candidate(start + i + 1, m.uid, m.flags, m.size, m.internaldate,
                                      m.uid in self.recent, n, max_uid, modseq=m.modseq) for i, m in enumerate(batch)]
            if need in ("sent", "index"):
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
                    lambda cs=cands, ms=batch: [(c.seq, m) for c, m in zip(cs, ms) if search.matches(key, c)])
                continue
            found += [(c.seq, m) for c, m in zip(cands, batch) if search.matches(key, c)]
        return found

    async def _matching_indexed(self, key: tuple, quick, msgs: list) -> list:
        """_matching of a key that search.compile_indexed compiled (header fields the index
        holds, flags, "$"), from the mailbox's header texts in memory (search.HeaderTexts):
        what they lack is taken from the index entries first (computed from the files when
        the index has none), then each message is one test, or for a lone HEADER key one
        substring test of its column.  The same answers as testing each index entry."""
        memo = search.header_texts(self.mbox.derived())
        if len(memo.hs) > 4 * len(msgs) + 2000:  # mostly expunged ones
            memo.forget({m.uid for m in msgs})
        for _ in range(2):  # twice: another session may trim the memo while this one waits
            held = memo.hs
            lacking = [(seq, m) for seq, m in enumerate(msgs, 1) if m.uid not in held]
            if not lacking:
                break
            fetched: dict = {}
            for start in range(0, len(lacking), FETCH_BATCH):
                batch = lacking[start:start + FETCH_BATCH]
                entries = await self.mbox.cache_get_many([m.uid for _, m in batch])
                version = fetch.CACHE_VERSION  # _indexed, inline (see _matching)
                todo = [(seq, m) for seq, m in batch
                        if not (e := entries.get(m.uid)) or e.get("v") != version or "hs" not in e]
                if todo:  # computed from the files (and kept) by FETCH's code
                    entries.update(await self._cache_entries(todo, search_fields=True))
                fetched.update(entries)
            memo.note(fetched)  # no wait from here to the answer: nothing trims it meanwhile
        # a message still lacking vanished meanwhile and was never indexed: no header matches
        lone = search.lone_header(key)
        if lone is not None:
            name, needle = lone
            text = memo.column(name).get
            return [(seq, m) for seq, m in enumerate(msgs, 1) if needle in text(m.uid, "")]
        texts, no_fields = memo.hs.get, {}
        return [(seq, m) for seq, m in enumerate(msgs, 1) if quick(m, texts(m.uid, no_fields))]

    # ------------------------------------------------------------------ SORT and THREAD
    async def _sort_keys(self, msgs: list, want: str) -> sort.Keys:
        """The mailbox's sort keys (sort.Keys, shared by its sessions in memory) holding
        every one of `msgs`: want "full" the whole "sort" values (address criteria),
        "thread" what THREAD uses of them, "s" / "d" / "sd" the SUBJECT keys, the sent
        dates, both.  What is missing comes from the metadata index: its "sort" value;
        else the SUBJECT key and date a listing kept ("sl"); else the envelope it holds
        (its first two items give SUBJECT and DATE, with its last two and References
        THREAD's fields); else the header read from the file.  Full values computed here
        are written back to the index, so after a restart no message is parsed for them
        again.  A message that vanished meanwhile is left out (the caller sorts it with
        empty fields)."""
        mbox = self.mbox
        derived = mbox.derived()
        keys = sort.keys_of(derived)
        view = mbox.messages
        if len(keys.subject) + len(keys.thread) > 4 * len(view) + 2000:  # mostly expunged ones
            keys.keep({m.uid for m in view})
        full = want == "full"
        if full:
            todo = [m for m in msgs if m.uid not in keys.full]
        elif want == "thread":
            todo = [m for m in msgs if m.uid not in keys.full and m.uid not in keys.thread]
        else:
            # one membership test per column in the comprehension: no generator per message
            if want == "sd":
                subject, date = keys.subject, keys.date
                todo = [m for m in msgs if m.uid not in subject or m.uid not in date]
            else:
                column = keys.subject if want == "s" else keys.date
                todo = [m for m in msgs if m.uid not in column]
        # Sorted out batch by batch, computed in one worker-thread call per kind: under
        # load every hop to a thread waits its turn, and 20 of them cost more than the work.
        missing, listed, heads, tails, old = [], {}, {}, {}, {}
        for start in range(0, len(todo), FETCH_BATCH):
            batch = todo[start:start + FETCH_BATCH]
            got_entries = await mbox.cache_get_many([m.uid for m in batch])
            for m in batch:
                e = got_entries.get(m.uid)
                if sort.valid(e):
                    keys.add_full(m.uid, e["sort"])
                    continue
                if e:
                    old[m.uid] = e
                if e and e.get("v") == fetch.CACHE_VERSION and isinstance(e.get("env"), str):
                    if want == "thread" and isinstance(e.get("refs"), str):
                        tails[m.uid] = e  # the envelope's first and last items, no addresses
                        continue
                    if not full and want != "thread":
                        light = e.get("sl")  # the listing computed them (fetch.header_entry)
                        if sort.light_valid(light):
                            keys.subject[m.uid], keys.date[m.uid] = light[1], light[2]
                        else:
                            heads[m.uid] = e["env"]  # SUBJECT / DATE only: no address parsing
                        continue
                    if isinstance(e.get("refs"), str):
                        listed[m.uid] = e  # a listing indexed the envelope: no file to read
                        continue
                missing.append(m)
        if heads:
            got = await asyncio.to_thread(_keys_from_envelopes, heads, "s" in want, "d" in want)
            for uid, (subject, date) in got.items():
                if "s" in want:
                    keys.subject[uid] = subject
                if "d" in want:
                    keys.date[uid] = date
            missing += [m for m in todo if m.uid in heads and m.uid not in got]
        if tails:
            got_thread = await asyncio.to_thread(_thread_fields_from_entries, tails)
            keys.thread.update(got_thread)
            listed.update({uid: e for uid, e in tails.items() if uid not in got_thread})
        fresh: dict[int, dict] = {}
        if listed:
            fresh.update(await asyncio.to_thread(_fields_from_entries, listed))
            missing += [m for m in todo if m.uid in listed and m.uid not in fresh]
        for start in range(0, len(missing), FETCH_BATCH):  # files read: bounded memory
            datas = await self._read_many(missing[start:start + FETCH_BATCH], header_only=True)
            fresh.update(await asyncio.to_thread(_fields_of, datas))
        for uid, f in fresh.items():
            keys.add_full(uid, f)
        if fresh:
            try:
                await mbox.cache_put({uid: {**old.get(uid, {}), "sort": f} for uid, f in fresh.items()})
            except (StoreError, OSError):
                log.warning("cache_put failed", exc_info=True, extra={"client": self.peer_ip})
        return keys

    async def _sort_items(self, cmd: Command, picked: list) -> list[sort.Item]:
        """sort.Item of each picked message, with its full sort fields (THREAD)."""
        keys = await self._sort_keys([m for _, m in picked], "thread")
        full, part = keys.full, keys.thread
        return [sort.Item(m.uid if cmd.uid else seq, seq, m.size, m.internaldate,
                          full.get(m.uid) or part.get(m.uid) or {}) for seq, m in picked]

    async def cmd_sort(self, cmd: Command) -> None:
        self._note_extension("SORT")
        options = cmd.args.get("return")
        picked = await self._matching_command(cmd, options)
        criteria = cmd.args["criteria"]
        uids = [m.uid for _, m in picked]
        derived = self.mbox.derived()
        kept = derived.get("sorted")  # the last answer: messages never change under a UID
        memo = (tuple(map(tuple, criteria)), tuple(uids),  # the internal date is a file's mtime
                tuple(m.internaldate for _, m in picked) if {"ARRIVAL", "DATE"} & {k for k, _ in criteria} else None)
        if kept is not None and kept[0] == memo:
            ordered = kept[1]
        else:
            ordered, complete = await self._sort_order(picked, uids, criteria)
            if complete:
                derived["sorted"] = (memo, ordered)
        if options is None:
            if cmd.uid:
                numbers = ordered
            else:
                seq_of = {m.uid: seq for seq, m in picked}
                numbers = [seq_of[u] for u in ordered]
            self.send(b" ".join([b"* SORT", *[b"%d" % n for n in numbers]]))
        else:
            self._note_extension("ESORT")
            by_uid = {m.uid: (seq, m) for seq, m in picked}
            self._answer_esearch(cmd, [by_uid[u] for u in ordered], options, in_order=True)
        await self.done(cmd, "SORT completed")

    async def _sort_order(self, picked: list, uids: list[int], criteria: list) -> tuple[list[int], bool]:
        """The picked messages' UIDs in the order of the criteria, and whether every one had
        its keys (not one vanished meanwhile)."""
        keyset = {k for k, _ in criteria}
        if keyset <= sort.LIGHT:
            want = "s" * ("SUBJECT" in keyset) + "d" * ("DATE" in keyset)
        else:
            want = "full"
        keys = await self._sort_keys([m for _, m in picked], want) if want else sort.Keys()
        if want == "full":
            gone = [u for u in uids if u not in keys.full]
        else:
            gone = [u for u in uids if ("s" in want and u not in keys.subject)
                    or ("d" in want and u not in keys.date)]
        if gone:  # vanished meanwhile, never indexed: sorted with empty fields (not kept)
            keys = _with_empty(keys, gone)
        sizes = {m.uid: m.size for _, m in picked} if "SIZE" in keyset else {}
        dates = {m.uid: m.internaldate for _, m in picked} if keyset & {"ARRIVAL", "DATE"} else {}
        if len(uids) > SORT_AT:
            return await asyncio.to_thread(sort.order_uids, uids, criteria, keys, sizes, dates), not gone
        return sort.order_uids(uids, criteria, keys, sizes, dates), not gone

    async def cmd_thread(self, cmd: Command) -> None:
        algorithm = cmd.args["algorithm"]
        self._note_extension("THREAD=" + algorithm)
        picked = await self._matching(cmd.args["key"])
        # The answer depends only on the messages (immutable under their UIDs) and the
        # numbers given: the last ones are kept per mailbox, as Dovecot keeps its thread index.
        keys = self.mbox.derived().get("sort")
        memo = (algorithm, cmd.uid, tuple(m.uid for _, m in picked),
                None if cmd.uid else tuple(seq for seq, _ in picked),
                tuple(m.internaldate for _, m in picked))  # a message without Date: sorts by it
        text = keys.threads.get(memo) if isinstance(keys, sort.Keys) else None
        if text is None:
            items = await self._sort_items(cmd, picked)
            keys = self.mbox.derived()["sort"]
            def work() -> bytes:
                return thread.render(thread.thread(algorithm, items))

            text = await asyncio.to_thread(work) if len(items) > THREAD_AT else work()
            if all(it.f for it in items):  # not one sorted with empty fields
                if len(keys.threads) >= 4:
                    keys.threads.clear()
                keys.threads[memo] = text
        self.send(b"* THREAD " + text if text else b"* THREAD")
        await self.done(cmd, "THREAD completed")


def _indexed(e: dict | None, search_fields: bool) -> bool:
    """Does the index entry answer a search (what _cache_entries accepts)?"""
    return bool(e) and e.get("v") == fetch.CACHE_VERSION and (not search_fields or "hs" in e)


def _with_empty(keys: sort.Keys, uids: list[int]) -> sort.Keys:
    """A copy of `keys` where these UIDs have empty fields (the shared one is not changed)."""
    out = sort.Keys()
    out.full, out.subject, out.date = dict(keys.full), dict(keys.subject), dict(keys.date)
    for uid in uids:
        out.add_full(uid, {})
    return out


def _keys_from_envelopes(envelopes: dict[int, str], subject: bool, date: bool
                         ) -> dict[int, tuple[str | None, int | None]]:
    """Blocking (CPU): (SUBJECT key, sent date) from index entries' envelopes, each only if
    asked; unparseable ones left out."""
    out = {}
    for uid, env in envelopes.items():
        try:
            head = sort.envelope_head(env.encode("latin-1"))
        except (UnicodeEncodeError, ValueError):
            head = None
        if head is not None:
            out[uid] = (sort.subject_key(head[1]) if subject else None,
                        sort.sent_date(head[0]) if date else None)
    return out


def _fields_of(datas: dict[int, bytes]) -> dict[int, dict]:
    """Blocking (CPU): the sort fields from each message's header bytes."""
    out = {}
    for uid, data in datas.items():
        hend, _ = fetch.split_header(data)
        out[uid] = sort.fields(fetch.parse_headers(data[:hend]))
    return out


def _thread_fields_from_entries(entries: dict[int, dict]) -> dict[int, dict]:
    """Blocking (CPU): THREAD's fields from index entries' envelopes; unparseable ones left out."""
    out = {}
    for uid, e in entries.items():
        light = e.get("sl")
        try:
            f = sort.thread_fields_from_envelope(e["env"].encode("latin-1"), e["refs"].encode("latin-1"),
                                                 light if sort.light_valid(light) else None)
        except UnicodeEncodeError:
            f = None
        if f is not None:
            out[uid] = f
    return out


def _fields_from_entries(entries: dict[int, dict]) -> dict[int, dict]:
    """Blocking (CPU): the sort fields from index entries' envelopes; unparseable ones left out."""
    out = {}
    for uid, e in entries.items():
        try:
            f = sort.fields_from_envelope(e["env"].encode("latin-1"), e["refs"].encode("latin-1"))
        except UnicodeEncodeError:
            f = None
        if f is not None:
            out[uid] = f
    return out


def _window(seq: list, partial: tuple[int, int]) -> list:
    """The results PARTIAL lo:hi picks (RFC 9394): 1-based positions, negative from the end."""
    lo, hi = partial
    if lo > 0:
        return seq[lo - 1:hi]
    n = len(seq)
    start, end = n + hi, n + lo + 1  # -1:-3 is the last three: positions n-3 .. n-1
    return seq[max(start, 0):max(end, 0)]
