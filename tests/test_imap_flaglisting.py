"""`FETCH <set> (UID FLAGS)` rendered in bulk (imap/flaglisting.py) says exactly what the
item-by-item renderer says (fetching.py's _render_plain over SelectedCommands.resolve),
and SELECT's first-unseen and \\Recent shortcuts pick what a walk over every message picks."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from mailstack.imap import flaglisting, rev2
from mailstack.imap.fetching import FetchCommands
from mailstack.imap.parse_cursor import SequenceSet
from mailstack.imap.parser import FetchAtt
from mailstack.imap.selected import SelectedCommands, _first_unseen
from mailstack.store.base import MessageInfo

SHARED = [frozenset(), frozenset({"\\Seen"}), frozenset({"\\Seen", "\\Answered"}),
          frozenset({"\\Flagged", "$Label1"}), frozenset({"\\Seen", "Junk", "\\Deleted"})]


class _Mbox:
    def __init__(self, messages):
        self.messages = messages

    def view_summary(self):
        """What the Maildir store's view cache gives (its sets are all frozen), so the bulk
        renderer's summary path is checked against the item-by-item one too."""
        if all(isinstance(m.flags, frozenset) for m in self.messages):
            return {"flag_sets": frozenset(m.flags for m in self.messages)}
        return None


class _Cmd:
    def __init__(self, seqset, uid):
        self.args = {"set": seqset, "atts": [FetchAtt("UID"), FetchAtt("FLAGS")]}
        self.uid = uid


class _Session(FetchCommands, SelectedCommands):
    def __init__(self, messages, recent, enabled):
        self.mbox = _Mbox(messages)
        self.recent = recent
        self.enabled = enabled


@st.composite
def views(draw):
    n = draw(st.integers(0, 60))
    gaps = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    uids, uid = [], 0
    for g in gaps:
        uid += g
        uids.append(uid)
    msgs = []
    for u in uids:
        i = draw(st.integers(0, len(SHARED)))
        # the store shares frozensets; a plain set (another store) must work too
        flags = set(SHARED[1] | {"kw%d" % u}) if i == len(SHARED) else SHARED[i]
        msgs.append(MessageInfo(u, flags, 100, 0.0, str(u), 0))
    recent = set(draw(st.lists(st.sampled_from(uids), unique=True))) if uids and draw(st.booleans()) else set()
    top = max(uids[-1] if uids else 1, n, 1) + 3
    ranges = draw(st.lists(st.tuples(st.one_of(st.none(), st.integers(1, top)),
                                     st.one_of(st.none(), st.integers(1, top))), min_size=1, max_size=4))
    return msgs, recent, SequenceSet(ranges), draw(st.booleans()), draw(st.booleans()), draw(st.integers(1, 7)), \
        draw(st.integers(1, 5))


@settings(max_examples=400, deadline=None)
@given(views())
def test_bulk_uid_flags_is_the_item_by_item_answer(case):
    msgs, recent, seqset, uid, is_rev2, chunk, first_chunk = case
    s = _Session(msgs, recent, {rev2.REV2} if is_rev2 else set())
    picked = s.resolve(_Cmd(seqset, uid))
    runs = flaglisting.segments(msgs, seqset, uid)
    assert (picked is None) == (runs is None)
    if picked is None:
        return
    assert [(seq + i, m) for seq, infos in runs for i, m in enumerate(infos)] == picked
    want, _ = s._render_plain(picked, [FetchAtt("UID"), FetchAtt("FLAGS")], {}, {})
    old_chunks = flaglisting.FIRST_CHUNK, flaglisting.CHUNK
    flaglisting.FIRST_CHUNK, flaglisting.CHUNK = first_chunk, chunk  # several chunks per run, cut anywhere
    try:
        got = b"".join(flaglisting.render_chunks(runs, recent, is_rev2, {}))
    finally:
        flaglisting.FIRST_CHUNK, flaglisting.CHUNK = old_chunks
    assert got == b"".join(want)
    assert flaglisting.distinct_of([m for _, m in picked]) == {frozenset(m.flags) for _, m in picked}


@settings(max_examples=300, deadline=None)
@given(views())
def test_first_unseen_is_the_first_message_without_seen(case):
    msgs = case[0]
    walk = next((i for i, m in enumerate(msgs) if "\\Seen" not in m.flags), None)
    assert _first_unseen(msgs, flaglisting.distinct_of(msgs), None) == walk
