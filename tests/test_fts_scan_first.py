"""The first SEARCH BODY / TEXT of a mailbox whose full-text rows are missing (issue 16,
session 6): with a background indexer, it is answered by a plain scan of those messages
(store/fts.py `scan`) and the rows are added afterwards by the indexer; the answers are the
index's answers and the reference scan's (search.message_texts), before and after the rows
are there, and after a kill -9 in the middle of adding them.

Real servers (subprocesses) on loopback, real files; conditions waited on with a timeout."""
from __future__ import annotations

import base64
import imaplib
import os
import re
from pathlib import Path

from harness import MailServer
from mailstack.imap import search
from mailstack.store import fts
from test_background_index import USER, PASSWORD, corpus, index_state, wait_done

# BODY / TEXT needles over QP, base64, Latin-1, multipart, RFC 2047 and odd headers;
# with white space; non-ASCII; a case-folded one (ß folds to ss; the Kelvin sign to k)
NEEDLES = [("BODY", "needle3"), ("BODY", "café"), ("BODY", "zürich needle2"), ("BODY", "FAÇADE"),
           ("TEXT", "grüße"), ("TEXT", "report 1"), ("BODY", "strasse"), ("BODY", "kelvin"),
           ("BODY", "html 4"), ("TEXT", "sender 3"), ("BODY", "nowhere-at-all")]


def extra() -> list[bytes]:
    """Bodies whose matching needs decoding or folding beyond the corpus'."""
    return [
        b"Subject: fold\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGro\xc3\x9fe STRA\xc3\x9fE \xe2\x84\xaaelvin\r\n",
        b"Subject: w1252\r\nContent-Type: text/plain; charset=windows-1252\r\n\r\nZ\xfcrich needle2 \x93quoted\x94\r\n",
        b"Subject: b64 latin\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes("Façade needle3".encode("latin-1")).replace(b"\n", b"\r\n"),
        b"Subject: attached\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n"
        b"outer\r\n--x\r\nContent-Type: message/rfc822\r\n\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"inner caf=C3=A9\r\n--x--\r\n",
    ]


def _files(box: Path) -> dict[str, Path]:
    return {n.split(":2,")[0]: box / sub / n for sub in ("new", "cur") for n in os.listdir(box / sub)}


def _reference(files: dict[str, Path], op: str, needle: str) -> set[str]:
    """The plain scan every answer must equal (message_texts: what a row holds)."""
    needle = needle.casefold()
    out = set()
    for base, f in files.items():
        head, body = search.message_texts(f.read_bytes())
        if needle in body or (op == "TEXT" and needle in head):
            out.add(base)
    return out


