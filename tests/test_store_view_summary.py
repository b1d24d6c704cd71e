"""Mailbox.view_summary(): the distinct flag sets of a view, kept with the Maildir store's
view cache so SELECT and FETCH 1:* do not walk 100,000 messages for them.  Whatever changes
the mailbox (STORE or EXPUNGE by any session, delivery, a rename behind the server's
back), a session's summary is either None or exactly the flag sets of its `messages`."""
from __future__ import annotations

import asyncio
import os

from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.store.maildir import MaildirStore

ACCT = "alice@example.com"
MSG = b"From: bob@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def _right(mbox) -> frozenset | None:
    """The summary's flag sets, after checking they are the view's."""
    summary = mbox.view_summary()
    if summary is None:
        return None
    actual = {frozenset(m.flags) for m in mbox.messages}
    assert summary["flag_sets"] == actual, (summary, actual)
    return summary["flag_sets"]


def test_view_summary_follows_every_change(tmp_path):
    async def run():
        store = MaildirStore(tmp_path / "mail", EventBus(), GroupSync())
        for i in range(5):
            await store.deliver(ACCT, MSG, f"Q{i}.abcdef")
        a = await store.open(ACCT, "INBOX")
        await a.store_flags([1, 2, 3], ["\\Seen"], "+")
        await a.store_flags([4], ["$Label"], "+")
        assert a.view_summary() is None  # a's view changed: no stale summary
        b = await store.open(ACCT, "INBOX")
        assert _right(b) == {frozenset({"\\Seen"}), frozenset({"$Label"}), frozenset()}
        b.view_summary()["first_unseen"] = 3  # what the IMAP layer memoizes in it
        c = await store.open(ACCT, "INBOX")
        assert c.view_summary() is b.view_summary()  # shared: no pass over the messages

        # another session's STORE: the next session gets a new summary, c lets go of it
        await b.store_flags([5], ["Junk"], "+")
        assert b.view_summary() is None
        d = await store.open(ACCT, "INBOX")
        assert "first_unseen" not in d.view_summary()
        assert frozenset({"Junk"}) in _right(d) and frozenset() not in _right(d)
        await c.refresh()
        assert c.view_summary() is None and frozenset({"Junk"}) in {frozenset(m.flags) for m in c.messages}

        # EXPUNGE by one session; a refresh of another that saw it go
        await d.store_flags([4], ["\\Deleted"], "+")
        await d.expunge()
        e = await store.open(ACCT, "INBOX")
        assert frozenset({"$Label"}) not in _right(e) and len(e.messages) == 4
        changes = await b.refresh()
        assert changes.expunged == [4] and b.view_summary() is None

        # delivery
        await store.deliver(ACCT, MSG, "Q9.abcdef")
        f = await store.open(ACCT, "INBOX")
        assert frozenset() in _right(f) and len(f.messages) == 5
        await e.refresh()
        assert e.view_summary() is None and len(e.messages) == 5

        # a flag set behind the server's back (another program renames the file)
        cur = tmp_path / "mail" / ACCT / "cur"
        if not cur.is_dir():
            cur = next(p for p in (tmp_path / "mail").rglob("cur") if p.is_dir())
        name = next(n for n in os.listdir(cur) if n.endswith(":2,S"))
        os.rename(cur / name, cur / (name + "F"))
        g = await store.open(ACCT, "INBOX")
        assert frozenset({"\\Seen", "\\Flagged"}) in _right(g)
        await f.refresh()
        assert f.view_summary() is None
        assert frozenset({"\\Seen", "\\Flagged"}) in {frozenset(m.flags) for m in f.messages}
        for m in (a, b, c, d, e, f, g):
            _right(m)
            await m.close()
    asyncio.run(run())
