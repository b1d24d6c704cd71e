"""The Maildir store, on real files in a temporary directory (no mocks).

Each test runs its coroutine with asyncio.run; a fresh MaildirStore on the same directory
stands for a server restart.
"""
from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.store import filename as fn
from mailstack.store import flags as fl
from mailstack.store import names
from mailstack.store import uidlist
from mailstack.store.base import (SPECIAL_MAILBOXES, MailboxExists, MailboxNotFound, MessageGone,
                                  MessageSource, StoreError)
from mailstack.store.maildir import MaildirStore

ACCT = "alice@example.com"
MSG = b"From: bob@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def run(coro):
    return asyncio.run(coro)


def make_store(tmp_path: Path, events: EventBus | None = None) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", events or EventBus(), GroupSync())


def inbox_dir(tmp_path: Path, account: str = ACCT) -> Path:
    local, domain = account.rsplit("@", 1)
    return tmp_path / "mail" / domain / local


def files_in(d: Path) -> list[str]:
    return sorted(p.name for sub in ("new", "cur") for p in (d / sub).iterdir())


# ------------------------------------------------------------------ names (pure)

@pytest.mark.parametrize("name,dirname", [
    ("INBOX", None), ("inbox", None), ("Archive/2024", ".Archive.2024"), ("a.b", ".a%2Eb"),
    ("100%", ".100%25"), ("Été/Ünï", ".Été.Ünï"), ("INBOX/x", ".INBOX.x"), ("inbox/x", ".INBOX.x"),
])
def test_name_encoding_examples(name, dirname):
    assert names.to_dirname(name) == dirname
    if dirname:
        assert names.from_dirname(dirname) == names.normalize(name)


@pytest.mark.parametrize("bad", [
    "", "/", "/abs", "a/", "a//b", "..", "a/../b", ".", "a/./b", "x\x00y", "tab\there", "\x7f",
    "a" * 300, "/".join(["d"] * 40), "\udcff",
])
def test_hostile_mailbox_names_refused(bad):
    with pytest.raises(StoreError):
        names.to_dirname(bad)


def test_foreign_directories_are_not_mailboxes():
    for d in ("..", ".", ".a%zz", ".a%2e", ".INBOX", ".inbox.x", "..a", ".a..b", "cur", ".a."):
        assert names.from_dirname(d) is None, d


_level = hs.text(hs.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and "/" not in s)


@settings(max_examples=300, deadline=None)
@given(hs.lists(_level, min_size=1, max_size=5))
def test_name_encoding_round_trip_never_escapes(levels):
    name = "/".join(levels)
    try:
        dirname = names.to_dirname(name)
    except StoreError:  # only names too long for one directory entry may be refused here
        escaped = "." + ".".join(lv.replace("%", "%25").replace(".", "%2E") for lv in levels)
        assert len(escaped.encode()) > 255
        return
    canonical = names.normalize(name)
    if canonical == "INBOX":
        assert dirname is None
        return
    assert dirname.startswith(".") and dirname not in (".", "..")
    assert "/" not in dirname and "\x00" not in dirname
    assert len(dirname.encode()) <= 255
    assert names.from_dirname(dirname) == canonical
    # One path component below the account directory, whatever the name.
    base = Path("/acct")
    assert (base / dirname).resolve().parent == base


@pytest.mark.parametrize("bad", ["noat", "../x@example.com", "a/b@example.com", "x@..", "x@a/b",
                                 ".hidden@example.com", "x@", "@example.com", "x\x00@example.com"])
def test_hostile_account_names_refused(tmp_path, bad):
    store = make_store(tmp_path)
    with pytest.raises(StoreError):
        run(store.ensure_account(bad))
    with pytest.raises(StoreError):
        run(store.deliver(bad, MSG, "q1-1"))
    assert not list(tmp_path.rglob("cur")) and not list(tmp_path.rglob("*example.com*"))


# ------------------------------------------------------------------ uidlist / flags (pure)

def test_uidlist_parse_ignores_torn_last_line():
    data = b"3 V100 N3\n1 :a,S=1\n2 S5 T1700000000 :b\n3 :c-torn"
    ul = uidlist.parse(data)
    assert ul.uidvalidity == 100 and ul.uids == {"a,S=1": 1, "b": 2}
    assert ul.extra["b"] == (5, 1700000000.0)
    assert ul.nextuid == 3 and not ul.clean_end
    assert uidlist.parse(b"garbage\n") is None
    assert uidlist.parse(uidlist.format_all(ul)).uids == ul.uids


def test_flag_letters():
    system, kw = fl.parse_flags(["\\seen", "\\DELETED", "$Junk", "$junk", "\\Recent"])
    assert system == {"\\Seen", "\\Deleted"} and kw == ["$Junk"]
    assert fl.apply("FS", "+", "T") == "FST"
    assert fl.apply("FSTPa", "=", "S") == "PS"  # unknown capital P stays, keyword letter goes
    assert fl.apply("FS", "-", "S") == "F"
    for bad in (["\\Bogus"], ["with space"], ["a(b"], [""]):
        with pytest.raises(StoreError):
            fl.parse_flags(bad)


# ------------------------------------------------------------------ accounts and delivery

