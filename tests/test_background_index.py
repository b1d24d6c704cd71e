"""The background indexer (store/background.py, issue 16): mail put into a Maildir while the
server was down gets its metadata-index lines and full-text rows after the start, before
any client asks; the answers are those of a plain cold parse; clients working on the
mailbox meanwhile see what they would see without it; a stop in the middle is clean and
the next start goes on from there; a start with everything indexed reads no message.

Real servers (subprocesses) on loopback, real files; conditions waited on with a timeout."""
from __future__ import annotations

import base64
import imaplib
import json
import os
import poplib
import re
import smtplib
import sqlite3
from pathlib import Path

import pytest

from harness import MailServer, wait_for
from mailstack.imap import fetch
from mailstack.pop3 import sizes
from mailstack.store import fts, index as idxmod
from mailstack.store.background import _complete_pattern
from test_index_fast import messages as odd_headers

USER, PASSWORD = "alice@example.test", "correct horse battery"
LIST = "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)"
DONE = re.compile(r"background index: done in [0-9.]+ s \((\d+) messages in (\d+) mailboxes indexed\)")


def wait_done(srv: MailServer, nth: int, start: int | None = None) -> tuple[str, str]:
    """The log once the indexer finished for the nth time, and the part that the start
    `start` (default: nth) wrote."""
    log = srv.wait_log(re.compile("(?s)" + ".*".join([DONE.pattern] * nth)), timeout=100)
    starts = [m.start() for m in re.finditer("mailstack ready", log)]
    return log, log[starts[(start or nth) - 1]:]


def corpus(n: int) -> list[bytes]:
    """Messages with every kind of body a search decodes (quoted-printable, base64, 8-bit
    Latin-1, multipart) and the odd headers of the cold-listing tests."""
    odd = odd_headers()
    out = []
    for i in range(n):
        word = f"needle{i % 7}"
        kind = i % 5
        head = (f"From: Sender {i} <s{i}@example.org>\r\nTo: {USER}\r\nSubject: report {i} "
                f"{'Grüße' if i % 3 == 0 else 'plain'}\r\nDate: Tue, {1 + i % 28} Apr 2025 10:00:00 +0200\r\n"
                f"Message-ID: <bg{i}@example.org>\r\nMIME-Version: 1.0\r\n")
        if kind == 0:
            out.append(odd[i % len(odd)])
            continue
        if kind == 1:
            body = f"caf=C3=A9 {word} na=C3=AFve line {i}\r\n".encode()
            head += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        elif kind == 2:
            body = base64.encodebytes(f"Zürich {word} base64 text {i}\n".encode()).replace(b"\n", b"\r\n")
            head += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
        elif kind == 3:
            body = f"Fa\xe7ade {word} latin {i}\r\n".encode("latin-1")
            head += "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
        else:
            head += 'Content-Type: multipart/alternative; boundary="b1"\r\n'
            body = (f"--b1\r\nContent-Type: text/plain\r\n\r\nplain {word} {i}\r\n"
                    f"--b1\r\nContent-Type: text/html\r\n\r\n<p>html {i}</p>\r\n--b1--\r\n").encode()
        out.append(head.encode("utf-8") + b"\r\n" + body)
    return out


def new_server(tmp_path: Path, datas: list[bytes], **server_keys) -> MailServer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    srv = MailServer(tmp_path, overrides={"imap": {"allow_plaintext_auth": True},
                                          "pop3": {"allow_plaintext_auth": True},
                                          "server": server_keys})
    srv.add_domain("example.test")
    srv.add_user(USER, PASSWORD)
    box = srv.maildir(USER)
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(datas):  # behind the server's back, before it starts
        (box / "new" / f"{1700000000 + n}.M{n}P1Q{n}.migrated,S={len(data)}").write_bytes(data)
    return srv


def index_state(box: Path) -> tuple[set[str], set[str]]:
    """(bases with a complete index line, bases with full-text rows), read from the files."""
    complete = _complete_pattern().match
    try:
        lines = (box / idxmod.NAME).read_bytes().split(b"\n")[1:]
    except FileNotFoundError:
        lines = []
    uids = {}
    for line in (box / "mailstack-uidlist").read_bytes().split(b"\n")[1:] if (box / "mailstack-uidlist").exists() else []:
        parts = line.split(b" ")
        if len(parts) >= 2 and parts[0].isdigit():
            uids[parts[0]] = parts[-1].decode()
    bases = set()
    for line in lines:
        key, _, js = line.partition(b" ")
        if complete(js):
            bases.add(key[1:].decode() if key.startswith(b"=") else uids.get(key, ""))
    rows: set[str] = set()
    if (box / fts.NAME).exists():
        db = sqlite3.connect(f"file:{box / fts.NAME}?mode=ro", uri=True, timeout=10)
        try:
            rows = {r[0] for r in db.execute("SELECT name FROM docs")}
        except sqlite3.Error:
            rows = set()
        finally:
            db.close()
    return bases, rows


