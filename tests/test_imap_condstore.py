"""CONDSTORE and QRESYNC (RFC 7162) over real sockets on the real Maildir store: imapclient
for what it drives (ENABLE, SELECT's HIGHESTMODSEQ, FETCH CHANGEDSINCE, STATUS, SEARCH
MODSEQ), raw commands for QRESYNC and exact response shapes (checked against Dovecot's:
see test_dovecot_answers_the_same_shapes), two sessions at once, flags renamed behind the
server's back, a restart, and kill -9 of a writer (HIGHESTMODSEQ never lower)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from imapclient import IMAPClient

from imap_fixtures import InProcessIMAP, make_store
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.imap.parser import ParseError, parse_command
from mailstack.store import modseq as msmod
from mailstack.store.maildir import MaildirStore
from test_imap_session import ALICE, PW, Raw, _ctx, msg

ACCT = "alice@example.test"


@pytest.fixture
def srv(tmp_path):
    s = InProcessIMAP(tmp_path)
    yield s
    s.close()


def inbox_dir(srv) -> Path:
    return Path(srv.cfg.mail_dir) / "example.test" / "alice"


def fill(srv, n: int) -> None:
    for i in range(n):
        srv.deliver(ACCT, msg(i))


def client(srv) -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl=True, ssl_context=_ctx(srv))
    c.login(ALICE, PW)
    return c


def code(lines, name: bytes) -> int:
    for line in lines:
        m = re.search(rb"\[" + name + rb" (\d+)\]", line)
        if m:
            return int(m.group(1))
    raise AssertionError((name, lines))


def modseqs(lines) -> dict[int, int]:
    """UID -> MODSEQ of the FETCH responses among `lines`."""
    out = {}
    for line in lines:
        m = re.search(rb"FETCH \(.*UID (\d+).*MODSEQ \((\d+)\)", line) or \
            re.search(rb"FETCH \(.*MODSEQ \((\d+)\).*UID (\d+)", line)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            uid, ms = (a, b) if b"UID %d" % a in line else (b, a)
            out[uid] = ms
    return out


# ---------------------------------------------------------------- imapclient (CONDSTORE)

def test_imapclient_condstore_changedsince_status_search(srv):
    fill(srv, 5)
    c = client(srv)
    other = client(srv)
    try:
        caps = c.capabilities()
        assert b"CONDSTORE" in caps and b"QRESYNC" in caps
        assert c.enable("CONDSTORE") == [b"CONDSTORE"]
        sel = c.select_folder("INBOX")
        high = sel[b"HIGHESTMODSEQ"]
        assert high >= 1
        got = c.fetch(list(range(1, 6)), ["UID", "FLAGS", "MODSEQ"])
        assert len(got) == 5 and all(1 <= v[b"MODSEQ"][0] <= high for v in got.values())
        assert c.fetch(list(range(1, 6)), ["FLAGS"], modifiers=[f"CHANGEDSINCE {high}"]) == {}

        # another session changes flags: a higher modseq, seen by CHANGEDSINCE
        other.select_folder("INBOX")
        other.add_flags([2, 4], [b"\\Flagged"])
        c.noop()
        changed = c.fetch(list(range(1, 6)), ["FLAGS"], modifiers=[f"CHANGEDSINCE {high}"])
        assert sorted(changed) == [2, 4]
        new_ms = changed[2][b"MODSEQ"][0]
        assert new_ms > high and changed[4][b"MODSEQ"][0] == new_ms
        assert b"\\Flagged" in changed[2][b"FLAGS"]

        st = other.folder_status("INBOX", [b"HIGHESTMODSEQ"])
        assert st[b"HIGHESTMODSEQ"] == new_ms
        found = c.search(["MODSEQ", str(new_ms)])
        assert sorted(found) == [2, 4] and found.modseq == new_ms
        assert list(c.search(["MODSEQ", str(new_ms + 1)])) == []
    finally:
        c.logout()
        other.logout()


# ---------------------------------------------------------------- raw: STORE, ENABLE, SEARCH

def test_store_unchangedsince_modified_and_silent_modseq(srv):
    fill(srv, 4)
    a, b = Raw(srv), Raw(srv)
    try:
        lines = a.ok("SELECT INBOX (CONDSTORE)")
        base = code(lines, b"HIGHESTMODSEQ")
        b.ok("SELECT INBOX")
        # b changes message 2: a's conditional store on 1:3 since `base` fails for 2 only
        b.ok("STORE 2 +FLAGS (\\Answered)")
        lines, tagged = a.cmd(f"STORE 1:3 (UNCHANGEDSINCE {base}) +FLAGS.SILENT (\\Seen)")
        assert tagged.endswith(b"OK [MODIFIED 2] Conditional STORE failed"), tagged
        ms = modseqs(lines) or {int(m.group(1)): int(m.group(2)) for m in
                                (re.search(rb"\* (\d+) FETCH \(MODSEQ \((\d+)\)\)", x) for x in lines) if m}
        # .SILENT still tells each changed message's new MODSEQ (RFC 7162 3.1.3), not 2's
        assert sorted(ms) == [1, 3] and ms[1] == ms[3] > base
        # UID STORE names UIDs; a message whose flags would not change keeps its modseq
        lines, tagged = a.cmd(f"UID STORE 1 (UNCHANGEDSINCE {ms[1]}) +FLAGS (\\Seen)")
        assert b" OK " in tagged and b"MODIFIED" not in tagged
        # (and b's change of UID 2, told at the end of the command, with its MODSEQ)
        assert lines[0] == b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent) MODSEQ (%d))" % ms[1], lines
        assert re.fullmatch(rb"\* 2 FETCH \(UID 2 FLAGS \(\\Answered \\Recent\) MODSEQ \(\d+\)\)", lines[1])
        _, tagged = a.cmd("UID STORE 1:4 (UNCHANGEDSINCE 0) -FLAGS (\\Seen)")
        assert tagged.endswith(b"OK [MODIFIED 1:4] Conditional STORE failed")
        # a session that saw a's changes gets them with MODSEQ once it enabled CONDSTORE
        lines = b.ok("ENABLE CONDSTORE")
        assert lines[0] == b"* ENABLED CONDSTORE" and code(lines, b"HIGHESTMODSEQ") >= base
        lines += b.ok("NOOP")
        assert sorted(modseqs([x.replace(b"FETCH (", b"FETCH (UID %s " % x.split()[1]) for x in lines])) == [1, 3]
        lines = b.ok("SEARCH MODSEQ \"/flags/\\\\seen\" all %d" % ms[1])
        assert lines == [b"* SEARCH 1 3 (MODSEQ %d)" % ms[1]]
        assert b.ok("SEARCH MODSEQ 99999999999999") == [b"* SEARCH"]
    finally:
        a.close()
        b.close()


def test_highestmodseq_in_select_status_and_expunge(srv):
    fill(srv, 3)
    r = Raw(srv)
    try:
        lines = r.ok("EXAMINE INBOX")
        first = code(lines, b"HIGHESTMODSEQ")
        assert not any(b"NOMODSEQ" in x for x in lines)
        lines = r.ok("STATUS INBOX (HIGHESTMODSEQ MESSAGES)")  # enables CONDSTORE implicitly
        assert lines[-1] == b'* STATUS "INBOX" (HIGHESTMODSEQ %d MESSAGES 3)' % first or \
            lines[-1] == b"* STATUS INBOX (HIGHESTMODSEQ %d MESSAGES 3)" % first, lines
        assert lines[0] == b"* OK [HIGHESTMODSEQ %d] Highest" % first
        r.ok("SELECT INBOX")
        r.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        lines, tagged = r.cmd("EXPUNGE")
        assert lines[0] == b"* 2 EXPUNGE"
        after = int(re.search(rb"OK \[HIGHESTMODSEQ (\d+)\]", tagged).group(1))
        assert after > first
        # HIGHESTMODSEQ only grows, also across a new session
        r2 = Raw(srv)
        assert code(r2.ok("SELECT INBOX"), b"HIGHESTMODSEQ") == after
        r2.close()
    finally:
        r.close()


# ---------------------------------------------------------------- QRESYNC

def test_qresync_select_vanished_and_changed_flags(srv):
    fill(srv, 10)
    a = Raw(srv)
    try:
        a.ok("ENABLE QRESYNC")
        lines = a.ok("SELECT INBOX")
        uidvalidity = code(lines, b"UIDVALIDITY")
        known = code(lines, b"HIGHESTMODSEQ")
    finally:
        a.close()
    # while the client is away: flags change on 3 and 7, 4 and 8 are expunged
    b = Raw(srv)
    b.ok("SELECT INBOX")
    b.ok("STORE 3,7 +FLAGS.SILENT (\\Flagged)")
    b.ok("STORE 4,8 +FLAGS.SILENT (\\Deleted)")
    b.ok("EXPUNGE")
    b.close()

    c = Raw(srv)
    try:
        _, tagged = c.cmd(f"SELECT INBOX (QRESYNC ({uidvalidity} {known}))")
        assert tagged.endswith(b"BAD QRESYNC is not enabled")
        c.ok("ENABLE QRESYNC")
        lines = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {known} 1:10))")
        assert b"* VANISHED (EARLIER) 4,8" in lines
        fetches = [x for x in lines if b"FETCH" in x]
        assert len(fetches) == 2 and all(b"\\Flagged" in x for x in fetches)
        assert sorted(modseqs(fetches)) == [3, 7]
        assert lines.index(b"* VANISHED (EARLIER) 4,8") < lines.index(fetches[0])
        high = code(lines, b"HIGHESTMODSEQ")
        # known UIDs limit both answers; an unknown UIDVALIDITY gives a plain SELECT
        lines = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {known} 5:10))")
        assert lines[0].startswith(b"* OK [CLOSED] ")
        assert b"* VANISHED (EARLIER) 8" in lines and len([x for x in lines if b"FETCH" in x]) == 1
        lines = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity + 1} {known}))")
        assert not any(b"VANISHED" in x or b"FETCH" in x for x in lines)
        # up to date: nothing to tell
        lines = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {high}))")
        assert not any(b"VANISHED" in x or b"FETCH" in x for x in lines)
        # UID FETCH ... (CHANGEDSINCE n VANISHED)
        lines = c.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")
        assert lines[0] == b"* VANISHED (EARLIER) 4,8" and len(lines) == 3
        _, tagged = c.cmd(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")
        assert b" BAD " in tagged
        _, tagged = c.cmd("UID FETCH 1:* (FLAGS) (VANISHED)")
        assert b" BAD " in tagged
    finally:
        c.close()


def test_vanished_instead_of_expunge_for_both_sessions_and_move(srv):
    fill(srv, 6)
    a, b = Raw(srv), Raw(srv)
    try:
        a.ok("ENABLE QRESYNC")
        a.ok("SELECT INBOX")
        b.ok("SELECT INBOX")
        b.ok("STORE 2,3 +FLAGS.SILENT (\\Deleted)")
        assert b.ok("EXPUNGE") == [b"* 3 EXPUNGE", b"* 2 EXPUNGE"]  # b did not enable QRESYNC
        lines = a.ok("NOOP")
        assert lines == [b"* VANISHED 2:3"], lines
        # a's own EXPUNGE and MOVE
        a.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        lines, tagged = a.cmd("EXPUNGE")
        assert lines == [b"* VANISHED 1"] and b"[HIGHESTMODSEQ " in tagged
        lines = a.ok("MOVE 1:2 Archive")
        assert lines[-1] == b"* VANISHED 4:5", lines
        # a flag change by b shows up in a's NOOP with UID and MODSEQ (QRESYNC: UID always)
        b.ok("NOOP")
        b.ok("STORE 1 +FLAGS (\\Seen)")
        lines = a.ok("NOOP")
        assert len(lines) == 1 and re.fullmatch(rb"\* 1 FETCH \(UID 6 FLAGS \(\\Seen( \\Recent)?\) MODSEQ \(\d+\)\)",
                                                lines[0]), lines
        # CLOSE expunges silently; the next SELECT reports it was closed only if one was open
        a.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        assert a.ok("CLOSE") == []
        lines = a.ok("SELECT INBOX")
        assert not any(b"CLOSED" in x for x in lines) and b"* 0 EXISTS" in lines
    finally:
        a.close()
        b.close()


def test_idle_tells_vanished_and_implicit_seen_carries_uid_and_modseq(srv):
    fill(srv, 3)
    a, b = Raw(srv), Raw(srv)
    try:
        a.ok("ENABLE QRESYNC")
        a.ok("SELECT INBOX")
        lines = a.ok("FETCH 2 (BODY[HEADER.FIELDS (SUBJECT)])")  # sets \Seen: told with UID and MODSEQ
        assert re.match(rb"\* 2 FETCH \(UID 2 BODY\[HEADER.FIELDS \(SUBJECT\)\] \{\d+\}", lines[0]), lines
        assert re.search(rb"FLAGS \(\\Seen \\Recent\) MODSEQ \(\d+\)\)$", lines[0]), lines
        b.ok("SELECT INBOX")
        a.send(b"i1 IDLE\r\n")
        assert a.line() == b"+ idling"
        b.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
        b.ok("EXPUNGE")
        seen = [a.line()]
        while seen[-1] != b"* VANISHED 3":  # the \\Deleted may be told first, as its own change
            assert re.fullmatch(rb"\* 3 FETCH \(UID 3 FLAGS \(\\Deleted( \\Recent)?\) MODSEQ \(\d+\)\)", seen[-1]), seen
            seen.append(a.line())
        a.send(b"DONE\r\n")
        assert a.until(b"i1")[1].startswith(b"i1 OK")
    finally:
        a.close()
        b.close()


def test_expunges_beyond_memory_are_answered_never_wrong(srv, monkeypatch):
    """Past the remembered expunges (VANISHED_KEEP) the answer is every UID of the range that
    no longer exists (RFC 7162 3.2.5.2); seq-match data narrows it."""
    monkeypatch.setattr(msmod, "VANISHED_KEEP", 3)
    fill(srv, 12)
    a = Raw(srv)
    try:
        a.ok("ENABLE QRESYNC")
        lines = a.ok("SELECT INBOX")
        uv, old = code(lines, b"UIDVALIDITY"), code(lines, b"HIGHESTMODSEQ")
        for uid in (2, 5, 9, 11):  # four expunges, one at a time: the first is forgotten
            a.ok(f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
            a.ok(f"UID EXPUNGE {uid}")
        lines = a.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {old} VANISHED)")
        assert lines[0] == b"* VANISHED (EARLIER) 2,5,9,11"  # from what is not there any more
        lines = a.ok(f"SELECT INBOX (QRESYNC ({uv} {old} 1:12 (1,4,8 1,4,8)))")
        # the client's old view had seq 4 = UID 4; now seq 4 is UID 6: only the pair 1 -> 1
        # still matches, so every UID above 1 is answered
        assert b"* VANISHED (EARLIER) 2,5,9,11" in lines
        lines = a.ok(f"SELECT INBOX (QRESYNC ({uv} {old} 1:12 (1,3 1,4)))")
        # seq 3 is still UID 4 in this (made-up) client view: nothing at or below 4 went
        assert b"* VANISHED (EARLIER) 5,9,11" in lines
        lines = a.ok(f"SELECT INBOX (QRESYNC ({uv} {old} 1:12 (6,8 8,12)))")
        # seq 6 is UID 8 and seq 8 is UID 12 now: nothing at or below 12 can be reported
        assert not any(b"VANISHED" in x for x in lines)
        # within memory the answer is exact
        lines = a.ok("SELECT INBOX")
        mid = code(lines, b"HIGHESTMODSEQ")
        a.ok("UID STORE 3 +FLAGS.SILENT (\\Deleted)")
        a.ok("UID EXPUNGE 3")
        lines = a.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mid} VANISHED)")
        assert lines == [b"* VANISHED (EARLIER) 3"]
    finally:
        a.close()


# ---------------------------------------------------------------- behind the server's back, restart

def test_flags_renamed_behind_the_servers_back_get_a_new_modseq(srv):
    fill(srv, 3)
    a = Raw(srv)
    try:
        lines = a.ok("SELECT INBOX (CONDSTORE)")
        before = code(lines, b"HIGHESTMODSEQ")
        cur, new = inbox_dir(srv) / "cur", inbox_dir(srv) / "new"
        uidlist = (inbox_dir(srv) / "mailstack-uidlist").read_text().splitlines()
        base = next(line.split(":", 1)[1] for line in uidlist[1:] if line.split()[0] == "2")
        name = next(n for n in os.listdir(new) if n.startswith(base))  # UID 2, still in new/
        os.rename(new / name, cur / (name + ":2,FS"))
        lines = a.ok("NOOP")
        m = re.fullmatch(rb"\* 2 FETCH \(FLAGS \(\\Flagged \\Seen( \\Recent)?\) MODSEQ \((\d+)\)\)", lines[0])
        assert m and int(m.group(2)) > before, lines
        # a rename that changes no IMAP flag ("P" passed) keeps the modseq
        now = int(m.group(2))
        os.rename(cur / (name + ":2,FS"), cur / (name + ":2,FPS"))
        assert a.ok("NOOP") == []
        assert modseqs(a.ok("FETCH 2 (UID MODSEQ)")) == {2: now}
    finally:
        a.close()


def test_modseqs_survive_a_restart(srv):
    fill(srv, 4)
    a = Raw(srv)
    a.ok("SELECT INBOX (CONDSTORE)")
    a.ok("STORE 2 +FLAGS.SILENT (\\Seen)")
    a.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
    a.ok("EXPUNGE")
    lines = a.ok("FETCH 1:* (UID MODSEQ)")
    before = modseqs(lines)
    high = int(re.search(rb"HIGHESTMODSEQ (\d+)", a.ok("STATUS INBOX (HIGHESTMODSEQ)")[-1]).group(1))
    a.close()

    async def restart():  # the store's state starts over from the files, as after a restart
        srv.services.store = make_store("maildir", srv.cfg, srv.events)
    srv.call(restart())
    b = Raw(srv)
    try:
        b.ok("ENABLE QRESYNC")
        lines = b.ok("SELECT INBOX")
        assert code(lines, b"HIGHESTMODSEQ") == high
        assert modseqs(b.ok("FETCH 1:* (UID MODSEQ)")) == before
        uv = code(lines, b"UIDVALIDITY")
        lines = b.ok(f"SELECT INBOX (QRESYNC ({uv} 1 1:4))")
        assert b"* VANISHED (EARLIER) 3" in lines
        lines = b.ok("STORE 1 +FLAGS (\\Answered)")
        assert modseqs(lines)[1] == high + 1
    finally:
        b.close()


_KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.store.maildir import MaildirStore
async def main():
    store = MaildirStore(Path({root!r}), EventBus(), GroupSync())
    i = 0
    while True:
        await store.deliver({acct!r}, b"Subject: k%d\\r\\n\\r\\nbody\\r\\n" % i, "K%d" % i)
        box = await store.open({acct!r}, "INBOX")
        uids = [m.uid for m in box.messages]
        await box.store_flags(uids[-3:], ["\\\\Seen"] if i % 2 else ["\\\\Flagged"], "+")
        if len(uids) > 5:
            await box.store_flags(uids[:1], ["\\\\Deleted"], "+")
            await box.expunge(uids[:1])
        await box.refresh()
        print(box.highestmodseq, flush=True)  # what a client could have been told
        await box.close()
        i += 1
asyncio.run(main())
"""


