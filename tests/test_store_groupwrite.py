"""Group commit of Maildir deliveries (store/groupwrite.py), on real files, and delivery at
accept time under 20 concurrent SMTP sessions through the real server.

The kill -9 tests that cover the same path are tests/test_queue_e2e.py (SIGKILL under SMTP
load, then every acknowledged message in the Maildir exactly once) and the crash tests of
tests/test_store.py and tests/test_store_index.py."""
from __future__ import annotations

import asyncio
import os
import smtplib
import threading
from pathlib import Path

from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.store import groupwrite
from mailstack.store import index as idxmod
from mailstack.store.base import StoreError
from mailstack.store.maildir import MaildirStore

ACCOUNTS = ["alice@example.com", "bob@example.com", "carol@example.org"]


def make_store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", EventBus(), GroupSync())


def mailbox(tmp_path: Path, account: str) -> Path:
    local, domain = account.rsplit("@", 1)
    return tmp_path / "mail" / domain / local


def message(n: int) -> bytes:
    return (f"From: sender{n}@example.net\r\nTo: someone@example.com\r\nSubject: message {n}\r\n"
            f"Message-ID: <m{n}@example.net>\r\n\r\n" + f"line {n}\r\n" * (n % 50 + 1)).encode()


def test_concurrent_deliveries_are_grouped_and_each_lands_once_with_its_bytes(tmp_path):
    async def main():
        store = make_store(tmp_path)
        for a in ACCOUNTS:
            await store.ensure_account(a)

        async def one(n: int) -> bool:
            return await store.deliver(ACCOUNTS[n % 3], message(n), f"id{n}")

        # Waves with yields in between: later deliveries arrive while earlier batches are
        # still in flight (two batches at once, one finishing its directory fsync).
        tasks = []
        for n in range(300):
            tasks.append(asyncio.ensure_future(one(n)))
            if n % 7 == 0:
                await asyncio.sleep(0)
        done = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert all(done)
        # a repeated delivery id is a no-op, as before
        assert await store.deliver(ACCOUNTS[0], message(0), "id0") is False
        await store.group_writer.settled()  # the derived data is written in batches after (derived.py)
        return store.group_writer

    writer = asyncio.run(main())
    assert writer.written == 300
    assert writer.batches < 300, "concurrent deliveries were not grouped"
    seen = {}
    for a in ACCOUNTS:
        box = mailbox(tmp_path, a)
        assert os.listdir(box / "tmp") == []
        for name in os.listdir(box / "new"):
            data = (box / "new" / name).read_bytes()
            n = int(data.split(b"Subject: message ")[1].split(b"\r\n")[0])
            assert data == message(n)
            assert ACCOUNTS[n % 3] == a
            assert n not in seen
            seen[n] = name
        # the index entries were written from the bytes in hand (one line per message)
        lines = (box / idxmod.NAME).read_bytes().splitlines()
        assert lines[0].startswith(b"V")  # batches in flight together did not both create the file
        assert sum(1 for line in lines if line.startswith(b"=")) == len(os.listdir(box / "new"))
    assert sorted(seen) == list(range(300))


def test_acknowledged_after_file_and_tmp_directory_fsynced_and_the_rename(tmp_path, monkeypatch):
    """What the writer syncs, in which order, and when the delivery is told: a spy on the
    real fsync helper (the syncs still happen)."""
    events: list[tuple] = []
    real = groupwrite.fsync_together
    box = mailbox(tmp_path, ACCOUNTS[0])

    def spy(fds, dirs):
        events.append(("sync", len(fds), tuple(os.path.basename(d) for d in dirs),
                       len(os.listdir(box / "new")), len(os.listdir(box / "tmp"))))
        return real(fds, dirs)

    monkeypatch.setattr(groupwrite, "fsync_together", spy)

    async def main():
        store = make_store(tmp_path)
        await store.ensure_account(ACCOUNTS[0])
        await store.deliver(ACCOUNTS[0], message(1), "one")
        events.append(("delivered", len(os.listdir(box / "new"))))
        await store.group_writer.settled()

    asyncio.run(main())
    # The file and tmp/ synced together (both must have returned; issued at once they share
    # one device cache flush) while the file is in tmp/ under its checksummed name; the
    # rename into new/ before the delivery is told; the fsync of new/ right after the release
    # (until it returns, a crash leaves the file to recover_tmp), in the worker, racing the
    # delivery's return.
    assert events[:1] == [("sync", 1, ("tmp",), 0, 1)]
    assert sorted(events[1:]) == [("delivered", 1), ("sync", 0, ("new",), 1, 0)]


