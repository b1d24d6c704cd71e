"""The Sieve scripts of a single recipient are read at RCPT (sieve/stage.py) and used at
DATA and by the delivery at accept time: several transactions in one session, each with
the right account's scripts; a second recipient drops the DATA-time evaluation."""
from __future__ import annotations

import smtplib

import pytest

from harness import MailServer, wait_for

CAROL, DAVE = "carol@example.test", "dave@example.test"
REJECT = 'require "reject";\nif header :contains "Subject" "spam" { reject "Go away"; }\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("sieve-rcpt"), {
        "senderauth": {"enabled": False},  # no DNS here
        "delivery": {"outbound": False},
    }, listeners=("smtp",))
    srv.add_domain("example.test")
    srv.add_user(CAROL, "carol pw")
    srv.add_user(DAVE, "dave pw")
    srv.start()
    srv.cli("sieve", "put", CAROL, "rej", input=REJECT)
    srv.cli("sieve", "activate", CAROL, "rej")
    yield srv
    srv.stop()


def body(to: str, subject: str) -> bytes:
    return f"From: z@remote.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def subjects(srv, account: str) -> set[str]:
    return {m.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in srv.inbox_messages(account)}


def test_each_transaction_of_a_session_uses_its_own_recipients_scripts(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:  # carol's script, read at her RCPT
            s.sendmail("z@remote.test", [CAROL], body(CAROL, "spam one"))
        assert e.value.smtp_code == 550 and b"Go away" in e.value.smtp_error
        s.sendmail("z@remote.test", [DAVE], body(DAVE, "spam two"))  # dave has no script
        s.sendmail("z@remote.test", [CAROL], body(CAROL, "fine three"))  # carol's, not matching
        with pytest.raises(smtplib.SMTPDataError):
            s.sendmail("z@remote.test", [CAROL], body(CAROL, "spam four"))
    assert "spam two" in subjects(server, DAVE)
    assert subjects(server, CAROL) >= {"fine three"} and not {"spam one", "spam four"} & subjects(server, CAROL)


def test_a_second_recipient_means_no_reject_at_data(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        refused = s.sendmail("z@remote.test", [CAROL, DAVE], body(DAVE, "spam five"))
    assert refused == {}  # accepted for both: carol's reject happens at delivery (a bounce)
    wait_for(lambda: "spam five" in subjects(server, DAVE), 10, what="dave's copy")
    assert "spam five" not in subjects(server, CAROL)
