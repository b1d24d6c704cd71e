"""`FETCH 1:* (UID FLAGS)`, the listing a client resynchronises a mailbox with, rendered in
bulk: per message only C-level steps (attribute getters mapped over the view, one dict
look-up per message for its rendered flag list, one %-format of a whole chunk), where the
item-by-item renderer (fetching.py's _render_plain) ran a dozen bytecodes per message and
appended each line to the session's buffer.  100,000 messages: ~28 ms of loop time before,
~20 ms now, and a few large writes instead of a flush check every 500 messages.

The bytes are the same as the item-by-item renderer's: the flag list of a message is
rendered once per distinct (flag set, \\Recent) pair, by the same rule as
SelectedCommands.flags_of (sorted flags, then \\Recent for a message recent to this
session unless IMAP4rev2 is enabled)."""
from __future__ import annotations

import bisect
import itertools
import operator

from . import response
from .parser import SearchResult

CHUNK = 16384  # messages per %-format and write (~650 KB): bounds what one step holds
FIRST_CHUNK = 2048  # the first write comes sooner: the client reads while the rest is made
_FMT = b"* %d FETCH (UID %d %s)\r\n"
_flags_of = operator.attrgetter("flags")
_uid_of = operator.attrgetter("uid")


async def fetch_uid_flags(session, cmd) -> bool:
    """`FETCH <set> (UID FLAGS)` without CONDSTORE, answered in bulk for an IMAPSession
    (fetching.py's cmd_fetch asks this first).  False: not that command, nothing done."""
    names = [a.name for a in cmd.args["atts"]]
    if cmd.uid and "UID" not in names:
        names.insert(0, "UID")
    if names != ["UID", "FLAGS"] or session.condstore or isinstance(cmd.args["set"], SearchResult) \
            or cmd.args.get("changedsince") is not None or cmd.args.get("vanished"):
        return False  # (CONDSTORE adds MODSEQ to FLAGS; VANISHED, CHANGEDSINCE: condstore.py)
    runs = segments(session.mbox.messages, cmd.args["set"], cmd.uid)
    if runs is None:
        session.tagged(cmd, "BAD", "Invalid message sequence number")
        return True
    # A keyword shows in a FETCH only after an untagged FLAGS announced it.  For the whole
    # view (1:*), the store's summary has its flag sets without a pass over the messages.
    summary = session.mbox.view_summary()
    if summary is not None and sum(len(infos) for _, infos in runs) == len(session.mbox.messages):
        distinct = summary["flag_sets"]
    else:
        distinct = {fs for _, infos in runs for fs in distinct_of(infos)}
    session._note_keywords(set().union(*distinct))
    for chunk in render_chunks(runs, session.recent, session.imap4rev2, {}):
        await session.flush()
        session.writer.write(chunk)
        await session.drain()  # a client that stops reading holds one chunk, not the listing
    await session.done(cmd, "FETCH completed")
    return True


def distinct_of(infos: list) -> set:
    """The distinct flag sets of MessageInfos.  The store shares one frozenset per flag
    combination, so this is a C loop; flags held in plain sets (unhashable) are frozen one
    by one."""
    try:
        return set(map(_flags_of, infos))
    except TypeError:
        return {frozenset(m.flags) for m in infos}


def segments(msgs: list, seqset, uid: bool) -> list | None:
    """The messages of a sequence set as runs of consecutive sequence numbers, (first seq,
    list of MessageInfo), in ascending order, without a (seq, info) pair per message (the
    100,000 pairs of `1:*` were most of the command's time, with the collector's passes
    they set off); None for a sequence number out of range, as resolve() says.  Same
    messages as SelectedCommands.resolve; `seqset` is not a search result ("$")."""
    out = []
    if uid:
        if not msgs:
            return out
        for lo, hi in seqset.resolve(msgs[-1].uid):  # sorted and disjoint
            i = bisect.bisect_left(msgs, lo, key=_uid_of)
            j = bisect.bisect_right(msgs, hi, key=_uid_of)
            if j > i:
                out.append((i + 1, msgs[i:j]))
        return out
    n = len(msgs)
    for lo, hi in seqset.resolve(n):  # sorted and disjoint
        if lo < 1 or hi > n:
            return None
        out.append((lo, msgs[lo - 1:hi]))
    return out


def render_chunks(runs: list, recent, rev2: bool, flag_cache: dict):
    """Yield the responses to `FETCH (UID FLAGS)` of `runs` (what segments() gives), at
    most CHUNK messages per bytes object (the first FIRST_CHUNK).  `recent`: this session's \\Recent UIDs."""
    size = FIRST_CHUNK
    for first, infos_all in runs:
        start = 0
        while start < len(infos_all):
            infos = infos_all[start:start + size]
            seq = first + start  # of the chunk's first message
            start += len(infos)
            size = CHUNK
            flag_sets = list(map(_flags_of, infos))
            uids = list(map(_uid_of, infos))
            try:
                kinds = set(flag_sets)
            except TypeError:  # flags in plain sets: frozen one by one
                flag_sets = [frozenset(f) for f in flag_sets]
                kinds = set(flag_sets)
            plain = {fs: _value(fs, False, rev2, flag_cache) for fs in kinds}
            values = list(map(plain.__getitem__, flag_sets))
            if recent and not rev2:
                # only the messages still \Recent to this session (new mail since the
                # last SELECT): looked at one by one
                for i, uid in enumerate(uids):
                    if uid in recent:
                        values[i] = _value(flag_sets[i], True, rev2, flag_cache)
            flat = tuple(itertools.chain.from_iterable(zip(range(seq, seq + len(infos)), uids, values)))
            yield (_FMT * len(infos)) % flat


def _value(flags: frozenset, is_recent: bool, rev2: bool, flag_cache: dict) -> bytes:
    """b"FLAGS (...)" as SelectedCommands.flags_of renders it; kept in `flag_cache` under
    the key fetching.py's _flags_item uses."""
    key = (flags, is_recent)
    value = flag_cache.get(key)
    if value is None:
        names = sorted(flags)
        if is_recent and not rev2:
            names.append("\\Recent")
        value = flag_cache[key] = b"FLAGS " + response.flag_list(names)
    return value