def test_ensure_account_layout_and_permissions(tmp_path):
    store = make_store(tmp_path)
    run(store.ensure_account(ACCT))
    run(store.ensure_account(ACCT.upper()))  # idempotent, case-insensitive
    root = inbox_dir(tmp_path)
    for sub in ("cur", "new", "tmp"):
        assert stat.S_IMODE(os.stat(root / sub).st_mode) == 0o700
    boxes = run(store.list_mailboxes(ACCT))
    assert boxes[0].name == "INBOX" and boxes[0].subscribed
    by_name = {b.name: b for b in boxes}
    for name, use in SPECIAL_MAILBOXES.items():
        assert by_name[name].special_use == use and by_name[name].selectable and by_name[name].subscribed
        assert (root / f".{name}" / "maildirfolder").exists()
    run(store.deliver(ACCT, MSG, "q1-1"))
    for p in (root / "new").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_deliver_is_idempotent_across_restart_and_flag_changes(tmp_path):
    async def first():
        store = make_store(tmp_path)
        assert await store.deliver(ACCT, MSG, "Q1.abcdef") is True  # account made on the way
        assert await store.deliver(ACCT, MSG, "Q1.abcdef") is False
        assert await store.deliver(ACCT, MSG, "Q2.abcdef") is True
        box = await store.open(ACCT, "INBOX")
        await box.store_flags([1], ["\\Seen"], "+")  # moves it new/ -> cur/
        await box.close()

    async def after_restart():
        store = make_store(tmp_path)
        assert await store.deliver(ACCT, MSG, "Q1.abcdef") is False
        assert await store.deliver(ACCT, MSG, "Q2.abcdef") is False

    run(first())
    run(after_restart())
    names_ = files_in(inbox_dir(tmp_path))
    assert len(names_) == 2
    assert any(n.endswith(":2,S") for n in names_)


def test_deliver_from_spool_file_copies_only_the_range(tmp_path):
    body = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 200_000  # ~3 MB
    spool = tmp_path / "spool-file"
    spool.write_bytes(b"ENVELOPE HEADER\n" + body + b"TRAILER")
    src = MessageSource(str(spool), len(b"ENVELOPE HEADER\n"), len(body))

    async def go():
        store = make_store(tmp_path)
        assert await store.deliver(ACCT, src, "Q9-1")
        box = await store.open(ACCT, "INBOX")
        assert box.messages[0].size == len(body)
        assert await box.read(1) == body
        assert await box.read_range(1, 3, 5) == body[3:8]
        assert await box.read_range(1, len(body) - 2, 100) == body[-2:]
        assert box.path(1) and Path(box.path(1)).read_bytes() == body

    run(go())
    assert ",S=%d" % len(body) in files_in(inbox_dir(tmp_path))[0]


