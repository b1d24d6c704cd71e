"""POP3 through the real server process: mail sent over SMTP, downloaded by poplib, fetchmail,
getmail6 and curl; deletions seen by an IMAP session; UIDLs across a restart."""
from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl

import pytest

from harness import MailServer, wait_for
from pop3_clients import curl, fetchmail, getmail

USER, PASSWORD = "carol@example.test", "carol secret"


@pytest.fixture
def srv(tmp_path):
    (tmp_path / "srv").mkdir()
    server = MailServer(tmp_path / "srv")
    server.add_domain("example.test")
    server.add_user(USER, PASSWORD)
    server.start()
    yield server
    server.kill()


def send(srv, subject: str, body: str) -> None:
    msg = f"From: sender@remote.test\r\nTo: {USER}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.sendmail("sender@remote.test", [USER], msg.encode())


def tls(srv) -> ssl.SSLContext:
    ctx = srv.client_tls()
    ctx.check_hostname = False  # the certificate is pinned; we dial 127.0.0.1, it names mail.example.test
    return ctx


def pop3s(srv) -> poplib.POP3_SSL:
    p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls(srv), timeout=10)
    p.user(USER)
    p.pass_(PASSWORD)
    return p


def count_over_pop3(srv) -> int:
    p = pop3s(srv)
    n = p.stat()[0]
    p.quit()
    return n


def subjects(messages: list[bytes]) -> list[str]:
    out = []
    for m in messages:
        for line in m.replace(b"\r\n", b"\n").split(b"\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
                break
    return sorted(out)


def test_mail_sent_over_smtp_is_fetched_by_real_clients(srv, tmp_path):
    for i in range(3):
        send(srv, f"hello {i}", f"body {i}\r\n.line with a leading dot\r\nend")
    wait_for(lambda: len(srv.inbox_messages(USER)) == 3, 20, what="local delivery")

    # curl: LIST and RETR over STLS and over 995.
    for implicit in (False, True):
        port = srv.ports["pop3s" if implicit else "pop3"]
        r = curl(port, srv.cert_path, USER, PASSWORD, "/", implicit_tls=implicit)
        assert r.returncode == 0, r.stderr
        listing = [line.split() for line in r.stdout.decode().splitlines()]
        assert [n for n, _ in listing] == ["1", "2", "3"]
        r = curl(port, srv.cert_path, USER, PASSWORD, "/2", implicit_tls=implicit)
        assert r.returncode == 0, r.stderr
        assert b"\r\n.line with a leading dot\r\n" in r.stdout
        assert len(r.stdout) == int(listing[1][1])  # LIST size = the message, without stuffing

    # fetchmail (STLS) and getmail6 (995) in keep mode: everything downloaded, nothing deleted.
    r, got = fetchmail(tmp_path / "fm", srv.ports["pop3"], srv.cert_path, USER, PASSWORD, keep=True,
                       implicit_tls=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subjects(got) == ["hello 0", "hello 1", "hello 2"]
    assert all(b".line with a leading dot\n" in m.replace(b"\r\n", b"\n") for m in got)
    r, got = getmail(tmp_path / "gm", srv.ports["pop3s"], srv.cert_path, USER, PASSWORD, delete=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subjects(got) == ["hello 0", "hello 1", "hello 2"]
    assert count_over_pop3(srv) == 3

    # One more message; getmail in delete mode fetches only the new one (UIDLs remembered), deletes all.
    send(srv, "hello 3", "fourth")
    wait_for(lambda: len(srv.inbox_messages(USER)) == 4, 20, what="local delivery")
    r, got = getmail(tmp_path / "gm", srv.ports["pop3s"], srv.cert_path, USER, PASSWORD, delete=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subjects(got) == ["hello 0", "hello 1", "hello 2", "hello 3"]
    assert count_over_pop3(srv) == 0
    assert srv.inbox_messages(USER) == []

    # fetchmail in delete mode over 995.
    send(srv, "hello 4", "fifth")
    wait_for(lambda: len(srv.inbox_messages(USER)) == 1, 20, what="local delivery")
    r, got = fetchmail(tmp_path / "fm2", srv.ports["pop3s"], srv.cert_path, USER, PASSWORD, keep=False,
                       implicit_tls=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subjects(got) == ["hello 4"]
    assert srv.inbox_messages(USER) == []


def test_imap_session_sees_pop3_deletions_as_expunged(srv):
    for i in range(3):
        send(srv, f"m{i}", "x")
    wait_for(lambda: len(srv.inbox_messages(USER)) == 3, 20, what="local delivery")
    imap = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=tls(srv), timeout=10)
    imap.login(USER, PASSWORD)
    typ, data = imap.select("INBOX")
    assert typ == "OK" and int(data[0]) == 3
    p = pop3s(srv)
    p.dele(1)
    p.dele(3)
    p.quit()
    typ, _ = imap.noop()
    expunged = imap.untagged_responses.get("EXPUNGE", [])
    assert len(expunged) == 2, imap.untagged_responses
    typ, data = imap.search(None, "ALL")
    assert data[0].split() == [b"1"]
    imap.logout()


def test_uidl_and_deletions_survive_a_restart(srv):
    for i in range(2):
        send(srv, f"r{i}", "x")
    wait_for(lambda: len(srv.inbox_messages(USER)) == 2, 20, what="local delivery")
    p = pop3s(srv)
    before = p.uidl()[1]
    p.dele(1)
    p.quit()
    assert srv.stop() == 0
    srv.start()
    p = pop3s(srv)
    assert p.uidl()[1] == [b"1 " + before[1].split()[1]]
    p.quit()


def test_second_pop3_session_gets_in_use(srv):
    p = pop3s(srv)
    q = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls(srv), timeout=10)
    q.user(USER)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        q.pass_(PASSWORD)
    p.quit()
    q.quit()


def test_plaintext_login_refused_without_tls(srv):
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=10)
    assert "STLS" in p.capa()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.user(USER)
    p.stls(tls(srv))
    p.user(USER)
    p.pass_(PASSWORD)
    assert p.stat() == (0, 0)
    p.quit()