def test_recovery_at_start_moves_complete_deliveries_and_drops_cut_ones(tmp_path):
    """What a crash can leave in tmp/, and what the server start (clean_stale_tmp) makes of it."""
    import time
    import zlib

    from mailstack.store.maildir import clean_stale_tmp

    async def setup():
        store = make_store(tmp_path)
        await store.ensure_account(ACCOUNTS[0])
    asyncio.run(setup())
    box = mailbox(tmp_path, ACCOUNTS[0])
    whole, flagged = message(7), message(8)
    # acknowledged, rename lost: complete, under the checksummed name
    (box / "tmp" / f"1700000000.A,S={len(whole)}.crc{zlib.crc32(whole):08x}").write_bytes(whole)
    # with flags: goes to cur/
    (box / "tmp" / f"1700000001.B,S={len(flagged)}:2,S.crc{zlib.crc32(flagged):08x}").write_bytes(flagged)
    # cut short by the crash before its fsync returned (never acknowledged)
    (box / "tmp" / f"1700000002.C,S={len(whole)}.crc{zlib.crc32(whole):08x}").write_bytes(whole[:10])
    # some other program's leftover
    (box / "tmp" / "1700000003.D").write_bytes(b"partial")
    removed = clean_stale_tmp(tmp_path / "mail", time.time() + 1)
    assert removed == 1
    assert os.listdir(box / "tmp") == []
    assert os.listdir(box / "new") == [f"1700000000.A,S={len(whole)}"]
    assert (box / "new" / f"1700000000.A,S={len(whole)}").read_bytes() == whole
    assert os.listdir(box / "cur") == [f"1700000001.B,S={len(flagged)}:2,S"]

    async def read_back():  # the store sees both, with their bytes
        store = make_store(tmp_path)
        mb = await store.open(ACCOUNTS[0], "INBOX")
        got = sorted([await mb.read(m.uid) for m in mb.messages])
        await mb.close()
        return got
    assert asyncio.run(read_back()) == sorted([whole, flagged])


def test_a_failing_delivery_fails_alone_and_leaves_no_file(tmp_path):
    async def main():
        store = make_store(tmp_path)
        for a in ACCOUNTS[:2]:
            await store.ensure_account(a)
        await store.deliver(ACCOUNTS[1], message(0), "warm")  # both mailboxes loaded
        await store.deliver(ACCOUNTS[0], message(0), "warm")
        os.rmdir(mailbox(tmp_path, ACCOUNTS[1]) / "tmp")  # its writes now fail (ENOENT)
        results = await asyncio.gather(*(store.deliver(ACCOUNTS[n % 2], message(n), f"id{n}")
                                         for n in range(1, 21)), return_exceptions=True)
        return results

    results = asyncio.run(main())
    for n, r in zip(range(1, 21), results):
        if n % 2 == 1:  # to ACCOUNTS[1], whose tmp/ is gone
            assert isinstance(r, (StoreError, OSError)), r
        else:
            assert r is True
    assert len(os.listdir(mailbox(tmp_path, ACCOUNTS[0]) / "new")) == 11
    assert len(os.listdir(mailbox(tmp_path, ACCOUNTS[1]) / "new")) == 1


def test_batches_are_bounded(tmp_path):
    async def main():
        store = make_store(tmp_path)
        await store.ensure_account(ACCOUNTS[0])
        await asyncio.gather(*(store.deliver(ACCOUNTS[0], message(n), f"id{n}")
                               for n in range(groupwrite.MAX_BATCH * 2 + 5)))
        return store.group_writer

    writer = asyncio.run(main())
    assert writer.batches >= 3  # no batch took more than MAX_BATCH


