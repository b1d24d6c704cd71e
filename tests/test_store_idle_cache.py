"""The store's cache of loaded mailboxes that no session holds (maildir.py `_evict`): bounded
by the messages in them together (server.mailbox_cache_messages), not only by their count,
least recently used let go first; the mailbox a client has just left stays even when it is
bigger than the budget (a client logging in again finds it), until another one is loaded;
a mailbox with a session open is never let go; a mailbox let go reads back the same."""
from __future__ import annotations

import asyncio

from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.store.maildir import MaildirStore

ACCT = "alice@example.com"


def _message(i: int) -> bytes:
    return (f"From: s{i}@example.org\r\nSubject: message {i}\r\nMessage-ID: <m{i}@example.org>\r\n"
            f"\r\nbody {i}\r\n").encode()


async def _store_with(tmp_path, sizes: dict[str, int]) -> MaildirStore:
    store = MaildirStore(tmp_path / "mail", EventBus(), GroupSync())
    await store.ensure_account(ACCT)
    for name, n in sizes.items():
        if name != "INBOX":
            await store.create_mailbox(ACCT, name)
        for i in range(n):
            await store.append(ACCT, name, _message(i))
    store._states.clear()  # as after a start: nothing loaded
    return store


def _loaded(store: MaildirStore) -> list[str]:
    return [name for (_, name) in store._states]


def _idle_messages(store: MaildirStore) -> int:
    return sum(len(st.entries) for st in store._states.values() if st.refs <= 0)


async def _visit(store: MaildirStore, name: str) -> list[int]:
    mbox = await store.open(ACCT, name, read_only=True)
    uids = [m.uid for m in mbox.messages]
    await mbox.close()
    return uids


def test_idle_mailboxes_are_bounded_by_their_messages_least_recently_used_first(tmp_path):
    async def run():
        store = await _store_with(tmp_path, {"INBOX": 12, "A": 12, "B": 12, "C": 30, "D": 5})
        store.idle_messages = 25
        before = {name: await _visit(store, name) for name in ("INBOX", "A", "B", "C", "D")}
        store._states.clear()
        seen = []
        for name in ("INBOX", "A", "B", "C"):
            await _visit(store, name)
            seen.append(_loaded(store))
        # the one just left is not counted: INBOX + A (24) fit beside B; loading C makes
        # INBOX + A + B 36: INBOX, the least recently used, goes
        assert seen == [["INBOX"], ["INBOX", "A"], ["INBOX", "A", "B"], ["A", "B", "C"]]
        # C (30) alone is over the budget: it stayed while it was the one just left; when
        # another is loaded it goes first, not A and B, which fit
        await _visit(store, "D")
        assert _loaded(store) == ["A", "B", "D"]
        # a mailbox with a session open is never let go, however big
        held = await store.open(ACCT, "C")
        for name in ("INBOX", "A", "B", "D", "INBOX"):
            await _visit(store, name)
            assert "C" in _loaded(store)
            assert _idle_messages(store) - 12 <= 25  # the others beside the one just left (INBOX)
        await held.close()
        assert _idle_messages(store) - 30 <= 25  # C, just left, stays beside them
        # read back after being let go: the same messages and UIDs
        after = {name: await _visit(store, name) for name in ("INBOX", "A", "B", "C", "D")}
        assert after == before
        store.idle_messages = 0  # keep only the one just left
        await _visit(store, "A")
        assert _loaded(store) == ["A"]
        await _visit(store, "B")
        assert _loaded(store) == ["B"]
    asyncio.run(run())


def test_delivery_into_a_mailbox_let_go_reloads_it(tmp_path):
    async def run():
        store = await _store_with(tmp_path, {"INBOX": 3, "A": 40})
        store.idle_messages = 10
        await _visit(store, "INBOX")
        await _visit(store, "A")
        await _visit(store, "INBOX")  # loaded again: A (40) goes
        assert _loaded(store) == ["INBOX"]
        assert await store.deliver(ACCT, _message(99), "d99", "A")
        uids = await _visit(store, "A")
        assert len(uids) == 41 and uids == sorted(set(uids))
    asyncio.run(run())


def test_a_mailbox_let_go_is_freed_at_once_with_a_background_indexer_set(tmp_path):
    """With a background indexer set, each state carries the hooks that hand it work; they
    must not make the state a reference cycle, or every mailbox let go stays in memory until
    the cyclic collector runs (the background pass left ~50 MiB that way)."""
    import gc
    import weakref

    from mailstack.store.background import BackgroundIndexer

    async def run():
        store = await _store_with(tmp_path, {"INBOX": 3, "A": 3})
        store.set_background(BackgroundIndexer(store))  # the hooks, without starting the pass
        await _visit(store, "A")
        st = weakref.ref(store._states[(ACCT, "A")])
        gc.disable()
        try:
            store.drop_if_idle(ACCT, "A")
            assert st() is None, gc.get_referrers(st())
        finally:
            gc.enable()
    asyncio.run(run())