def test_kill_9_leaves_a_consistent_never_lower_highestmodseq(tmp_path):
    root = tmp_path / "mail"
    asyncio.run(MaildirStore(root, EventBus(), GroupSync()).ensure_account(ACCT))
    script = _KILLED_WRITER.format(root=str(root), acct=ACCT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE)
    told = []
    try:
        deadline = time.monotonic() + 60
        while len(told) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            told.append(int(line))
        assert len(told) >= 40, "the writer never got going"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # read whatever the kill left: the last value printed is a floor (more may have been logged)
    rest = proc.stdout.read().split()
    told += [int(x) for x in rest if x.isdigit()]
    assert told == sorted(told)  # only ever grew while it ran

    async def check():
        store = MaildirStore(root, EventBus(), GroupSync())
        box = await store.open(ACCT, "INBOX")
        high = box.highestmodseq
        assert high >= told[-1]
        assert box.messages and all(1 <= m.modseq <= high for m in box.messages)
        # the log read back is the same as a fresh read after one more change
        await box.store_flags([box.messages[0].uid], ["\\Answered"], "+")
        await box.refresh()
        assert box.highestmodseq > high and box.messages[0].modseq == box.highestmodseq
        again = await MaildirStore(root, EventBus(), GroupSync()).open(ACCT, "INBOX")
        assert {m.uid: m.modseq for m in again.messages} == {m.uid: m.modseq for m in box.messages}
        assert again.highestmodseq == box.highestmodseq
        await box.close()
        await again.close()
    asyncio.run(check())