def bases_on_disk(box: Path) -> set[str]:
    return {n.split(":2,")[0] for sub in ("new", "cur") for n in os.listdir(box / sub)}


def imap(srv: MailServer) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    c.login(USER, PASSWORD)
    return c


def answers(srv: MailServer) -> dict:
    """What clients see: the listing with the body structure, SEARCH by header and body
    (non-ASCII, inside QP and base64), SORT, and POP3's STAT and LIST."""
    c = imap(srv)
    try:
        c.select("INBOX", readonly=True)
        out = {"list": c.fetch("1:*", LIST)[1]}
        for crit in (["BODY", "needle3"], ["TEXT", "needle5"], ["SUBJECT", "report"],
                     ["CHARSET", "UTF-8", "BODY", "café"], ["CHARSET", "UTF-8", "BODY", "zürich"],
                     ["CHARSET", "UTF-8", "TEXT", "façade"], ["FROM", "sender 1"], ["BODY", "html"]):
            if crit[-1].isascii():
                typ, data = c.uid("SEARCH", *crit)
            else:  # imaplib sends non-ASCII as a literal, after the other arguments
                c.literal = crit[-1].encode()
                typ, data = c.uid("SEARCH", *crit[:-1])
            out[" ".join(crit)] = (typ, data)
        out["sort"] = c.uid("SORT", "(SUBJECT DATE)", "UTF-8", "ALL")
    finally:
        c.logout()
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"])
    try:
        p.user(USER)
        p.pass_(PASSWORD)
        out["stat"] = p.stat()
        out["pop3 list"] = p.list()[1]
    finally:
        p.quit()
    return out


def _no_recent(value):
    return json.loads(json.dumps(value, default=lambda b: b.decode("latin-1")).replace("\\\\Recent", ""))


def test_indexed_before_any_client_and_answers_are_a_cold_parse(tmp_path):
    datas = corpus(450)  # several batches
    on = new_server(tmp_path / "on", datas)
    off = new_server(tmp_path / "off", datas, background_index=False)
    with on, off:
        on.start()
        box = on.maildir(USER)
        want = bases_on_disk(box)
        # no client has asked anything: the index lines and full-text rows come by themselves
        wait_for(lambda: index_state(box) == (want, want), 60, what="background index of every message")
        log = on.wait_log(DONE)
        assert f"{USER}/INBOX: {len(datas)} messages in" in log
        assert int(DONE.search(log)[1]) == len(datas)
        off.start()
        off.wait_log("mailstack ready")
        cold = answers(off)  # every answer a plain cold parse of the files
        assert index_state(off.maildir(USER))[0] != want  # (the off server indexed nothing before)
        got = answers(on)
        assert _no_recent(got) == _no_recent(cold)
        listed = sum(1 for x in got["list"] if b" (UID " in (x[0] if isinstance(x, tuple) else x)[:24])
        assert listed == len(datas) and got["stat"][0] == len(datas)
        assert got["BODY needle3"][1][0].split() and got["CHARSET UTF-8 BODY café"][1][0].split()
        assert "background index" not in off.log()
        # what the index holds is what a delivery would have written for each file
        lines = (box / idxmod.NAME).read_bytes().split(b"\n")
        files = {n.split(":2,")[0]: box / sub / n for sub in ("new", "cur") for n in os.listdir(box / sub)}
        checked = 0
        for line in lines[1:]:
            if line.startswith(b"="):
                key, _, js = line.partition(b" ")
                data = files[key[1:].decode()].read_bytes()  # a first listing's entry, POP3's size
                assert json.loads(js) == {**fetch.header_entry(data), "pop3": sizes.size_entry(data)}
                checked += 1
        assert checked == len(datas)
        assert on.stop() == 0 and off.stop() == 0
        assert "Traceback" not in on.log() and "Task was destroyed" not in on.log()