def test_scan_answers_what_the_index_answers(tmp_path):
    datas = corpus(240) + extra()
    files = {}
    for n, data in enumerate(datas):
        f = tmp_path / f"m{n}"
        f.write_bytes(data)
        files[f"m{n}"] = f
    queries = [(needle.casefold(), op == "BODY") for op, needle in NEEDLES]
    want = [_reference(files, op, needle) for op, needle in NEEDLES]
    assert all(want[:-1]) and not want[-1]  # the needles do find something (and one nothing)
    assert fts.scan(list(files.items()), queries) == want
    scanned = fts.answer(tmp_path / "a.sqlite", files, queries, list(files.items()), scan_missing=True)
    assert scanned == (want, set())
    assert fts.indexed(tmp_path / "a.sqlite")[0] == set()  # a scan adds no row
    path = tmp_path / "b.sqlite"
    first = fts.answer(path, files, queries, list(files.items()))  # the index's way: rows on the way
    assert first == (want, set(files))
    assert fts.answer(path, files, queries) == (want, set())  # and from the rows
    half = dict(list(files.items())[: len(files) // 2])  # rows for half, the rest scanned
    path = tmp_path / "c.sqlite"
    fts.index_files(path, list(half.items()))
    rest = [(b, f) for b, f in files.items() if b not in half]
    assert fts.answer(path, files, queries, rest, scan_missing=True) == (want, set())
    # a file renamed meanwhile is found again; one gone makes the caller scan its own way
    moved = tmp_path / "moved"
    os.rename(files["m1"], moved)
    assert fts.scan([("m1", files["m1"])], queries[:1], lambda: {"m1": moved}) is not None
    assert fts.scan([("m1", files["m1"])], queries[:1], lambda: {}) is None
    # the index's reader the same way, but one gone is skipped, the others read
    got = [b for b, *_ in fts._texts([("m1", files["m1"]), ("m2", files["m2"])], lambda: {"m1": moved}, False)]
    assert got == ["m2", "m1"]
    assert [b for b, *_ in fts._texts([("m1", files["m1"]), ("m2", files["m2"])], lambda: {}, True)] == ["m2"]
    fts.drop(tmp_path / "a.sqlite")
    fts.drop(tmp_path / "b.sqlite")
    fts.drop(path)


def _search(srv: MailServer) -> list[set[int]]:
    c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    try:
        c.login(USER, PASSWORD)
        c.select("INBOX")
        out = []
        for op, needle in NEEDLES:
            c.literal = needle.encode()  # sent as a literal after the command: non-ASCII too
            typ, data = c.uid("SEARCH", "CHARSET", "UTF-8", op)
            assert typ == "OK", data
            out.append({int(x) for x in data[-1].split()})
    finally:
        c.logout()
    return out


def _uid_bases(box: Path) -> dict[int, str]:
    uids = {}
    for line in (box / "mailstack-uidlist").read_bytes().split(b"\n")[1:]:
        parts = line.split(b" ")
        if len(parts) >= 2 and parts[0].isdigit():
            uids[int(parts[0])] = parts[-1].decode().lstrip(":")
    return uids


def _place(box: Path, datas: list[bytes]) -> None:
    for n, data in enumerate(datas):  # behind the server's back, as a restore or `cp -a` would
        tmp = box / "tmp" / f"{1710000000 + n}.M{n}P2Q{n}.restored,S={len(data)}"
        tmp.write_bytes(data)
        os.rename(tmp, box / "new" / tmp.name)


def _server(where: Path) -> MailServer:
    where.mkdir(parents=True)
    srv = MailServer(where, overrides={"imap": {"allow_plaintext_auth": True}})
    srv.add_domain("example.test")
    srv.add_user(USER, PASSWORD)
    for sub in ("new", "cur", "tmp"):
        (srv.maildir(USER) / sub).mkdir(parents=True, exist_ok=True)
    return srv


FILLED = re.compile(r"background index: \S+/INBOX: full-text rows of (\d+) messages")


def test_first_search_scans_then_the_indexer_adds_the_rows(tmp_path):
    datas = corpus(700) + extra()
    assert len(datas) >= fts.SCAN_MIN  # enough to be scanned, not indexed on the way
    srv = _server(tmp_path / "a")
    box = srv.maildir(USER)
    with srv:
        srv.start()
        wait_done(srv, 1)  # the pass over what was there at the start is over
        _place(box, datas)  # mail arriving behind the running server's back: nobody indexes it
        first = _search(srv)
        files = _files(box)
        uid_base = _uid_bases(box)
        refs = [_reference(files, op, needle) for op, needle in NEEDLES]
        want = [{uid for uid, b in uid_base.items() if b in ref} for ref in refs]
        assert all(want[:-1]) and not want[-1]
        assert first == want
        log = srv.wait_log(FILLED, timeout=60)
        assert int(FILLED.search(log).group(1)) == len(datas)
        assert index_state(box)[1] == set(files)  # every message has its rows now
        assert _search(srv) == want  # answered from the rows: the same
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_kill_while_rows_are_added_leaves_answers_right(tmp_path):
    datas = corpus(700) + extra()
    srv = _server(tmp_path / "a")
    box = srv.maildir(USER)
    with srv:
        srv.start()
        wait_done(srv, 1)
        _place(box, datas)
        first = _search(srv)
        srv.kill()  # kill -9: the indexer may be anywhere in its batches
    rows = index_state(box)[1]
    assert rows <= set(_files(box))
    # restarted without the indexer (rows added on the way), then with it: the same answers
    again = MailServer(tmp_path / "a", overrides={"imap": {"allow_plaintext_auth": True},
                                                  "server": {"background_index": False}})
    with again:
        again.start()
        assert _search(again) == first
        assert index_state(box)[1] == set(_files(box))
        assert again.stop() == 0