def test_log_compacts_and_a_lost_log_does_not_go_backwards(tmp_path, monkeypatch):
    monkeypatch.setattr(msmod, "COMPACT_SLACK", 5)
    root = tmp_path / "mail"

    async def go():
        store = MaildirStore(root, EventBus(), GroupSync())
        for i in range(3):
            await store.deliver(ACCT, b"Subject: x\r\n\r\nx\r\n", f"C{i}")
        box = await store.open(ACCT, "INBOX")
        for i in range(30):
            await box.store_flags([1, 2], ["\\Seen"], "+" if i % 2 else "-")
        await box.refresh()
        high = box.highestmodseq
        await box.close()
        path = Path(store.mailbox_dir(ACCT, "INBOX")) / msmod.NAME
        assert path.read_bytes().count(b"\n") < 20  # rewritten, not 60 lines
        again = await MaildirStore(root, EventBus(), GroupSync()).open(ACCT, "INBOX")
        assert again.highestmodseq == high
        await again.close()
        path.unlink()  # lost: restarts from the clock, above anything announced
        third = await MaildirStore(root, EventBus(), GroupSync()).open(ACCT, "INBOX")
        assert third.highestmodseq > high and all(m.modseq <= third.highestmodseq for m in third.messages)
        assert await third.vanished_since(high) is None  # no memory of what was expunged before
        await third.close()
    asyncio.run(go())


