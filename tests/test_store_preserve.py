"""store/preserve.py: kept UIDs, crash leftovers, batched appends interleaved with store.append."""
from __future__ import annotations

import asyncio

from mailstack.events import EventBus
from mailstack.store import preserve
from mailstack.store.maildir import MaildirStore

ACCOUNT = "alice@example.test"


def _store(tmp_path) -> MaildirStore:
    store = MaildirStore(tmp_path / "mail", EventBus())
    asyncio.run(store.ensure_account(ACCOUNT))
    return store


def _listing(store: MaildirStore, name: str = "INBOX"):
    async def run():
        mb = await store.open(ACCOUNT, name, read_only=True)
        try:
            return mb.uidvalidity, mb.uidnext, [(m.uid, sorted(m.flags), await mb.read(m.uid)) for m in mb.messages]
        finally:
            await mb.close()
    return asyncio.run(run())


def test_kept_uids_and_a_crash_between_uidlist_and_rename(tmp_path):
    store = _store(tmp_path)
    mdir = store.mailbox_dir(ACCOUNT, "INBOX")
    take = preserve.begin(mdir, store.account_dir(ACCOUNT), 1234567, 10, ["$Work"])
    assert take is not None and take.present == {} and take.keywords == ["$Work"]
    batch = []
    for uid, body in ((3, b"Subject: a\r\n\r\na\r\n"), (7, b"Subject: b\r\n\r\nb\r\n")):
        batch.append((uid, preserve.write_tmp(mdir, body), len(body), 1_600_000_000.0 + uid, "Sa" if uid == 3 else ""))
    preserve.place(mdir, batch)
    # a run killed after the uidlist line of UID 8 but before its rename
    (mdir / "mailstack-uidlist").open("a").write("8 :1600000008.M1P1Q1.lost,S=5\n")
    again = preserve.begin(mdir, store.account_dir(ACCOUNT), 1234567, 10, ["$Work"])
    assert set(again.present) == {3, 7, 8}
    missing = {u for u, b in again.present.items() if b not in preserve.present_files(mdir)}
    assert missing == {8}
    preserve.forget_missing(mdir, missing)
    body = b"Subject: c\r\n\r\nc\r\n"
    preserve.place(mdir, [(8, preserve.write_tmp(mdir, body), len(body), 1_600_000_008.0, "F")])
    uv, nx, msgs = _listing(store)
    assert (uv, nx) == (1234567, 10)
    assert [(u, f) for u, f, _ in msgs] == [(3, ["$Work", "\\Seen"]), (7, []), (8, ["\\Flagged"])]
    # a mailbox holding other mail is not taken over
    asyncio.run(store.append(ACCOUNT, "Sent", b"Subject: mine\r\n\r\nx\r\n"))
    assert preserve.begin(store.mailbox_dir(ACCOUNT, "Sent"), store.account_dir(ACCOUNT), 99, 5, []) is None


def test_batched_appends_interleave_with_store_append(tmp_path):
    store = _store(tmp_path)
    mdir = store.mailbox_dir(ACCOUNT, "INBOX")
    seen = []
    for round_ in range(3):
        items = []
        for i in range(5):
            body = f"Subject: batch {round_}.{i}\r\n\r\nx\r\n".encode()
            items.append((preserve.write_tmp(mdir, body), len(body), 1_600_000_000.0, {"\\Seen", "Later"}))
        _, uids, dropped = preserve.append_new(mdir, items)
        assert dropped == []
        seen += uids
        # another writer (the server's store) between two batches
        _, uid = asyncio.run(MaildirStore(tmp_path / "mail", EventBus()).append(ACCOUNT, "INBOX", b"S: x\r\n\r\n"))
        seen.append(uid)
    assert seen == sorted(seen) and len(set(seen)) == len(seen) == 18
    uv, nx, msgs = _listing(store)
    assert [u for u, _, _ in msgs] == seen and nx == seen[-1] + 1
    assert [f for u, f, b in msgs if b.startswith(b"Subject: batch")] == [["Later", "\\Seen"]] * 15
