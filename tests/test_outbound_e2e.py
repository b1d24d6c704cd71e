"""Outbound delivery through the real server process: submission 587 -> queue ->
RemoteDelivery -> a receiving SMTP server on 127.0.0.2, with MX and the DKIM key
served by a DNS server on loopback."""
from __future__ import annotations

import re
import smtplib

import dkim as dkimpy
import pytest

from tests.dnsserver import DNSServer
from tests.harness import HOSTNAME, MailServer, wait_for
from tests.smtpsink import Sink, free_port_on, self_signed_context
from tests.test_dkim import txt_lookup

MX = "127.0.0.2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # One server for the module: starting it and running the CLI costs seconds.
    tmp_path = tmp_path_factory.mktemp("outbound-e2e")
    dns = DNSServer({"remote.test": {"MX": [(10, "mx.remote.test")]},
                     "mx.remote.test": {"A": [MX]}}).start()
    port = free_port_on(MX)
    sink = Sink(MX, port, tls=self_signed_context(tmp_path, "mx.remote.test"),
                rcpt_replies={"gone@remote.test": "550 5.1.1 <gone@remote.test>: no such user",
                              "later@remote.test": "450 4.2.1 mailbox busy, try later"}).start()
    srv = MailServer(tmp_path, overrides={
        "dns": {"nameservers": [dns.address], "timeout": 2.0},
        "delivery": {"port": port, "connect_timeout": 3.0, "command_timeout": 10.0},
        "queue": {"retry_min": 0.3, "retry_max": 1.0},
    }, listeners=("smtp", "submission"))
    srv.add_domain("example.test")
    srv.add_user("alice@example.test", "alice-pw")
    # Publish exactly what `mailstack dkim keygen` tells the operator to publish.
    out = srv.cli("dkim", "keygen", "example.test").stdout
    record_line = next(line for line in out.splitlines() if line.startswith("mail._domainkey.example.test."))
    dns.add("mail._domainkey.example.test", "TXT", "".join(re.findall(r'"([^"]*)"', record_line)))
    srv.start()
    yield srv, dns, sink
    srv.stop()
    sink.stop()
    dns.stop()


def submit(srv: MailServer, rcpts: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s._host = HOSTNAME  # smtplib checks the certificate against the name it connected to
        s.starttls(context=srv.client_tls())
        s.login("alice@example.test", "alice-pw")
        s.sendmail("alice@example.test", rcpts,
                   f"From: Alice <alice@example.test>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject}@example.test>\r\n\r\nHello from the e2e test.\r\n.dot line\r\n")


def test_submission_to_remote_mx_signed_over_tls(world):
    srv, dns, sink = world
    submit(srv, ["bob@remote.test"], "e2e-1")
    msg = wait_for(lambda: next((m for m in sink.messages if b"e2e-1" in m.content), None), 20,
                   what="the message at the remote MX")
    assert msg.rcpt_tos == ["bob@remote.test"] and msg.mail_from == "alice@example.test"
    assert msg.tls and msg.helo == "mail.example.test"
    assert b"\r\n.dot line\r\n" in msg.content
    assert msg.content.startswith(b"DKIM-Signature:") or b"\nDKIM-Signature:" in msg.content
    assert dkimpy.verify(msg.content, dnsfunc=txt_lookup(dns))


def test_5xx_bounces_to_sender_and_4xx_is_retried(world):
    srv, dns, sink = world
    submit(srv, ["gone@remote.test", "later@remote.test"], "e2e-2")
    # The 4xx recipient is deferred; once the remote side is happy, a retry delivers it.
    wait_for(lambda: "later@remote.test" in sink.rcpt_seen, 20, what="the first attempt")
    del sink.rcpt_replies["later@remote.test"]
    msg = wait_for(lambda: next((m for m in sink.messages if b"e2e-2" in m.content), None), 20,
                   what="the retried delivery")
    assert msg.rcpt_tos == ["later@remote.test"]
    # The 5xx recipient gets the sender a DSN naming it and the remote reply.
    dsn = wait_for(lambda: next((m for m in srv.inbox_messages("alice@example.test")
                                 if b"gone@remote.test" in m), None), 20, what="the bounce in alice's INBOX")
    assert b"multipart/report" in dsn
    assert b"no such user" in dsn
