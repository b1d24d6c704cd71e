"""SMTP in through the real server process (`python -m mailstack serve`): a message submitted
on 587 lands in the recipient's Maildir; port 25 refuses to relay; on both event loops."""
from __future__ import annotations

import smtplib

import pytest

from harness import MailServer, wait_for

ALICE, PASSWORD = "alice@example.test", "secret pw"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_submission_to_maildir_and_no_relay(tmp_path, loop):
    with MailServer(tmp_path, loop=loop, listeners=("smtp", "submission", "submissions")) as srv:
        srv.add_domain("example.test")
        srv.add_user(ALICE, PASSWORD)
        srv.start()
        tls = srv.client_tls()
        tls.check_hostname = False  # smtplib checks against 127.0.0.1; the CA check stays
        body = b"Subject: e2e\r\n\r\nHello me.\r\n.dot line\r\n"
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
            s.starttls(context=tls)
            s.login(ALICE, PASSWORD)
            s.sendmail(ALICE, [ALICE], body)
        [delivered] = wait_for(lambda: srv.inbox_messages(ALICE), 15, what="delivery to alice")
        assert delivered.replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n"))
        assert b"by mail.example.test (mailstack) with ESMTPSA id " in delivered
        assert b"Message-ID: <" in delivered and b"\nDate: " in delivered.replace(b"\r\n", b"\n")

        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.ehlo("outside.test")
            s.mail("spammer@remote.test")
            code, msg = s.rcpt("victim@remote.test")
            assert (code, msg) == (554, b"5.7.1 <victim@remote.test>: Relay access denied")
        assert srv.stop() == 0