def test_clients_working_during_indexing_see_what_they_would_without_it(tmp_path):
    datas = corpus(3000)
    srv = new_server(tmp_path, datas)
    with srv:
        srv.start()
        box = srv.maildir(USER)
        c = imap(srv)
        c.select("INBOX")
        during = DONE.search(srv.log()) is None  # the indexer is at work (or was, at the SELECT)
        # flags, expunge, a delivery, listings: while the batches go on
        assert c.store("1:20", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert c.store("21:40", "+FLAGS", "(\\Seen \\Flagged)")[0] == "OK"
        c.expunge()
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"]) as s:
            s.sendmail("x@example.org", [USER], b"From: x@example.org\r\nTo: alice@example.test\r\n"
                       b"Subject: delivered meanwhile\r\n\r\nfresh needle9 text\r\n")
        wait_for(lambda: c.noop() and int(c.select("INBOX")[1][0]) == len(datas) - 20 + 1, 30,
                 what="the delivery")
        first = c.fetch("1:*", "(UID FLAGS ENVELOPE)")[1]
        hits = c.uid("SEARCH", "BODY", "needle9")[1][0].split()
        c.logout()
        srv.wait_log(DONE, timeout=120)
        migrated = {b for b in bases_on_disk(box) if "migrated" in b}
        assert len(migrated) == len(datas) - 20 and index_state(box)[0] >= migrated
        # the same answers once everything is indexed
        c = imap(srv)
        c.select("INBOX")
        assert [_strip_recent(x) for x in c.fetch("1:*", "(UID FLAGS ENVELOPE)")[1]] == \
            [_strip_recent(x) for x in first]
        assert c.uid("SEARCH", "BODY", "needle9")[1][0].split() == hits
        flags = c.fetch("1:20", "(FLAGS)")[1]
        assert all(b"\\Seen" in f and b"\\Flagged" in f for f in flags)
        c.logout()
        assert len(hits) == 1 + sum(1 for d in datas[20:] if b"needle9" in d)  # none: 7 words
        assert srv.stop() == 0
        log = srv.log()
        assert "Traceback" not in log and "Task was destroyed" not in log
        assert during or DONE.search(log)  # (recorded: the overlap depends on the machine)


def _strip_recent(item):
    return item.replace(b"\\Recent ", b"").replace(b" \\Recent", b"").replace(b"\\Recent", b"") \
        if isinstance(item, bytes) else item


def test_stop_in_the_middle_is_clean_and_the_next_start_goes_on(tmp_path):
    datas = corpus(6000)
    srv = new_server(tmp_path, datas)
    with srv:
        srv.start()
        box = srv.maildir(USER)
        wait_for(lambda: (box / idxmod.NAME).exists() and (box / idxmod.NAME).stat().st_size > 20000, 60,
                 interval=0.005, what="the first batches")
        assert srv.stop() == 0
        log = srv.log()
        assert "Traceback" not in log and "Task was destroyed" not in log and "pending" not in log
        m = re.search(r"background index: stopped \((\d+) messages", log)
        assert m, log[-2000:]
        first = int(m[1])
        assert 0 < first < len(datas)
        data = (box / idxmod.NAME).read_bytes()
        assert data.endswith(b"\n")  # whole lines only: the batch in flight was finished
        for line in data.split(b"\n")[1:-1]:
            json.loads(line.partition(b" ")[2])
        meta, rows = index_state(box)
        assert len(meta) == first and rows >= meta  # the rows of what the lines tell of are in
        srv.start()
        log, run2 = wait_done(srv, 1, start=2)
        assert f"{USER}/INBOX: {len(datas) - first} messages in" in run2
        want = bases_on_disk(box)
        assert index_state(box) == (want, want)
        assert srv.stop() == 0


def test_nothing_read_again_when_everything_is_indexed(tmp_path):
    datas = corpus(300)
    srv = new_server(tmp_path, datas)
    with srv:
        srv.start()
        box = srv.maildir(USER)
        srv.wait_log(DONE)
        assert srv.stop() == 0
        index_before = (box / idxmod.NAME).read_bytes()
        fts_before = index_state(box)[1]
        # Changed behind the server's back without a new name: a message read again would
        # give other index lines (or rows); one not read leaves every file as it is.
        for sub in ("new", "cur"):
            for name in os.listdir(box / sub):
                p = box / sub / name
                p.write_bytes(b"Subject: replaced\r\n\r\nreplaced body\r\n".ljust(p.stat().st_size, b"x"))
        srv.start()
        log, run2 = wait_done(srv, 2)
        assert DONE.search(run2)[1] == "0", run2
        assert (box / idxmod.NAME).read_bytes() == index_before
        assert index_state(box)[1] == fts_before
        assert srv.stop() == 0


def test_off_by_config(tmp_path):
    srv = new_server(tmp_path, corpus(50), background_index=False)
    with srv:
        srv.start()
        c = imap(srv)  # the server is up and answering
        c.select("INBOX", readonly=True)
        c.logout()
        assert index_state(srv.maildir(USER)) == (set(), set())
        assert srv.stop() == 0
        assert "background index" not in srv.log()


def test_an_index_file_of_another_uidvalidity_is_started_again(tmp_path):
    """Lines under another UIDVALIDITY's header are ignored when loaded: appended to, the
    new ones would be too.  The indexer starts the file again under the current one."""
    datas = corpus(40)
    srv = new_server(tmp_path, datas)
    box = srv.maildir(USER)
    (box / idxmod.NAME).write_bytes(b"V999\n1 {\"v\":1}\n")
    with srv:
        srv.start()
        srv.wait_log(DONE)
        uidvalidity = int(re.match(rb"3 V(\d+) ", (box / "mailstack-uidlist").read_bytes())[1])
        lines = (box / idxmod.NAME).read_bytes().split(b"\n")
        assert lines[0] == b"V%d" % uidvalidity != b"V999"
        assert index_state(box)[0] == bases_on_disk(box)
        c = imap(srv)
        c.select("INBOX", readonly=True)
        got = c.fetch("1:*", "(UID ENVELOPE)")[1]
        assert sum(1 for x in got if b" (UID " in (x[0] if isinstance(x, tuple) else x)[:24]) == len(datas)
        c.logout()
        assert srv.stop() == 0


def test_a_big_mailbox_no_client_holds_is_not_left_loaded_after_indexing(tmp_path, monkeypatch):
    # In-process: the store's cache of idle mailboxes would otherwise keep what the pass
    # loaded (a 100,000-message mailbox kept the server at ~350 MiB).  A mailbox a client has
    # open stays loaded: it is that client's.
    import asyncio
    from mailstack.events import EventBus
    from mailstack.store import background
    from mailstack.store.maildir import MaildirStore
    monkeypatch.setattr(background, "NOTE_MAX", 5)  # "big" from 6 messages on
    monkeypatch.setattr(background, "MAX_WAIT", 0.5)  # the held mailbox waits for its client
    root = tmp_path / "mail"
    for local, n in (("big", 8), ("held", 8), ("small", 3)):
        box = root / "example.test" / local
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True)
        for i, data in enumerate(corpus(n)):
            (box / "new" / f"17000000{i:02d}.M{i}P1.host").write_bytes(data)

    async def go():
        store = MaildirStore(root, EventBus())
        held = await store.open("held@example.test", "INBOX")
        indexer = background.BackgroundIndexer(store)
        indexer.start()
        await asyncio.wait_for(indexer.done.wait(), 60)
        await indexer.stop()
        loaded = {key[0] for key in store._states}
        await held.close()
        return loaded, indexer.messages

    loaded, indexed = asyncio.run(go())
    assert indexed == 19
    assert "big@example.test" not in loaded
    assert {"held@example.test", "small@example.test"} <= loaded


