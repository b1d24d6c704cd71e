"""Mailbox.derived(): the dict the protocol layer keeps its SORT keys and answers in, shared
by a mailbox's sessions, emptied with a new UIDVALIDITY, and kept after the last session for
only the DERIVED_KEPT mailboxes released last (bounded memory)."""
from __future__ import annotations

import asyncio

from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.store import maildir
from mailstack.store.maildir import MaildirStore

ACCT = "alice@example.com"


def test_derived_is_shared_and_kept_for_the_last_released(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "DERIVED_KEPT", 2)

    async def run():
        store = MaildirStore(tmp_path / "mail", EventBus(), GroupSync())
        await store.ensure_account(ACCT)
        names = ["INBOX", "A", "B", "C"]
        for name in names[1:]:
            await store.create_mailbox(ACCT, name)
        one, two = await store.open(ACCT, "INBOX"), await store.open(ACCT, "INBOX", read_only=True)
        one.derived()["k"] = 1
        assert two.derived() == {"k": 1}  # one dict for the mailbox's sessions
        await one.close()
        await two.close()
        for name in names[1:]:  # released one after another: only the last two keep theirs
            mbox = await store.open(ACCT, name)
            mbox.derived()["k"] = name
            await mbox.close()
        kept = {}
        for name in names:
            mbox = await store.open(ACCT, name, read_only=True)
            kept[name] = mbox.derived().get("k")
            await mbox.close()
        return kept
    assert asyncio.run(run()) == {"INBOX": None, "A": None, "B": "B", "C": "C"}