def test_two_processes_never_give_out_the_same_modseq(tmp_path):
    """Two stores on one Maildir (the server and the importer or CLI): each re-reads the log
    another wrote before it gives out a modseq."""
    root = tmp_path / "mail"

    async def go():
        one = MaildirStore(root, EventBus(), GroupSync())
        two = MaildirStore(root, EventBus(), GroupSync())
        for i in range(4):
            await one.deliver(ACCT, b"Subject: x\r\n\r\nx\r\n", f"P{i}")
        a = await one.open(ACCT, "INBOX")
        b = await two.open(ACCT, "INBOX")
        seen = []
        for i in range(6):
            box = a if i % 2 else b
            await box.store_flags([1 + i % 4], ["\\Flagged"], "+" if i < 4 else "-")
            seen.append(box.messages[i % 4].modseq)
        assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
        await a.refresh()
        await b.refresh()
        assert a.highestmodseq == b.highestmodseq == seen[-1]
        assert {m.uid: m.modseq for m in a.messages} == {m.uid: m.modseq for m in b.messages}
        await a.close()
        await b.close()
    asyncio.run(go())


def test_modseq_log_torn_tail_and_memory_of_expunges(tmp_path, monkeypatch):
    """The log alone: a line cut by a crash is never read as a (wrong) modseq nor glued onto;
    vanished_since is exact within memory and None beyond it."""
    monkeypatch.setattr(msmod, "VANISHED_KEEP", 2)

    class E:
        def __init__(self, letters):
            self.letters = letters
    path = tmp_path / msmod.NAME
    log = msmod.ModseqLog.load(path, 7)
    log.observe({}, False)
    assert log.highest == 1  # a new mailbox starts at 1
    log.observe({1: E(""), 2: E("S"), 3: E("")}, True)
    assert log.highest == 2 and log.ms == {1: 2, 2: 2, 3: 2}  # found at once: one modseq
    log.flags_changed({2: "FS"})
    log.expunged([1])
    log.expunged([3])
    log.expunged([2])  # three expunges (4, 5, 6), the last two remembered
    assert log.vanished_since(4) == [2, 3] and log.vanished_since(5) == [2] and log.vanished_since(6) == []
    assert log.vanished_since(3) is None
    with open(path, "ab") as f:
        f.write(b"9 12")  # torn: must not become UID 9 at modseq 12
    again = msmod.ModseqLog.load(path, 7)
    assert again.highest == 6 and 9 not in again.ms and not again.clean_end
    again.observe({9: E("")}, True)  # a new message: appended after a rewrite, not glued
    text = path.read_bytes()
    assert b"9 12" not in text and text.endswith(b"9 7 \n")
    assert msmod.ModseqLog.load(path, 7).ms == {9: 7}
    assert msmod.ModseqLog.load(path, 8).highest == 0  # another UIDVALIDITY: not this log


