"""The README's walk-through, for real: domain and user from the CLI, a message with swaks on
port 25, and the same through 465 and 587; each lands in the Maildir byte for byte, with only
the Received: header in front."""
from __future__ import annotations

import re
import smtplib
import subprocess

import pytest

from harness import MailServer, wait_for

ALICE, PASSWORD = "alice@example.test", "correct horse"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with MailServer(tmp_path_factory.mktemp("walk"), loop="uvloop") as srv:
        srv.add_domain("example.test")
        srv.add_user(ALICE, PASSWORD)
        srv.start()
        yield srv
        assert srv.stop() == 0


def message(tag: str) -> bytes:
    # Complete headers (Date, Message-ID), so submission adds nothing and the comparison is exact.
    return (f"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: {tag}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@example.test>\r\n"
            f"\r\nBody of {tag}.\r\n..a line that starts with a dot\r\nlast line\r\n").encode()


def delivered(srv, tag: str) -> bytes:
    def find():
        for m in srv.inbox_messages(ALICE):
            if f"<{tag}@example.test>".encode() in m:
                return m
    return wait_for(find, what=f"{tag} in the Maildir")


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(our Received: line, the rest after our Authentication-Results: (senderauth)), under the
    final delivery's Return-Path and Delivered-To."""
    m = re.match(rb"Return-Path: <[^\r\n>]*>\r\nDelivered-To: alice@example\.test\r\n"
                 rb"(Received: [^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n)"
                 rb"Authentication-Results: mail\.example\.test;[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n", data)
    assert m, data[:400]
    return m.group(1), data[m.end():]


def unstuff(data: bytes) -> bytes:
    return data.replace(b"\r\n..", b"\r\n.")


def test_swaks_port25_as_in_the_readme(srv):
    tag = "swaks25"
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{srv.ports['smtp']}", "--helo", "client.test",
                        "--from", "someone@elsewhere.test", "--to", ALICE, "--data", "-"],
                       input=message(tag)[:-2], capture_output=True, timeout=60)  # swaks ends with CRLF . CRLF
    assert r.returncode == 0, r.stdout.decode()
    queued = re.search(rb"250 2\.0\.0 Ok: queued as (\w+)", r.stdout)
    assert queued, r.stdout.decode()
    got = delivered(srv, tag)
    received, rest = split_received(got)
    assert rest == message(tag)
    assert b"from client.test (localhost [127.0.0.1])" in received
    assert b"by mail.example.test (mailstack) with ESMTP id " + queued.group(1) in received
    # and the delivery was logged the Postfix way, with the queue id
    qid = queued.group(1).decode()
    wait_for(lambda: f"{qid}: to=<{ALICE}>, relay=local" in srv.log(), what="delivery log line")


def test_smtplib_465_implicit_tls_with_auth(srv):
    tag = "smtplib465"
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=srv.client_tls(), timeout=30) as s:
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, [ALICE], message(tag))
    received, rest = split_received(delivered(srv, tag))
    assert rest == unstuff(message(tag).replace(b"\r\n..", b"\r\n..."))  # smtplib dot-stuffs itself
    assert b"with ESMTPSA id" in received


def test_swaks_587_starttls_with_auth(srv):
    tag = "swaks587"
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{srv.ports['submission']}", "--helo", "client.test",
                        "--tls", "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
                        "--from", ALICE, "--to", ALICE, "--data", "-"],
                       input=message(tag)[:-2], capture_output=True, timeout=60)  # swaks ends with CRLF . CRLF
    assert r.returncode == 0, r.stdout.decode()
    received, rest = split_received(delivered(srv, tag))
    assert rest == message(tag)
    assert b"with ESMTPSA id" in received


def test_submission_adds_message_id_and_date_when_missing(srv):
    bare = b"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: bare\r\n\r\nno id\r\n"
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
        s.starttls(context=srv.client_tls())
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, [ALICE], bare)

    def find():
        return [m for m in srv.inbox_messages(ALICE) if b"Subject: bare" in m]
    [got] = wait_for(find, what="bare message")
    head = got.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"\r\nMessage-ID: <[^>]+@mail\.example\.test>", head)
    assert re.search(rb"\r\nDate: \w{3}, \d", head)
    assert got.endswith(b"\r\n\r\nno id\r\n")
