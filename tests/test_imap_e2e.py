"""IMAP end to end: the real server process (`python -m mailstack serve`), mail delivered over
SMTP, read by real clients (Python's imaplib, Debian's mbsync, curl, offlineimap)."""
from __future__ import annotations

import imaplib
import smtplib
import socket
import subprocess
import time

import pytest

import sync_clients
from harness import HOSTNAME, MailServer, wait_for

USERS = {"carol@example.test": "c-pass", "dave@example.test": "d-pass", "erin@example.test": "e-pass",
         "frank@example.test": "f-pass"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("imap-e2e"), loop="uvloop")  # what production runs
    srv.add_domain("example.test")
    for user, pw in USERS.items():
        srv.add_user(user, pw)
    srv.start()
    yield srv
    assert srv.stop() == 0


def send(srv, to: str, subject: str, body: str = "hello") -> None:
    msg = (f"From: Sender <sender@remote.example>\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject.replace(' ', '.')}@remote.example>\r\n\r\n{body}\r\n")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.sendmail("sender@remote.example", [to], msg.encode())


def imap(srv, user: str) -> imaplib.IMAP4_SSL:
    ctx = srv.client_tls()
    ctx.check_hostname = False
    c = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=ctx, timeout=10)
    c.login(user, USERS[user])
    return c


def test_smtp_delivery_reaches_idle_session_at_once(server):
    user = "carol@example.test"
    raw = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10)
    f = raw.makefile("rb")
    assert b"STARTTLS" in f.readline()
    raw.sendall(b"a STARTTLS\r\n")
    assert f.readline().startswith(b"a OK")
    ctx = server.client_tls()
    s = ctx.wrap_socket(raw, server_hostname=HOSTNAME)
    f = s.makefile("rb")
    s.sendall(f"b LOGIN {user} {USERS[user]}\r\nc SELECT INBOX\r\nd IDLE\r\n".encode())
    while not f.readline().startswith(b"+ "):
        pass
    t0 = time.monotonic()
    send(server, user, "idle push")
    assert f.readline() == b"* 1 EXISTS\r\n"
    assert time.monotonic() - t0 < 3  # idle_refresh is 30 s: this came through the event path
    s.sendall(b"DONE\r\ne FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    rest = b""
    while b"e OK" not in rest:
        rest += s.recv(4096)
    assert b"Subject: idle push" in rest
    s.close()


def test_uids_survive_a_server_restart(tmp_path):
    srv = MailServer(tmp_path, listeners=("smtp", "imaps"))
    srv.add_domain("example.test")
    srv.add_user("carol@example.test", "c-pass")
    srv.start()
    try:
        for i in range(3):
            send(srv, "carol@example.test", f"restart {i}")
        c = imap(srv, "carol@example.test")
        wait_for(lambda: c.select("INBOX")[1] == [b"3"], what="3 messages")
        uidvalidity = c.response("UIDVALIDITY")[1]
        c.store("2", "+FLAGS", "(\\Deleted \\Seen)")
        c.expunge()
        c.logout()
        srv.kill()
        srv.start()
        c = imap(srv, "carol@example.test")
        c.select("INBOX")
        assert c.response("UIDVALIDITY")[1] == uidvalidity
        assert c.uid("SEARCH", "ALL")[1] == [b"1 3"]
        send(srv, "carol@example.test", "after restart")
        wait_for(lambda: c.noop() and c.uid("SEARCH", "ALL")[1] == [b"1 3 4"], what="UID 4")
        c.logout()
    finally:
        srv.kill()


def test_mbsync_syncs_down_and_changes_back_up(server, tmp_path):
    user = "dave@example.test"
    for i in range(3):
        send(server, user, f"mbsync {i}")
    c = imap(server, user)
    wait_for(lambda: c.select("INBOX")[1] == [b"3"], what="delivery")
    c.logout()
    local, mbsync = sync_clients.mbsync(tmp_path, port=server.ports["imaps"], user=user,
                                        password=USERS[user], cert=server.cert_path)

    mbsync()
    files = sync_clients.maildir_files(local / "INBOX")
    assert len(files) == 3
    assert (local / "Sent").is_dir() and (local / "Trash").is_dir()
    # locally: read one, delete another, file a new message into Archive
    # mbsync stores messages with LF line ends
    by_subject = {f.read_bytes().split(b"\nSubject: ")[1].split(b"\n")[0].rstrip(b"\r"): f for f in files}
    seen = by_subject[b"mbsync 0"]
    seen.rename(local / "INBOX" / "cur" / (seen.name.split(":2,")[0] + ":2,S"))
    by_subject[b"mbsync 1"].unlink()
    (local / "Archive" / "new" / "1700000000.local.host").write_bytes(
        b"From: me@example.test\nSubject: uploaded\n\nfrom mbsync\n")
    mbsync()
    c = imap(server, user)
    c.select("INBOX")
    assert c.search(None, "ALL")[1] == [b"1 2"]
    assert c.search(None, "SEEN")[1] == [b"1"]
    c.select("Archive")
    typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert data[0][1] == b"Subject: uploaded\r\n\r\n"
    c.logout()


def test_curl_lists_and_fetches(server):
    user = "erin@example.test"
    send(server, user, "curl test", body="curl body")
    c = imap(server, user)
    wait_for(lambda: c.select("INBOX")[1] == [b"1"], what="delivery")
    c.logout()
    port = server.ports["imaps"]
    base = ["curl", "-sS", "--cacert", str(server.cert_path), "--resolve", f"{HOSTNAME}:{port}:127.0.0.1",
            "-u", f"{user}:{USERS[user]}", "--max-time", "20"]
    r = subprocess.run(base + [f"imaps://{HOSTNAME}:{port}/"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert '"/" INBOX' in r.stdout and "\\Sent" in r.stdout
    r = subprocess.run(base + [f"imaps://{HOSTNAME}:{port}/INBOX;UID=1"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert "Subject: curl test" in r.stdout and "curl body" in r.stdout
    r = subprocess.run(base + [f"imaps://{HOSTNAME}:{port}/INBOX", "-X", "SEARCH SUBJECT curl"],
                       capture_output=True, text=True, timeout=30)
    assert "* SEARCH 1" in r.stdout


def test_offlineimap_reads_a_message(server, tmp_path):
    user = "frank@example.test"
    send(server, user, "offlineimap test", body="read by offlineimap")
    c = imap(server, user)
    wait_for(lambda: c.select("INBOX")[1] == [b"1"], what="delivery")
    c.logout()
    local = sync_clients.offlineimap(tmp_path, port=server.ports["imaps"], user=user,
                                     password=USERS[user], cert=server.cert_path)
    got = [p.read_bytes() for sub in ("new", "cur") for p in (local / "INBOX" / sub).iterdir()]
    assert len(got) == 1 and b"read by offlineimap" in got[0]
