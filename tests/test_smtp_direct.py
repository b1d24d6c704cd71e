"""Delivery at accept time (queue/direct.py), through the real server process: mail for
local accounts only is in the Maildir when the "250" arrives, with no queue file; mail with
a remote recipient, and an account whose delivery does not end "sent", go through the
queue as before.  (The kill -9 crash test is tests/test_queue_e2e.py.)"""
from __future__ import annotations

import os
import smtplib

import pytest

from harness import MailServer, wait_for

ALICE, BOB, PASSWORD = "alice@example.test", "bob@example.test", "secret pw"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("direct"), {
        "senderauth": {"enabled": False},  # no DNS here; what is tested is the delivery path
        "delivery": {"outbound": False},
    }, listeners=("smtp",))
    srv.add_domain("example.test")
    srv.add_user(ALICE, PASSWORD)
    srv.add_user(BOB, PASSWORD)
    srv.cli("alias", "add", "team@example.test", BOB, "someone@remote.test")  # one local, one remote
    srv.start()
    yield srv
    srv.stop()


def queue_files(srv) -> list[str]:
    q = srv.data_dir / "queue"
    return [f"{s}/{n}" for s in ("incoming", "active", "deferred", "hold")
            if (q / s).is_dir() for n in os.listdir(q / s)]


def send(srv, rcpts, subject: str) -> None:
    body = f"From: x@remote.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.sendmail("x@remote.test", rcpts, body)


def has(srv, account: str, subject: str) -> bool:
    return any(f"Subject: {subject}\r\n".encode() in m for m in srv.inbox_messages(account))


def test_local_mail_is_in_the_maildir_when_250_comes_and_never_queued(server):
    before = len(server.inbox_messages(ALICE))
    send(server, [ALICE, "Alice@Example.test"], "direct one")
    # No waiting: the 250 was said after the Maildir file (and its directory) was fsynced.
    assert has(server, ALICE, "direct one")
    assert len(server.inbox_messages(ALICE)) == before + 1  # one account, once
    assert queue_files(server) == []
    log = wait_for(lambda: "status=sent (delivered to maildir)" in server.log() and server.log(), 10,
                   what="the delivery log line")
    assert "relay=local" in log


def test_final_delivery_puts_return_path_and_delivered_to_on_top_of_the_bytes_received(server):
    # RFC 5321 section 4.4: final delivery inserts the envelope sender as Return-Path; and,
    # as Postfix's local/virtual agents and Dovecot's LDA do, the account as Delivered-To.
    body = b"From: x@remote.test\r\nSubject: final one\r\n\r\nbody of final one\r\n"
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("Someone+tag@Remote.test", ["team@example.test", ALICE], body)
        s.sendmail("", [ALICE], body.replace(b"final one", b"bounce one"))  # the null sender: <>
    # with a remote recipient (in team@) the message goes through the queue: wait for it
    copies = {acct: wait_for(lambda: next((m for m in server.inbox_messages(acct) if b"Subject: final one\r\n" in m),
                                          None), 15, what=f"{acct}'s copy") for acct in (ALICE, BOB)}
    for acct, data in copies.items():
        head = f"Return-Path: <Someone+tag@Remote.test>\r\nDelivered-To: {acct}\r\n".encode()
        assert data.startswith(head), data[:200]
        assert data.endswith(body) and b"\r\nReceived: " in data  # the rest as queued, once each
        assert data.count(b"Return-Path:") == 1 and data.count(b"Delivered-To:") == 1
    bounce = next(m for m in server.inbox_messages(ALICE) if b"Subject: bounce one\r\n" in m)
    assert bounce.startswith(f"Return-Path: <>\r\nDelivered-To: {ALICE}\r\n".encode())
    # The remote part of team@ (outbound is off) waits in the queue without those lines: they
    # belong to the final delivery only.
    wait_for(lambda: any(f.startswith("deferred/") for f in queue_files(server)), 15, what="deferred remote")
    for f in queue_files(server):
        assert b"Return-Path:" not in (server.data_dir / "queue" / f).read_bytes()


def test_a_return_path_the_client_sent_is_dropped_so_the_only_one_is_the_final_deliverys(server):
    # A Return-Path in the message as received is not trace from this system: a sender could
    # forge the envelope a reader sees.  As Postfix's cleanup does (message_drop_headers), it
    # is removed on the way in, folded continuation lines included, whatever its case.
    body = (b"From: x@remote.test\r\nreturn-PATH: <forged@evil.test>\r\n"
            b"Subject: forged rp\r\nRETURN-PATH:\r\n <also@evil.test>\r\nX-Keep: Return-Path: in a value\r\n"
            b"\r\nReturn-Path: <in the body stays>\r\n")
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("real@remote.test", [ALICE], body)
    data = next(m for m in server.inbox_messages(ALICE) if b"Subject: forged rp\r\n" in m)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"Return-Path: <real@remote.test>\r\n"), head
    assert b"evil.test" not in head and head.lower().count(b"return-path:") == 2  # ours + X-Keep's value
    assert b"\r\nFrom: x@remote.test\r\nSubject: forged rp\r\nX-Keep: Return-Path: in a value" in head
    assert rest == b"Return-Path: <in the body stays>\r\n"


def test_a_remote_recipient_sends_the_whole_message_through_the_queue(server):
    send(server, ["team@example.test"], "mixed")
    # outbound is off: the remote part stays deferred, so the queue file stays
    wait_for(lambda: has(server, BOB, "mixed"), 15, what="bob's copy")
    wait_for(lambda: any(f.startswith("deferred/") for f in queue_files(server)), 15, what="deferred remote")


def test_an_account_not_delivered_at_once_is_queued_and_the_others_keep_their_copy(server):
    # bob's script rejects; with two recipients the DATA-time reject does not apply
    # (RFC 5429: one recipient only), so delivery runs it: alice has it at once, bob's part
    # goes to the queue, which rejects again and bounces to the sender.
    server.cli("sieve", "put", BOB, "rej", input='require "reject";\nreject "not here";\n')
    server.cli("sieve", "activate", BOB, "rej")
    try:
        send(server, [ALICE, BOB], "half")
        assert has(server, ALICE, "half")
        wait_for(lambda: "<bob@example.test>" in server.log() and "status=bounced" in server.log(), 15,
                 what="bob's rejection through the queue")
        assert not has(server, BOB, "half")
        assert sum(b"Subject: half\r\n" in m for m in server.inbox_messages(ALICE)) == 1
    finally:
        server.cli("sieve", "deactivate", BOB)