# ---------------------------------------------------------------- the grammar

def test_parser_condstore_forms():
    def args(line: bytes) -> dict:
        return parse_command([line]).args
    assert args(b"a SELECT INBOX (CONDSTORE)")["condstore"] is True
    q = args(b"a EXAMINE INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541 (1:4 2,5,7,9)))")["qresync"]
    assert q[0] == 67890007 and q[1] == 20050715194045000 and q[2].resolve(600) == [(41, 41), (43, 211), (214, 541)]
    assert q[3][0].resolve(9) == [(1, 4)]
    assert args(b"a SELECT INBOX (QRESYNC (1 2 (1 1)))")["qresync"][2] is None
    f = args(b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 9223372036854775807 VANISHED)")
    assert f["changedsince"] == (1 << 63) - 1 and f["vanished"] is True
    assert args(b"a STORE 1 (UNCHANGEDSINCE 0) FLAGS.SILENT (\\Seen)")["unchanged_since"] == 0
    assert args(b'a SEARCH MODSEQ "/flags/\\\\draft" all 620162338')["key"] == ("MODSEQ", 620162338)
    assert args(b"a STATUS INBOX (HIGHESTMODSEQ)")["items"] == ["HIGHESTMODSEQ"]
    for bad in (b"a SELECT INBOX (CONDSTORE CONDSTORE)", b"a SELECT INBOX (QRESYNC (0 1))",
                b"a SELECT INBOX (QRESYNC (1 0))", b"a FETCH 1 FLAGS (VANISHED)",
                b"a FETCH 1 FLAGS (CHANGEDSINCE 9223372036854775808)", b"a STORE 1 (UNCHANGEDSINCE) +FLAGS (\\Seen)",
                b'a SEARCH MODSEQ "/other" all 5', b"a SEARCH MODSEQ",
                b"a FETCH 1 FLAGS (CHANGEDSINCE 1 CHANGEDSINCE 2)"):
        with pytest.raises(ParseError):
            parse_command([bad])


