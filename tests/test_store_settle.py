"""The Maildir scan's settle rule (store/maildir_mailbox.py `_sync_blocking`)."""
from __future__ import annotations

import asyncio
import os
import time

from mailstack.events import EventBus
from mailstack.store.maildir import MaildirStore

ACCT = "alice@example.test"


def _drop(new_dir, n: int) -> None:
    for i in range(n):
        (new_dir / f"{1700000000 + i}.M{i}P1.host,S=20").write_bytes(b"Subject: x\r\n\r\nbody\r\n")


def test_a_scan_that_gave_uids_is_not_repeated_by_the_next_look_and_later_mail_is_seen(tmp_path):
    # The scan that gives UIDs to files dropped in behind the server's back writes the uid
    # list after it read the directories: the list's fresh mtime used to count as a change
    # "too recent to trust", so the next command (a UID SEARCH after SELECT) listed all the
    # files again.  The list's own changes are seen by its inode and size.
    async def main():
        store = MaildirStore(tmp_path / "mail", EventBus())
        await store.ensure_account(ACCT)
        box = tmp_path / "mail" / "example.test" / "alice"
        _drop(box / "new", 5)
        past = time.time() - 10  # the directories settled long ago: only the uid list is fresh
        for sub in ("new", "cur"):
            os.utime(box / sub, (past, past))
        mbox = await store.open(ACCT, "INBOX")
        st = await store._state(ACCT, "INBOX")
        assert len(st.entries) == 5
        assert await asyncio.to_thread(st._sync_blocking, False) is None  # nothing to look at again
        (box / "new" / "1700000100.M9P1.host,S=20").write_bytes(b"Subject: y\r\n\r\nbody\r\n")
        res = await asyncio.to_thread(st._sync_blocking, False)
        assert res is not None and res.entries is not None and len(res.entries) == 6
        await mbox.close()
    asyncio.run(main())
