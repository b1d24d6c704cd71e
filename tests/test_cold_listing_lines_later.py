"""A cold listing's index lines written after the answer (issue 16, session 6): with a
background indexer, the first `FETCH 1:* (... ENVELOPE)` of mail placed behind the
server's back keeps the entries in memory and answers; the indexer writes their lines once
the process is quiet, and at a stop.  The next session sees the same listing before and
after the write; the lines are what a header parse of each file gives; a kill -9 before the
write loses only lines (the listing after the restart is the same, the index completed).

Real servers (subprocesses) on loopback, real files; conditions waited on with a timeout."""
from __future__ import annotations

import imaplib
import json
import os
from pathlib import Path

from harness import MailServer, wait_for
from mailstack.imap import fetch
from mailstack.imap.fetching import read_header
from mailstack.imap.states import FETCH_BATCH
from mailstack.store import index as idxmod, uidlist
from test_background_index import USER, PASSWORD, wait_done
from test_index_cold import _corpus

LIST = "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"


def _server(where: Path, **server_keys) -> MailServer:
    where.mkdir(parents=True, exist_ok=True)
    srv = MailServer(where, overrides={"imap": {"allow_plaintext_auth": True}, "server": server_keys})
    if not (where / "data").exists():
        srv.add_domain("example.test")
        srv.add_user(USER, PASSWORD)
    for sub in ("new", "cur", "tmp"):
        (srv.maildir(USER) / sub).mkdir(parents=True, exist_ok=True)
    return srv


def _place(box: Path, datas: list[bytes]) -> None:
    for n, data in enumerate(datas):  # behind the running server's back: nobody indexes it
        tmp = box / "tmp" / f"{1720000000 + n}.M{n}P3Q{n}.restored,S={len(data)}"
        tmp.write_bytes(data)
        os.rename(tmp, box / "new" / tmp.name)


def _listing(srv: MailServer) -> list[bytes]:
    c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    try:
        c.login(USER, PASSWORD)
        c.select("INBOX", readonly=True)
        typ, data = c.fetch("1:*", LIST)
        assert typ == "OK", data
        return [x if isinstance(x, bytes) else b"".join(x) for x in data]
    finally:
        c.logout()


def _lines(box: Path) -> list[bytes]:
    try:
        return [x for x in (box / idxmod.NAME).read_bytes().split(b"\n")[1:] if x]
    except FileNotFoundError:
        return []


def _check_lines(box: Path, count: int) -> None:
    """Every message has its line, and each is the entry a header parse of its file gives."""
    by_base = {p.name.split(":")[0]: p for sub in ("new", "cur") for p in (box / sub).iterdir()}
    uids = {uid: base for base, uid in uidlist.parse((box / uidlist.NAME).read_bytes()).uids.items()}
    seen = set()
    for x in _lines(box):
        key, _, js = x.partition(b" ")
        base = key[1:].decode() if key.startswith(b"=") else uids[int(key)]
        entry = json.loads(js)
        want = json.loads(idxmod._dumps(fetch.header_entry(read_header(str(by_base[base])))))
        assert {k: v for k, v in entry.items() if k in want} == want, base
        seen.add(base)
    assert seen == set(by_base) and len(seen) == count


def test_lines_written_after_the_answer_and_the_listing_is_the_same_throughout(tmp_path):
    datas = _corpus(2 * FETCH_BATCH + 77)
    srv = _server(tmp_path / "a")
    box = srv.maildir(USER)
    with srv:
        srv.start()
        wait_done(srv, 1)
        _place(box, datas)
        cold = _listing(srv)
        assert len([x for x in cold if b"ENVELOPE" in x]) == len(datas)
        assert _listing(srv) == cold  # the next session, lines written or not: from memory
        wait_for(lambda: len(_lines(box)) >= len(datas), 30, what="the index lines written later")
        _check_lines(box, len(datas))
        assert _listing(srv) == cold
        assert srv.stop() == 0
        srv.start()
        assert _listing(srv) == cold  # from the lines on disk
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_stop_right_after_the_listing_writes_the_lines(tmp_path):
    datas = _corpus(FETCH_BATCH + 33)
    srv = _server(tmp_path / "a")
    box = srv.maildir(USER)
    with srv:
        srv.start()
        wait_done(srv, 1)
        _place(box, datas)
        cold = _listing(srv)
        assert srv.stop() == 0  # SIGTERM at once: the lines kept in memory are written first
        _check_lines(box, len(datas))
        srv.start()
        assert _listing(srv) == cold
        assert srv.stop() == 0


def test_a_kill_before_the_lines_are_written_loses_nothing_but_lines(tmp_path):
    datas = _corpus(FETCH_BATCH + 33)
    srv = _server(tmp_path / "a")
    box = srv.maildir(USER)
    with srv:
        srv.start()
        wait_done(srv, 1)
        _place(box, datas)
        cold = _listing(srv)
        srv.kill()  # kill -9, most likely before the indexer wrote anything
    assert len(_lines(box)) <= len(datas)
    again = _server(tmp_path / "a", background_index=False)  # lines made by the listing itself
    with again:
        again.start()
        assert _listing(again) == cold
        wait_for(lambda: len(_lines(box)) >= len(datas), 30, what="the index lines")
        _check_lines(box, len(datas))
        assert again.stop() == 0


def test_lines_kept_for_later_never_land_in_a_mailbox_made_again_under_the_name(tmp_path):
    """DELETE and CREATE of the same name while a cold listing's lines wait: the new
    mailbox's index holds only its own messages' lines, and its listings are its own."""
    srv = _server(tmp_path / "a")
    with srv:
        srv.start()
        wait_done(srv, 1)
        c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        try:
            c.login(USER, PASSWORD)
            assert c.create("Restored")[0] == "OK"
            box = srv.maildir(USER) / ".Restored"
            _place(box, _corpus(FETCH_BATCH + 20))
            typ, data = c.select("Restored")
            assert typ == "OK" and int(data[0]) == FETCH_BATCH + 20
            assert c.fetch("1:*", LIST)[0] == "OK"  # the cold listing: its lines kept for later
            c.select("INBOX")
            assert c.delete("Restored")[0] == "OK"  # most likely before the indexer wrote anything
            assert c.create("Restored")[0] == "OK"
            fresh = [d.replace(b"Subject:", b"Subject: again", 1) for d in _corpus(40)]
            for n, data in enumerate(fresh):
                tmp = box / "tmp" / f"{1730000000 + n}.M{n}P4Q{n}.again,S={len(data)}"
                tmp.write_bytes(data)
                os.rename(tmp, box / "new" / tmp.name)
            typ, data = c.select("Restored")
            assert typ == "OK" and int(data[0]) == 40
            typ, new = c.fetch("1:*", LIST)
            listed = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in new)
            assert typ == "OK" and listed.count(b"ENVELOPE") == 40 and listed.count(b"again") == 40
        finally:
            c.logout()
        assert srv.stop() == 0  # pending lines written now, if any
        _check_lines(box, 40)
