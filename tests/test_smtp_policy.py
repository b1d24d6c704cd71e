"""Policy and header fix-ups, as pure functions (policy.py, cleanup.py, budget.py)."""
from __future__ import annotations

import ipaddress
from email.utils import parsedate_to_datetime

import pytest

from mailstack.smtp import cleanup, policy
from mailstack.smtp.budget import DataBudget

NETS = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]


def client(listener="smtp", auth=None, trusted=False, tls=False):
    return policy.Client(ip="198.51.100.7", listener=listener, tls=tls, auth_user=auth, trusted=trusted)


def test_trusted_networks():
    assert policy.is_trusted("192.0.2.10", NETS)
    assert policy.is_trusted("::ffff:192.0.2.10", NETS)  # IPv4-mapped on a dual-stack socket
    assert policy.is_trusted("2001:db8::1", NETS)
    assert not policy.is_trusted("198.51.100.1", NETS)
    assert not policy.is_trusted("not an ip", NETS)
    assert not policy.is_trusted(None, NETS)
    assert not policy.is_trusted("192.0.2.10", [])


@pytest.mark.parametrize("kind,who,expected", [
    ("local", client(), None),
    ("alias", client(), None),
    ("unknown", client(), "550 5.1.1 <x@y>: Recipient address rejected: user unknown"),
    ("unknown", client(auth="a@b"), "550 5.1.1 <x@y>: Recipient address rejected: user unknown"),
    ("remote", client(), "554 5.7.1 <x@y>: Relay access denied"),
    ("remote", client(tls=True), "554 5.7.1 <x@y>: Relay access denied"),
    ("remote", client(auth="a@b"), None),
    ("remote", client(trusted=True), None),
])
def test_recipient_decisions(kind, who, expected):
    assert policy.check_recipient("x@y", kind, who) == expected


def test_sender_decisions():
    def owns(account, address):
        return address == account

    assert policy.check_sender("anyone@anywhere", client(), owns) is None
    assert policy.check_sender("", client(), owns) is None
    assert policy.check_sender("a@b", client(auth="a@b"), owns) is None
    assert policy.check_sender("c@d", client(auth="a@b"), owns) == \
        "553 5.7.1 <c@d>: Sender address rejected: not owned by user"
    assert policy.check_sender("", client(auth="a@b"), owns).startswith("553 5.7.1")


def test_mail_allowed_and_limits():
    assert policy.check_mail_allowed(client("submission")) == "530 5.7.0 Authentication required"
    assert policy.check_mail_allowed(client("submissions")).startswith("530 5.7.0")
    assert policy.check_mail_allowed(client("submission", auth="a@b")) is None
    assert policy.check_mail_allowed(client("smtp")) is None
    assert policy.check_recipient_count(2, 3) is None
    assert policy.check_recipient_count(3, 3) == "452 4.5.3 Too many recipients"
    assert policy.check_declared_size(10, 10) is None
    assert policy.check_declared_size(11, 10).startswith("552 5.3.4")
    assert policy.check_address_charset("ü@b", False).startswith("553 5.6.7")
    assert policy.check_address_charset("ü@b", True) is None


def test_what_is_offered_where():
    assert policy.starttls_offered("smtp", False) and policy.starttls_offered("submission", False)
    assert not policy.starttls_offered("submissions", True) and not policy.starttls_offered("smtp", True)
    assert not policy.auth_offered("smtp", False) and policy.auth_offered("smtp", True)


def test_protocol_names():
    assert cleanup.protocol_name(False, False, False) == "SMTP"
    assert cleanup.protocol_name(True, False, False) == "ESMTP"
    assert cleanup.protocol_name(True, True, False) == "ESMTPS"
    assert cleanup.protocol_name(True, True, True) == "ESMTPSA"


def test_received_header_is_folded_and_safe():
    h = cleanup.received_header(helo="evil\r\nBcc: x (y)", rdns=None, ip="192.0.2.1", hostname="mx.test",
                                protocol="ESMTPS", qid="ABC", tls="TLSv1.3 with cipher X (256/256 bits)",
                                when=0)
    lines = h.split(b"\r\n")
    assert lines[0] == b"Received: from evil??Bcc: x ?y? (unknown [192.0.2.1])"
    assert lines[1] == b"\t(using TLSv1.3 with cipher X (256/256 bits))"
    assert lines[2] == b"\tby mx.test (mailstack) with ESMTPS id ABC;"
    assert parsedate_to_datetime(lines[3][1:].decode()).timestamp() == 0 and lines[4] == b""


def test_header_block_and_missing_fields():
    chunks = [b"Subject: a\r\nmessage-ID: <x@y>\r", b"\n", b"\r\nbody\r\nDate: not a header\r\n"]
    head = cleanup.header_block(chunks)
    assert head == b"Subject: a\r\nmessage-ID: <x@y>\r\n"
    assert cleanup.missing_fields(head) == (False, True)
    assert cleanup.header_block([b"\r\nbody\r\n"]) == b""
    assert cleanup.missing_fields(b"X-Date: 1\r\nX-Message-ID: 2\r\n") == (True, True)
    added = cleanup.submission_fields(b"Subject: a\r\n", "mx.test", when=0)
    msgid, date, end = added.split(b"\r\n")
    assert msgid.startswith(b"Message-ID: <") and msgid.endswith(b"@mx.test>") and end == b""
    assert date.startswith(b"Date: ") and parsedate_to_datetime(date[6:].decode()).timestamp() == 0
    assert cleanup.submission_fields(b"Date: x\r\nMessage-Id: <a@b>\r\n", "mx.test") == b""


def test_without_return_path_drops_the_field_and_its_folds_across_chunks_and_nothing_else():
    chunks = [b"Return-Path: <a@b>\r\nSubject: x\r\nX-Return-Path: kept\r\nreturn-path:\r", b"\n\t<c@d>\r\n",
              b" <e@f>\r\nTo: t\r\n\r\nReturn-Path: <body>\r\n"]
    out = cleanup.without_return_path(chunks, cleanup.header_block(chunks))
    assert b"".join(out) == b"Subject: x\r\nX-Return-Path: kept\r\nTo: t\r\n\r\nReturn-Path: <body>\r\n"
    plain = [b"Subject: x\r\n\r\nReturn-Path: <body>\r\n"]
    assert cleanup.without_return_path(plain, cleanup.header_block(plain)) is plain  # no copy


def test_data_budget():
    b = DataBudget(100)
    assert b.reserve(60) and not b.reserve(41) and b.reserve(40)
    b.release(100)
    assert b.used == 0 and b.reserve(100)