# ------------------------------------------------------------------ through the server

def test_twenty_concurrent_sessions_deliver_at_accept_and_queue_nothing(tmp_path):
    """All-local mail from 20 sessions at once is delivered before each 250, none of it
    through the queue (before: once the local slots were busy, a burst spilled into the
    queue and every later message followed it)."""
    from harness import MailServer, wait_for

    srv = MailServer(tmp_path, {"senderauth": {"enabled": False}, "delivery": {"outbound": False},
                                "smtp": {"max_connections_per_ip": 100}}, listeners=("smtp",))
    srv.add_domain("example.test")
    srv.add_user("dora@example.test", "dora secret")
    srv.start()
    accepted: list[str] = []
    errors: list[BaseException] = []

    def session(k: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
                for i in range(6):
                    s.sendmail("x@remote.test", ["dora@example.test"],
                               f"Subject: s{k}m{i}\r\n\r\nbody\r\n".encode())
                    accepted.append(f"s{k}m{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=session, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(accepted) == 120
        # every 250 came after the message was in the Maildir: no waiting here
        got = srv.inbox_messages("dora@example.test")
        subjects = {m.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in got}
        assert subjects == set(accepted) and len(got) == 120
        log = wait_for(lambda: srv.log().count("status=sent (delivered to maildir)") >= 120 and srv.log(), 10,
                       what="120 delivery log lines")
        assert "(queue active)" not in log
    finally:
        assert srv.stop() == 0



def test_a_delivery_after_the_executor_shut_down_ends_instead_of_hanging(tmp_path):
    # The batches run on the writer's own threads (groupwrite.WORKERS), so the loop's default
    # executor being gone no longer stops them: the delivery is made.  What must never
    # happen is a delivery left waiting; when one fails, nothing of it is left in new/.
    async def main():
        store = make_store(tmp_path)
        await store.ensure_account(ACCOUNTS[0])
        await store.deliver(ACCOUNTS[0], message(1), "before")  # the mailbox is loaded
        await asyncio.get_running_loop().shutdown_default_executor()
        try:
            await asyncio.wait_for(store.deliver(ACCOUNTS[0], message(2), "after"), 10)
        except (StoreError, OSError) as e:
            return e
        return None

    error = asyncio.run(main())
    assert len(os.listdir(mailbox(tmp_path, ACCOUNTS[0]) / "new")) == (1 if error is not None else 2)


def test_a_worker_call_ends_without_waking_the_loop_yet_nothing_is_left_behind(tmp_path, monkeypatch):
    # Session 4: the batches run on the writer's own threads, and the end of a call (after
    # step 5) is collected by the loop later (the next write, or COLLECT_AFTER) instead of
    # waking it.  Pinned here: a lone delivery's step 6 still reaches the derived writer
    # without any further delivery or settled(); a call that dies before telling its
    # deliveries anything fails them (no waiting forever), and the next delivery works.
    async def main():
        writer = groupwrite.GroupWriter()
        added = []
        writer.derived.add = lambda mailbox_dir, base, *rest: added.append(base)
        box = tmp_path / "box"
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True)
        await writer.write(box, "one", "new", "one", message(1), 1)
        assert (box / "new" / "one").read_bytes() == message(1)
        deadline = asyncio.get_running_loop().time() + 5
        while not added and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert added == ["one"] and not writer._work

        def dies(*args):
            raise RuntimeError("a bug in the worker")

        with monkeypatch.context() as m:
            m.setattr(groupwrite, "_write_batch", dies)
            try:
                await asyncio.wait_for(writer.write(box, "two", "new", "two", message(2), 1), 5)
                failed = None
            except RuntimeError as e:
                failed = e
        assert failed is not None and "a bug" in str(failed)
        await writer.write(box, "three", "new", "three", message(3), 1)
        await writer.settled()
        assert sorted(os.listdir(box / "new")) == ["one", "three"] and added == ["one", "three"]
        assert not writer._work and not writer._pending

    asyncio.run(main())