def test_the_pass_leaves_no_more_loaded_than_the_idle_budget(tmp_path):
    # In-process: the pass opens every mailbox; by count alone (256) the store's cache kept
    # them all loaded after it (a 10,000-message mailbox ~15 MB with its SORT keys and
    # header texts).  Within the budget of idle messages it keeps the most recently indexed.
    import asyncio
    from mailstack.events import EventBus
    from mailstack.store import background
    from mailstack.store.maildir import MaildirStore
    root = tmp_path / "mail"
    sizes = {f"u{i}": 12 for i in range(8)}  # 96 messages in 8 accounts
    for local, n in sizes.items():
        box = root / "example.test" / local
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True)
        for i, data in enumerate(corpus(n)):
            (box / "new" / f"17000000{i:02d}.M{i}P1.host").write_bytes(data)

    async def go():
        store = MaildirStore(root, EventBus())
        store.idle_messages = 30
        indexer = background.BackgroundIndexer(store)
        indexer.start()
        await asyncio.wait_for(indexer.done.wait(), 60)
        await indexer.stop()
        loaded = {key[0]: len(st.entries) for key, st in store._states.items() if st.refs <= 0}
        # what was let go reads back indexed: its listing comes from the index file
        mbox = await store.open("u0@example.test", "INBOX", read_only=True)
        entries = await mbox.cache_get_many([m.uid for m in mbox.messages])
        await mbox.close()
        return loaded, indexer.messages, entries

    loaded, indexed, entries = asyncio.run(go())
    assert indexed == 96
    assert sum(loaded.values()) <= 30
    assert set(loaded) == {"u6@example.test", "u7@example.test"}  # the last ones indexed
    assert len(entries) == 12 and all(e.get("v") == fetch.CACHE_VERSION and "env" in e for e in entries.values())
