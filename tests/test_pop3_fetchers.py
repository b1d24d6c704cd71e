"""Real POP3 clients from Debian (fetchmail, getmail6, curl) against the in-process POP3 server.

(tests/test_pop3_e2e.py does the same through the real server process with mail sent over SMTP.)
"""
from __future__ import annotations

import pytest

from pop3_clients import curl, fetchmail, getmail
from pop3_fixture import PASSWORD, USER, POP3Server

MESSAGES = [
    b"From: a@example.test\nSubject: one\n\nfirst body\n.leading dot\n",
    b"From: b@example.test\r\nSubject: two\r\n\r\nsecond body\r\n",
    b"From: c@example.test\r\nSubject: three\r\n\r\n" + b"x" * 300 + b"\r\n" * 3 + b"last",
]


def as_received(msg: bytes) -> bytes:
    """What a client stores: LF line ends, a final newline."""
    out = msg.replace(b"\r\n", b"\n")
    return out if out.endswith(b"\n") else out + b"\n"


def bodies(found: list[bytes]) -> list[bytes]:
    # Fetchers add headers (Received:, Return-Path:) on top; compare from our first header on.
    out = []
    for m in found:
        m = m.replace(b"\r\n", b"\n")
        out.append(m[m.index(b"From: "):])
    return sorted(out)


@pytest.fixture
def srv(tmp_path):
    server = POP3Server(tmp_path)
    for msg in MESSAGES:
        server.deliver(USER, msg)
    yield server
    server.stop()


def server_count(srv) -> int:
    p = srv.login()
    n = p.stat()[0]
    p.quit()
    return n


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_keep_then_delete(srv, tmp_path, implicit_tls):
    port = srv.ports["pop3s" if implicit_tls else "pop3"]
    work = tmp_path / "fm"
    r, got = fetchmail(work, port, srv.cert, USER, PASSWORD, keep=True, implicit_tls=implicit_tls)
    assert r.returncode == 0, r.stdout + r.stderr
    assert bodies(got) == sorted(as_received(m) for m in MESSAGES)
    assert server_count(srv) == 3  # keep: nothing deleted
    r, got = fetchmail(work, port, srv.cert, USER, PASSWORD, keep=False, implicit_tls=implicit_tls)
    assert r.returncode == 0, r.stdout + r.stderr
    assert server_count(srv) == 0  # nokeep: deleted at QUIT
    assert len(got) == 6  # fetchall: downloaded again, then deleted


def test_getmail_keep_then_delete(srv, tmp_path):
    work = tmp_path / "gm"
    r, got = getmail(work, srv.ports["pop3s"], srv.cert, USER, PASSWORD, delete=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert bodies(got) == sorted(as_received(m) for m in MESSAGES)
    assert server_count(srv) == 3
    # read_all = false: the UIDLs it saw are remembered, so a second run fetches nothing new.
    srv.deliver(USER, b"Subject: four\n\nfourth\n")
    r, got = getmail(work, srv.ports["pop3s"], srv.cert, USER, PASSWORD, delete=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(got) == 4
    assert server_count(srv) == 0


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "pop3s"])
def test_curl_lists_and_retrieves(srv, implicit_tls):
    port = srv.ports["pop3s" if implicit_tls else "pop3"]
    r = curl(port, srv.cert, USER, PASSWORD, "/", implicit_tls=implicit_tls)
    assert r.returncode == 0, r.stderr
    listing = [line.split() for line in r.stdout.decode().splitlines()]
    assert [n for n, _ in listing] == ["1", "2", "3"]
    for n, size in listing:
        r = curl(port, srv.cert, USER, PASSWORD, f"/{n}", implicit_tls=implicit_tls)
        assert r.returncode == 0, r.stderr
        # curl undoes dot-stuffing and passes the CRLF lines through.
        sent = MESSAGES[int(n) - 1]
        assert r.stdout.replace(b"\r\n", b"\n") == as_received(sent)
        # RFC 1939 (and Dovecot): the size is the message's, without the stuffing, and
        # without the line end RETR must add to a message that has none
        assert len(r.stdout) == int(size) + (0 if sent.endswith(b"\n") else 2)
    # AUTH PLAIN with the initial response on the AUTH line (curl's --sasl-ir).
    r = curl(port, srv.cert, USER, PASSWORD, "/1", implicit_tls=implicit_tls, extra=("--sasl-ir",))
    assert r.returncode == 0 and r.stdout.startswith(b"From: a@")
    r = curl(port, srv.cert, USER, "wrong", "/", implicit_tls=implicit_tls)
    assert r.returncode != 0