def test_deliver_with_flags_into_a_folder(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.ensure_account(ACCT)
        assert await store.deliver(ACCT, MSG, "Q1-1", mailbox="Junk", flags=["\\Seen", "$Junk"])
        assert await store.deliver(ACCT, MSG, "Q1-1", mailbox="Junk") is False
        assert await store.deliver(ACCT, MSG, "Q1-1") is True  # idempotency is per mailbox
        box = await store.open(ACCT, "Junk")
        assert [m.flags for m in box.messages] == [{"\\Seen", "$Junk"}]
        with pytest.raises(MailboxNotFound):
            await store.deliver(ACCT, MSG, "Q1-1", mailbox="Nope")

    run(go())
    assert [n.endswith(":2,Sa") for n in files_in(inbox_dir(tmp_path) / ".Junk")] == [True]


def test_failed_delivery_leaves_nothing_and_can_be_retried(tmp_path):
    spool = tmp_path / "short"
    spool.write_bytes(b"only a few bytes")
    store_dir = inbox_dir(tmp_path)

    async def go():
        store = make_store(tmp_path)
        with pytest.raises(StoreError):
            await store.deliver(ACCT, MessageSource(str(spool), 0, 10_000), "Q5-1")
        assert files_in(store_dir) == [] and list((store_dir / "tmp").iterdir()) == []
        assert await store.deliver(ACCT, MSG, "Q5-1") is True  # the id was not burnt

    run(go())


def test_stale_tmp_file_never_listed_and_cleaned(tmp_path):
    store = make_store(tmp_path)
    run(store.ensure_account(ACCT))
    tmp = inbox_dir(tmp_path) / "tmp"
    fresh, stale = tmp / "1.M1P1Q1.host", tmp / "2.M2P2Q2.host"
    fresh.write_bytes(b"partial")
    stale.write_bytes(b"partial")
    old = time.time() - 40 * 3600
    os.utime(stale, (old, old))

    async def go():
        store = make_store(tmp_path)
        box = await store.open(ACCT, "INBOX")
        assert box.messages == []
        assert (await store.status(ACCT, "INBOX"))["MESSAGES"] == 0

    run(go())
    assert fresh.exists() and not stale.exists()


# ------------------------------------------------------------------ UIDs

def test_uids_persist_across_reopen_and_new_store(tmp_path):
    async def first():
        store = make_store(tmp_path)
        for i in range(3):
            await store.deliver(ACCT, MSG + b"%d" % i, f"Q{i}-1")
        box = await store.open(ACCT, "INBOX")
        got = [(m.uid, m.key) for m in box.messages]
        await box.close()
        box2 = await store.open(ACCT, "INBOX")
        assert [(m.uid, m.key) for m in box2.messages] == got
        return got, box.uidvalidity, box.uidnext

    async def second():
        store = make_store(tmp_path)
        box = await store.open(ACCT, "INBOX")
        return [(m.uid, m.key) for m in box.messages], box.uidvalidity, box.uidnext

    got1 = run(first())
    got2 = run(second())
    assert got1 == got2
    assert [u for u, _ in got1[0]] == [1, 2, 3] and got1[2] == 4


def test_external_drops_get_uids_and_new_to_cur_keeps_uid(tmp_path):
    store = make_store(tmp_path)
    run(store.ensure_account(ACCT))
    root = inbox_dir(tmp_path)

    async def go():
        box = await store.open(ACCT, "INBOX")
        assert box.messages == []
        # Another program (procmail, mbsync ...) writes with its own naming.
        (root / "new" / "1600000000.12345_1.otherhost").write_bytes(b"one\r\n")
        (root / "cur" / "1600000001.999_2.otherhost,U=7:2,FS").write_bytes(b"second\r\n")
        when = 1_500_000_000
        os.utime(root / "new" / "1600000000.12345_1.otherhost", (when, when))
        changes = await box.refresh()
        assert [m.uid for m in changes.new] == [1, 2]
        one, two = box.messages
        assert one.size == 5 and one.internaldate == when and one.flags == set()
        assert two.size == 8 and two.flags == {"\\Flagged", "\\Seen"}
        # The other program moves new/ -> cur/ and sets \Seen: same UID, flags change.
        os.rename(root / "new" / "1600000000.12345_1.otherhost",
                  root / "cur" / "1600000000.12345_1.otherhost:2,S")
        changes = await box.refresh()
        assert changes.new == [] and changes.expunged == []
        assert [(m.uid, m.flags) for m in changes.flags] == [(1, {"\\Seen"})]
        assert await box.read(1) == b"one\r\n"
        # Deleted by the other program: expunged here.
        os.unlink(root / "cur" / "1600000001.999_2.otherhost,U=7:2,FS")
        changes = await box.refresh()
        assert changes.expunged == [2] and [m.uid for m in box.messages] == [1]
        (root / "new" / "late").write_bytes(b"x")
        changes = await box.refresh()
        assert [m.uid for m in changes.new] == [3]  # UIDs are never reused

    run(go())


def test_lost_uidlist_changes_uidvalidity_only_then(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        v1 = (await store.status(ACCT, "INBOX"))["UIDVALIDITY"]
        v1b = (await make_store(tmp_path).status(ACCT, "INBOX"))["UIDVALIDITY"]
        assert v1 == v1b
        (inbox_dir(tmp_path) / uidlist.NAME).unlink()
        st = await make_store(tmp_path).status(ACCT, "INBOX")
        assert st["UIDVALIDITY"] > v1 and st["MESSAGES"] == 1 and st["UIDNEXT"] == 2

    run(go())


def test_torn_uidlist_append_is_repaired(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX")
        path = inbox_dir(tmp_path) / uidlist.NAME
        with open(path, "ab") as f:
            f.write(b"77 :half-written")  # a crash in the middle of an append
        await store.deliver(ACCT, MSG, "Q2-1")
        store2 = make_store(tmp_path)
        box2 = await store2.open(ACCT, "INBOX")
        assert [m.uid for m in box2.messages] == [1, 2]
        assert path.read_bytes().endswith(b"\n") and b"half-written" not in path.read_bytes()
        await box.close()

    run(go())


# ------------------------------------------------------------------ flags and sessions

def test_flags_and_keywords_round_trip(tmp_path):
    async def first():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX")
        changed = await box.store_flags([1], ["\\Seen", "\\Flagged", "$Forwarded", "Work"], "+")
        assert changed[0].flags == {"\\Seen", "\\Flagged", "$Forwarded", "Work"}
        assert await box.store_flags([1], ["\\Seen"], "+") == []  # nothing changed
        changed = await box.store_flags([1], ["\\Flagged", "work"], "-")
        assert changed[0].flags == {"\\Seen", "$Forwarded"}

    async def second():
        box = await make_store(tmp_path).open(ACCT, "INBOX")
        assert box.messages[0].flags == {"\\Seen", "$Forwarded"}
        changed = await box.store_flags([1], ["\\Answered", "\\Draft", "\\Deleted", "Work"], "=")
        assert changed[0].flags == {"\\Answered", "\\Draft", "\\Deleted", "Work"}

    run(first())
    run(second())
    (name,) = files_in(inbox_dir(tmp_path))
    assert name.endswith(":2,DRTb")  # capitals then keyword letters, in ASCII order
    assert (inbox_dir(tmp_path) / "mailstack-keywords").read_text() == "0 $Forwarded\n1 Work\n"


def test_too_many_keywords_is_a_clean_error(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX")
        await box.store_flags([1], [f"k{i}" for i in range(26)], "+")
        with pytest.raises(StoreError):
            await box.store_flags([1], ["one-too-many"], "+")
        assert len(box.messages[0].flags) == 26

    run(go())


def test_two_sessions_see_changes_only_after_refresh(tmp_path):
    async def go():
        store = make_store(tmp_path)
        for i in range(3):
            await store.deliver(ACCT, MSG, f"Q{i}-1")
        a = await store.open(ACCT, "INBOX")
        b = await store.open(ACCT, "INBOX")
        await a.store_flags([1, 2], ["\\Deleted"], "+")
        await a.store_flags([3], ["\\Seen"], "+")
        assert all(m.flags == set() for m in b.messages)  # b's view is untouched
        assert await a.expunge([1]) == [1]  # UID EXPUNGE: only 1, though 2 is \Deleted too
        await store.deliver(ACCT, MSG, "Q9-1")
        assert [m.uid for m in b.messages] == [1, 2, 3]
        assert await b.read(2) == MSG
        with pytest.raises(MessageGone):
            await b.read(1)
        changes = await b.refresh()
        assert changes.expunged == [1]
        assert sorted((m.uid, frozenset(m.flags)) for m in changes.flags) == [
            (2, frozenset({"\\Deleted"})), (3, frozenset({"\\Seen"}))]
        assert [m.uid for m in changes.new] == [4]
        assert [m.uid for m in b.messages] == [2, 3, 4] and b.uidnext == 5
        # a expunged 1 itself: refresh does not report it again, but reports the delivery.
        changes = await a.refresh()
        assert changes.expunged == [] and [m.uid for m in changes.new] == [4]
        assert await b.expunge() == [2]
        assert (await a.refresh()).expunged == [2]

    run(go())


def test_store_flags_finds_a_file_renamed_behind_its_back(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX")
        root = inbox_dir(tmp_path)
        (name,) = os.listdir(root / "new")
        os.rename(root / "new" / name, root / "cur" / (name + ":2,F"))  # another program
        changed = await box.store_flags([1], ["\\Seen"], "+")
        assert changed[0].flags == {"\\Seen", "\\Flagged"}  # kept the other program's flag
        assert os.listdir(root / "cur") == [name + ":2,FS"]
        assert await box.read(1) == MSG

    run(go())


def test_read_only_session_refuses_changes(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX", read_only=True)
        with pytest.raises(StoreError):
            await box.store_flags([1], ["\\Seen"], "+")
        with pytest.raises(StoreError):
            await box.expunge()
        with pytest.raises(StoreError):
            await box.move([1], "Trash")
        assert await box.copy([1], "Trash") == [(1, 1)]

    run(go())


def test_pop3_style_delete_of_chosen_messages(tmp_path):
    async def go():
        store = make_store(tmp_path)
        for i in range(4):
            await store.deliver(ACCT, MSG, f"Q{i}-1")
        pop = await store.open(ACCT, "INBOX")
        other = await store.open(ACCT, "INBOX")
        await other.store_flags([4], ["\\Deleted"], "+")  # flagged by an IMAP client
        await store.deliver(ACCT, MSG, "Q8-1")  # arrives during the POP3 session: not in its view
        await pop.store_flags([1, 3], ["\\Deleted"], "+")
        assert await pop.expunge([1, 3]) == [1, 3]
        st = await store.status(ACCT, "INBOX")
        assert st["MESSAGES"] == 3

    run(go())


# ------------------------------------------------------------------ append, copy, move

def test_append_keeps_flags_and_internal_date(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.ensure_account(ACCT)
        v, uid = await store.append(ACCT, "Sent", MSG, ["\\Seen", "$Sent"], internaldate=1_000_000_000)
        v2, uid2 = await store.append(ACCT, "Sent", MSG)
        assert (uid, uid2) == (1, 2) and v == v2 == (await store.status(ACCT, "Sent"))["UIDVALIDITY"]
        box = await store.open(ACCT, "Sent")
        m = box.messages[0]
        assert m.internaldate == 1_000_000_000 and m.flags == {"\\Seen", "$Sent"}
        assert os.stat(box.path(1)).st_mtime == 1_000_000_000
        with pytest.raises(MailboxNotFound):
            await store.append(ACCT, "Nope", MSG)

    run(go())


def test_copy_and_move_keep_flags_dates_and_return_uids(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.ensure_account(ACCT)
        await store.create_mailbox(ACCT, "Dest")
        await store.append(ACCT, "Dest", MSG, ["Other"])  # Dest's keyword table differs
        for i in range(3):
            await store.append(ACCT, "INBOX", MSG + b"%d" % i, ["\\Flagged", "Work"], internaldate=1_600_000_000 + i)
        box = await store.open(ACCT, "INBOX")
        pairs = await box.copy([1, 3], "Dest")
        assert pairs == [(1, 2), (3, 3)]
        assert [m.uid for m in box.messages] == [1, 2, 3]  # copy leaves the source alone
        pairs = await box.move([2, 3], "Dest")
        assert pairs == [(2, 4), (3, 5)]
        assert [m.uid for m in box.messages] == [1]
        assert (await store.status(ACCT, "INBOX"))["MESSAGES"] == 1
        dest = await store.open(ACCT, "Dest")
        assert [m.uid for m in dest.messages] == [1, 2, 3, 4, 5]
        for m, date, body in zip(dest.messages[1:], (0, 2, 1, 2), (0, 2, 1, 2)):
            assert m.flags == {"\\Flagged", "Work"}
            assert m.internaldate == 1_600_000_000 + date
            assert await dest.read(m.uid) == MSG + b"%d" % body
        assert dest.messages[0].flags == {"Other"}
        # Copy into the same mailbox gives new UIDs.
        assert await dest.copy([1], "Dest") == [(1, 6)]
        with pytest.raises(MailboxNotFound):
            await box.copy([1], "Missing")

    run(go())


# ------------------------------------------------------------------ mailbox management

def test_create_delete_rename_semantics(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.ensure_account(ACCT)
        await store.create_mailbox(ACCT, "Projects/2024/Q1")  # parents made too
        listed = {b.name: b for b in await store.list_mailboxes(ACCT)}
        assert listed["Projects"].selectable and listed["Projects"].has_children
        assert not listed["Projects/2024/Q1"].has_children
        with pytest.raises(MailboxExists):
            await store.create_mailbox(ACCT, "Projects/2024")
        with pytest.raises(MailboxExists):
            await store.create_mailbox(ACCT, "inbox")
        v_old = (await store.status(ACCT, "Projects"))["UIDVALIDITY"]
        await store.append(ACCT, "Projects", MSG)
        # DELETE of a mailbox with children: its messages go, the name stays as \Noselect.
        await store.delete_mailbox(ACCT, "Projects")
        listed = {b.name: b for b in await store.list_mailboxes(ACCT)}
        assert not listed["Projects"].selectable and listed["Projects"].has_children
        with pytest.raises(MailboxNotFound):
            await store.open(ACCT, "Projects")
        with pytest.raises(StoreError):
            await store.delete_mailbox(ACCT, "Projects")  # \Noselect with children
        with pytest.raises(StoreError):
            await store.delete_mailbox(ACCT, "INBOX")
        with pytest.raises(MailboxNotFound):
            await store.delete_mailbox(ACCT, "Nothing")
        await store.create_mailbox(ACCT, "Projects")
        st = await store.status(ACCT, "Projects")
        assert st["MESSAGES"] == 0 and st["UIDVALIDITY"] > v_old  # a new incarnation
        # RENAME takes the children along, and the subscriptions.
        await store.subscribe(ACCT, "Projects/2024", True)
        await store.rename_mailbox(ACCT, "Projects", "Old/Work")
        names_ = [b.name for b in await store.list_mailboxes(ACCT)]
        assert "Old/Work/2024/Q1" in names_ and not any(n.startswith("Projects") for n in names_)
        assert "Old/Work/2024" in await store.subscriptions(ACCT)
        with pytest.raises(MailboxExists):
            await store.rename_mailbox(ACCT, "Trash", "Old/Work")
        with pytest.raises(StoreError):
            await store.rename_mailbox(ACCT, "Old", "Old/Work/x")
        with pytest.raises(MailboxNotFound):
            await store.rename_mailbox(ACCT, "Nothing", "Else")
        assert (tmp_path / "mail" / "example.com" / "alice").is_dir()
        assert not [p for p in inbox_dir(tmp_path).iterdir() if p.name.startswith("mailstack-deleted")]

    run(go())


def test_rename_inbox_moves_messages_and_leaves_inbox_empty(tmp_path):
    async def go():
        store = make_store(tmp_path)
        for i in range(3):
            await store.deliver(ACCT, MSG + b"%d" % i, f"Q{i}-1")
        await store.create_mailbox(ACCT, "INBOX/Child")
        box = await store.open(ACCT, "INBOX")
        await box.store_flags([2], ["\\Seen", "Kw"], "+")
        await store.rename_mailbox(ACCT, "INBOX", "Old Inbox")
        st = await store.status(ACCT, "INBOX")
        assert st["MESSAGES"] == 0 and st["UIDNEXT"] == 4  # UIDs 1..3 are never reused
        old = await store.open(ACCT, "Old Inbox")
        assert [await old.read(m.uid) for m in old.messages] == [MSG + b"%d" % i for i in range(3)]
        assert old.messages[1].flags == {"\\Seen", "Kw"}
        assert "INBOX/Child" in [b.name for b in await store.list_mailboxes(ACCT)]
        assert (await box.refresh()).expunged == [1, 2, 3]
        await store.deliver(ACCT, MSG, "Q7-1")
        assert (await store.status(ACCT, "INBOX"))["UIDNEXT"] == 5

    run(go())


def test_subscriptions_persist_even_for_missing_mailboxes(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.ensure_account(ACCT)
        await store.subscribe(ACCT, "Ghost/Child", True)
        await store.subscribe(ACCT, "Junk", False)
        store2 = make_store(tmp_path)
        subs = await store2.subscriptions(ACCT)
        assert "Ghost/Child" in subs and "Junk" not in subs
        listed = {b.name: b for b in await store2.list_mailboxes(ACCT)}
        assert not listed["Junk"].subscribed and listed["Trash"].subscribed
        assert "Ghost/Child" not in listed

    run(go())


@pytest.mark.parametrize("bad", ["../bob", "a/../../x", "/etc", "x\x00", "a//b", "..", "x/"])
def test_hostile_names_never_touch_other_accounts(tmp_path, bad):
    async def go():
        store = make_store(tmp_path)
        await store.ensure_account(ACCT)
        await store.ensure_account("bob@example.com")
        before = sorted(str(p) for p in (tmp_path / "mail").rglob("*"))
        for op in (store.create_mailbox(ACCT, bad), store.open(ACCT, bad), store.delete_mailbox(ACCT, bad),
                   store.rename_mailbox(ACCT, "Trash", bad), store.rename_mailbox(ACCT, bad, "X"),
                   store.append(ACCT, bad, MSG), store.status(ACCT, bad), store.subscribe(ACCT, bad, True),
                   store.deliver(ACCT, MSG, "Q1-1", mailbox=bad)):
            with pytest.raises(StoreError):
                await op
        assert sorted(str(p) for p in (tmp_path / "mail").rglob("*")) == before

    run(go())


# ------------------------------------------------------------------ events, status, cache

def test_events_published_with_uids_and_origin(tmp_path):
    events = EventBus()
    seen: list = []

    async def go():
        store = make_store(tmp_path, events)
        await store.ensure_account(ACCT)
        events.subscribe(ACCT, "INBOX", seen.append)
        events.subscribe(ACCT, "Trash", seen.append)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX")
        await store.append(ACCT, "INBOX", MSG, origin="s1")
        await box.refresh()
        await box.store_flags([1], ["\\Deleted"], "+", origin="s1")
        await box.expunge(origin="s1")
        await box.move([2], "Trash", origin="s2")

    run(go())
    got = [(e.mailbox, e.kind, e.uids, e.origin) for e in seen]
    assert got == [("INBOX", "new", (), None), ("INBOX", "new", (2,), "s1"), ("INBOX", "flags", (1,), "s1"),
                   ("INBOX", "expunge", (1,), "s1"), ("INBOX", "expunge", (2,), "s2"),
                   ("Trash", "new", (1,), "s2")]


def test_status_counts_without_opening(tmp_path):
    async def go():
        store = make_store(tmp_path)
        for i in range(4):
            await store.deliver(ACCT, MSG, f"Q{i}-1")
        box = await store.open(ACCT, "INBOX")
        await box.store_flags([1, 2], ["\\Seen"], "+")
        st = await make_store(tmp_path).status(ACCT, "INBOX")
        # no IMAP session has taken them as \Recent yet (RFC 3501 2.3.2)
        assert st == {"MESSAGES": 4, "RECENT": 4, "UIDNEXT": 5, "UIDVALIDITY": box.uidvalidity, "UNSEEN": 2,
                      "SIZE": 4 * len(MSG), "DELETED": 0, "DELETED-STORAGE": 0,  # STATUS=SIZE; RFC 9051/9208
                      "HIGHESTMODSEQ": 3}  # 1 empty, 2 the four found, 3 the STORE (modseq.py)
        await box.store_flags([3], ["\\Deleted"], "+")
        assert (await make_store(tmp_path).status(ACCT, "INBOX"))["DELETED"] == 1
        with pytest.raises(MailboxNotFound):
            await store.status(ACCT, "Nope")

    run(go())


def test_cache_persists_per_uid_and_dies_with_uidvalidity(tmp_path):
    async def go():
        store = make_store(tmp_path)
        for i in range(3):
            await store.deliver(ACCT, MSG, f"Q{i}-1")
        await store.group_writer.settled()  # the entries are written just after the delivery returns
        box = await store.open(ACCT, "INBOX")
        delivered = await box.cache_get(1)  # indexed at delivery, from the bytes in hand
        assert delivered["hsize"] == MSG.index(b"\r\n\r\n") + 4 and "bs" in delivered
        await box.cache_put({1: {"env": ("a", "b"), "n": 1}, 2: {"x": "ü"}})
        assert await box.cache_get(1) == {"env": ["a", "b"], "n": 1}  # as a reload gives it
        other = await make_store(tmp_path).open(ACCT, "INBOX")
        assert await other.cache_get(2) == {"x": "ü"} and await other.cache_get(3) == delivered
        (inbox_dir(tmp_path) / uidlist.NAME).unlink()
        fresh = await make_store(tmp_path).open(ACCT, "INBOX")
        assert await fresh.cache_get(1) is None

    run(go())


def test_cache_keeps_only_live_messages_when_compacted(tmp_path):
    async def go():
        store = make_store(tmp_path)
        await store.deliver(ACCT, MSG, "Q1-1")
        box = await store.open(ACCT, "INBOX")
        await box.cache_put({1: {"live": True}})
        await box.cache_put({uid: {"dead": uid} for uid in range(2, 1200)})  # no such messages
        return (inbox_dir(tmp_path) / "mailstack-cache").read_bytes().splitlines()

    lines = run(go())
    assert len(lines) == 2 and lines[1] == b'1 {"live":true}'


# ------------------------------------------------------------------ concurrency

def test_concurrent_deliveries_and_an_external_process(tmp_path):
    """Deliveries in this process while another process (like the CLI) assigns UIDs to the
    same mailbox: every message gets exactly one UID, none shared."""
    store = make_store(tmp_path)
    run(store.ensure_account(ACCT))
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from mailstack.store.maildir import MaildirStore\n"
        "from mailstack.events import EventBus\n"
        "async def main():\n"
        "    s = MaildirStore(Path(sys.argv[1]), EventBus())\n"
        "    for i in range(40):\n"
        "        await s.status(sys.argv[2], 'INBOX')\n"
        "        s = MaildirStore(Path(sys.argv[1]), EventBus())\n"
        "asyncio.run(main())\n")

    async def go():
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script,
                                                    str(tmp_path / "mail"), ACCT)
        box = await store.open(ACCT, "INBOX")
        for batch in range(5):
            await asyncio.gather(*(store.deliver(ACCT, MSG, f"Q{batch}x{i}-1") for i in range(20)))
            await box.refresh()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await box.refresh()
        fresh = await make_store(tmp_path).open(ACCT, "INBOX")
        return box, fresh

    box, fresh = run(go())
    assert len(box.messages) == 100
    assert [m.uid for m in box.messages] == list(range(1, 101))
    assert [(m.uid, m.key) for m in fresh.messages] == [(m.uid, m.key) for m in box.messages]


def test_open_10000_messages_is_fast(tmp_path):
    store = make_store(tmp_path)
    run(store.ensure_account(ACCT))
    cur = inbox_dir(tmp_path) / "cur"
    now = time.time()
    for i in range(10_000):
        base = fn.new_base(now - i, 1000 + i)
        fd = os.open(cur / fn.join(base, "S" if i % 3 else ""), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    async def timed(label):
        s = make_store(tmp_path)
        t0 = time.perf_counter()
        box = await s.open(ACCT, "INBOX")
        dt = time.perf_counter() - t0
        print(f"\n[store timing] {label}: open of {len(box.messages)} messages in {dt * 1000:.1f} ms")
        t0 = time.perf_counter()
        await box.refresh()
        print(f"[store timing] {label}: refresh with no change in {(time.perf_counter() - t0) * 1000:.1f} ms")
        t0 = time.perf_counter()
        st = await s.status(ACCT, "INBOX")
        print(f"[store timing] {label}: status in {(time.perf_counter() - t0) * 1000:.1f} ms")
        return box, st

    box, st = run(timed("first open (assigns 10,000 UIDs)"))
    assert len(box.messages) == 10_000 and st["UNSEEN"] == 3334
    box2, _ = run(timed("second open (new store, uidlist present)"))
    assert [m.key for m in box2.messages] == [m.key for m in box.messages]
    assert box2.messages[0].size == 1000 + 9_999  # the oldest file got UID 1


# ------------------------------------------------------------------ through the real server

def test_server_delivery_imap_and_crash_restart_keep_uids(tmp_path):
    """SMTP in, IMAP out (imaplib over 993), a kill -9 and a restart: UIDVALIDITY, UIDs and
    flags survive, nothing is delivered twice, and a file dropped in by hand gets a UID."""
    import imaplib
    import re
    import smtplib

    from harness import MailServer, wait_for

    user, password = "dora@example.test", "dora secret"
    (tmp_path / "srv").mkdir()
    srv = MailServer(tmp_path / "srv")
    srv.add_domain("example.test")
    srv.add_user(user, password)
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            for i in range(3):
                s.sendmail("x@remote.test", [user], f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())
        wait_for(lambda: len(srv.inbox_messages(user)) == 3, 20, what="local delivery")

        def imap():
            ctx = srv.client_tls()
            ctx.check_hostname = False
            c = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=ctx, timeout=10)
            c.login(user, password)
            return c

        def uids_and_flags(c):
            typ, data = c.select("INBOX")
            assert typ == "OK"
            validity = int(re.search(rb"UIDVALIDITY (\d+)", b" ".join(
                x for x in c.untagged_responses.get("OK", []) if isinstance(x, bytes))).group(1))
            typ, data = c.uid("FETCH", "1:*", "(FLAGS)")
            got = sorted((int(re.search(rb"UID (\d+)", d).group(1)),
                          re.search(rb"FLAGS \(([^)]*)\)", d).group(1).decode()) for d in data if d)
            return validity, got

        c = imap()
        validity, got = uids_and_flags(c)
        assert [u for u, _ in got] == [1, 2, 3]
        assert c.uid("STORE", "2", "+FLAGS", r"(\Flagged $Label1)")[0] == "OK"
        assert c.uid("COPY", "3", "Archive")[0] == "OK"
        c.logout()
        maildir = srv.maildir(user)
        wait_for(lambda: any(n.endswith(":2,Fa") for n in os.listdir(maildir / "cur")), 10, what="flag rename")
        assert len(os.listdir(maildir / ".Archive" / "cur")) == 1

        srv.kill()  # no goodbye: what is on disk is all there is
        (maildir / "new" / "1700000000.handmade.otherhost").write_bytes(b"Subject: by hand\r\n\r\nx\r\n")
        srv.start()
        c = imap()
        validity2, got2 = uids_and_flags(c)
        assert validity2 == validity
        kept = [(u, set(f.split()) - {"\\Recent"}) for u, f in got2[:3]]  # \Recent is IMAP's choice
        assert kept == [(1, set()), (2, {"\\Flagged", "$Label1"}), (3, set())]
        assert got2[3][0] == 4  # the hand-made file
        typ, data = c.uid("FETCH", "4", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"by hand" in data[0][1]
        c.logout()
        assert len(srv.inbox_messages(user)) == 4  # the queue did not deliver anything twice
    finally:
        srv.kill()


def test_deleted_special_folder_stays_deleted(tmp_path):
    store = make_store(tmp_path)
    run(store.ensure_account(ACCT))
    run(store.delete_mailbox(ACCT, "Junk"))
    run(store.ensure_account(ACCT))  # e.g. the next login
    names_now = [m.name for m in run(store.list_mailboxes(ACCT))]
    assert "Junk" not in names_now and "Sent" in names_now


def test_uids_follow_arrival_order_within_one_second():
    from mailstack.store import filename as fn
    # textual order would put M100000 first; arrival order puts M99999 first
    a = "1795475826.M99999P10Q1.host,S=10"
    b = "1795475826.M100000P10Q2.host,S=10"
    c = "1795475827.M5P10Q3.host,S=10"
    assert sorted([c, b, a], key=fn.arrival_key) == [a, b, c]
    assert sorted([b, a]) == [b, a]  # (the trap)


def test_recent_mark_survives_a_restart(tmp_path):
    """\\Recent (RFC 3501 2.3.2) is kept on disk: after a restart the messages a session has
    already seen are not recent again (as Dovecot keeps it in dovecot-uidlist)."""
    async def go():
        first = make_store(tmp_path)
        for i in range(2):
            await first.deliver(ACCT, MSG, f"R{i}-1")
        assert (await first.status(ACCT, "INBOX"))["RECENT"] == 2
        box = await first.open(ACCT, "INBOX")
        uids = [m.uid for m in box.messages]
        assert first.claim_recent(box.account, box.name, box.uidvalidity, uids) == set(uids)
        mark_file = inbox_dir(tmp_path) / "mailstack-recent"
        for _ in range(500):  # written by a task, off the event loop
            if mark_file.exists():
                break
            await asyncio.sleep(0.01)
        await first.deliver(ACCT, MSG, "R2-1")
        second = make_store(tmp_path)  # a new process
        assert (await second.status(ACCT, "INBOX"))["RECENT"] == 1
        box2 = await second.open(ACCT, "INBOX")
        all_uids = [m.uid for m in box2.messages]
        assert second.claim_recent(box2.account, box2.name, box2.uidvalidity, all_uids) == {all_uids[-1]}
    asyncio.run(go())


def test_delivery_into_a_special_folder_waits_for_the_account_being_set_up(tmp_path):
    """A first delivery sets the account up (special folders included) under the account
    lock; a second delivery filed into Archive at that moment (a Sieve fileinto) must wait
    for it, not find "no mailbox Archive" and fall back to INBOX."""
    async def go():
        store = make_store(tmp_path)
        lock = store._account_lock(ACCT)
        await lock.acquire()  # the first delivery's set-up is in progress
        task = asyncio.create_task(store.deliver(ACCT, b"Subject: report\r\n\r\nx\r\n", "d1", mailbox="Archive"))
        deadline = time.monotonic() + 10
        while not task.done() and not lock._waiters and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(store._ensure_account_blocking, store.account_dir(ACCT))
        lock.release()
        assert await asyncio.wait_for(task, 10) is True
        assert (await store.status(ACCT, "Archive"))["MESSAGES"] == 1
        with pytest.raises(MailboxNotFound):  # a folder that does not exist still does not
            await store.deliver(ACCT, b"Subject: x\r\n\r\nx\r\n", "d2", mailbox="Nowhere")
    run(go())


def test_pop3_update_expunges_by_uid_even_if_deleted_was_cleared_meanwhile(tmp_path):
    """POP3's QUIT sets \\Deleted and expunges; an IMAP client clearing \\Deleted in between
    must not undo the DELE (seen as "messages deleted over POP3 are still there" by
    tests/viewcheck.py under load).  IMAP's own EXPUNGE still keeps what is not \\Deleted."""
    async def go():
        store = make_store(tmp_path)
        for i in range(3):
            await store.deliver(ACCT, MSG, f"P{i}-1")
        pop = await store.open(ACCT, "INBOX")
        imap = await store.open(ACCT, "INBOX")
        await pop.store_flags([1, 2], ["\\Deleted"], "+")
        await imap.store_flags([1, 2], ["\\Deleted"], "-")  # the IMAP client, in between
        assert await imap.expunge([1]) == []  # IMAP: only what is flagged
        assert await pop.expunge([1, 2], flagged_only=False) == [1, 2]
        assert await imap.expunge(None, flagged_only=False) == []  # "everything": still only \Deleted
        fresh = await make_store(tmp_path).open(ACCT, "INBOX")
        assert [m.uid for m in fresh.messages] == [3]
    run(go())