_PIECES = [b"(", b")", b" ", b"CONDSTORE", b"QRESYNC", b"CHANGEDSINCE", b"VANISHED", b"UNCHANGEDSINCE",
           b"MODSEQ", b"1", b"0", b"42", b"9223372036854775807", b"99999999999999999999", b"1:*", b"*",
           b"2,4:6", b'"/flags/\\\\seen"', b"all", b"priv", b"+FLAGS", b"(\\Seen)", b"\"", b"\\"]


@settings(max_examples=400, deadline=None)
@given(hs.sampled_from([b"a SELECT INBOX ", b"a EXAMINE x ", b"a UID FETCH 1:* (FLAGS) ", b"a FETCH 1 MODSEQ ",
                        b"a STORE 1 ", b"a SEARCH ", b"a UID SEARCH NOT "]),
       hs.lists(hs.sampled_from(_PIECES), max_size=14), hs.binary(max_size=8))
def test_condstore_grammar_fuzz(head, pieces, tail):
    """Any input gives a Command or a ParseError, nothing else."""
    try:
        parse_command([head + b"".join(pieces) + tail])
    except ParseError:
        pass


# ---------------------------------------------------------------- Dovecot, where a shape is in doubt

def test_dovecot_answers_the_same_shapes(srv):
    """The response shapes RFC 7162 leaves some room for, side by side with Dovecot 2.3's."""
    import shutil
    if shutil.which("dovecot") is None:
        pytest.fail("dovecot is not installed (tests/run.sh installs dovecot-imapd)")
    from dovecot_fixture import Dovecot
    dc = Dovecot().start()
    try:
        dc.add_user(ALICE, PW)
        fill(srv, 4)
        shapes = {}
        for who, r in (("mailstack", Raw(srv)), ("dovecot", _DovecotRaw(dc))):
            if who == "dovecot":
                for i in range(4):
                    m = msg(i)
                    r.ok(b"APPEND INBOX {%d+}\r\n" % len(m) + m)
            out = []
            r.ok("ENABLE QRESYNC")
            lines = r.ok("SELECT INBOX")
            out.append(any(x.startswith(b"* OK [HIGHESTMODSEQ ") for x in lines))
            lines, tagged = r.cmd("STORE 1 +FLAGS.SILENT (\\Seen)")
            out.append([re.sub(rb"\d+\)\)$", b"N))", x) for x in lines])
            lines, tagged = r.cmd("STORE 2 (UNCHANGEDSINCE 1) +FLAGS (\\Seen)")
            out.append((lines, tagged.split(b"]")[0].split(b" ", 1)[1]))
            r.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
            lines, tagged = r.cmd("EXPUNGE")
            out.append((lines[:1], b"[HIGHESTMODSEQ " in tagged))
            lines = r.ok("UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
            out.append(lines[0])
            lines = r.ok("SELECT INBOX")
            out.append(lines[0])
            shapes[who] = out
            r.close()
        assert shapes["mailstack"][1:] == shapes["dovecot"][1:], shapes
        assert shapes["mailstack"][0] is True  # RFC 7162 3.1.1; Dovecot only once CONDSTORE is on
    finally:
        dc.stop()
        dc.cleanup()


class _DovecotRaw(Raw):
    def __init__(self, dc) -> None:  # plain IMAP on loopback, same line reader
        import socket
        self.sock = socket.create_connection(("127.0.0.1", dc.imap_port), timeout=10)
        self.buf = b""
        self.n = 0
        self.greeting = self.line()
        self.ok(f"LOGIN {ALICE} {PW}")


def test_select_summary_kept_with_the_view_follows_other_sessions(srv):
    """SELECT's keywords and [UNSEEN n] come from the flag sets kept with the store's view
    cache (and the first unseen memoized there): another session's STORE or EXPUNGE must
    show in the next SELECT, and FETCH 1:* (UID FLAGS) must say the same."""
    fill(srv, 6)
    a = client(srv)
    a.select_folder("INBOX")
    a.add_flags(list(range(1, 7)), [b"\\Seen"])
    a.remove_flags([4], [b"\\Seen"])

    def select():
        c = client(srv)
        info = c.select_folder("INBOX")
        return c, int(info[b"UNSEEN"][0]) if b"UNSEEN" in info else None, set(info[b"FLAGS"])
    b, unseen, flags = select()
    assert unseen == 4 and b"kwnew" not in flags
    c, unseen, _ = select()  # the shared view: the memoized answer
    assert unseen == 4
    a.remove_flags([2], [b"\\Seen"])
    a.add_flags([5], [b"kwnew"])
    d, unseen, flags = select()
    assert unseen == 2 and b"kwnew" in flags
    a.add_flags([2], [b"\\Deleted"])
    a.expunge()
    e, unseen, flags = select()
    assert unseen == 3 and b"kwnew" in flags  # the old 4th message is the 3rd now
    want = {uid: set(f) for uid, f in ((u, v[b"FLAGS"]) for u, v in e.fetch(e.search("ALL"), ["FLAGS"]).items())}
    b.noop()
    assert {uid: set(v[b"FLAGS"]) for uid, v in b.fetch(b.search("ALL"), ["FLAGS"]).items()} == want
    assert b"kwnew" in want[5] and b"\\Seen" not in want[4]
    for x in (a, b, c, d, e):
        x.logout()
