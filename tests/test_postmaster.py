"""Mail that must always arrive (RFC 5321 4.5.1, RFC 2142, Postfix's mydestination habits):
postmaster@ and abuse@ every local domain and the bare <postmaster>, root/MAILER-DAEMON at
localhost or the server's own name, delivered to the postmaster account without setup; an
explicit alias still wins; addresses of this host are never relayed."""
from __future__ import annotations

import smtplib

import pytest

from harness import HOSTNAME, MailServer, wait_for
from mailstack.directory import Directory, hash_password

PM, OTHER = "boss@example.test", "zed@other.test"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with MailServer(tmp_path_factory.mktemp("pm"), listeners=("smtp",)) as srv:
        srv.add_domain("example.test")
        srv.add_domain("other.test")
        srv.add_user(PM, "boss password 1")  # the first account made: the default postmaster
        srv.add_user(OTHER, "zed password 1")
        srv.add_user("abuse@other.test", "abuse password 1")  # an explicit account wins
        srv.start()
        yield srv
        assert srv.stop() == 0


def rcpt(srv, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        s.mail("someone@elsewhere.test")
        return s.rcpt(address)


@pytest.mark.parametrize("address", ["postmaster", "POSTMASTER", "PostMaster", "postmaster@example.test",
                                     "POSTMASTER@OTHER.TEST", "abuse@example.test", "root@localhost",
                                     f"root@{HOSTNAME}", "MAILER-DAEMON@localhost", "postmaster@localhost"])
def test_role_addresses_accepted_without_setup(srv, address):
    code, reply = rcpt(srv, address)
    assert code == 250, (address, reply)


@pytest.mark.parametrize("address", ["nosuchname@localhost", "nosuchuser@example.test", "x@elsewhere.test"])
def test_other_addresses_still_refused(srv, address):
    code, _ = rcpt(srv, address)
    assert code in (550, 554)


def test_postmaster_mail_delivered_to_first_account(srv):
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        s.sendmail("someone@elsewhere.test", ["postmaster", "root@localhost", "abuse@other.test"],
                   b"Subject: pm-test\r\n\r\nhello\r\n")
    wait_for(lambda: any(b"pm-test" in m for m in srv.inbox_messages(PM)), what="postmaster mail")
    wait_for(lambda: any(b"pm-test" in m for m in srv.inbox_messages("abuse@other.test")), what="abuse account")
    assert not any(b"pm-test" in m for m in srv.inbox_messages(OTHER))
    wait_for(lambda: "to=<boss@example.test>, orig_to=<postmaster>, relay=local" in srv.log(), what="log")
    assert "to=<root@localhost>, relay=" not in srv.log()  # never relayed


def test_resolution_rules(tmp_path):
    d = Directory(tmp_path, hostname="mail.example.test")
    d.add_domain("example.test")
    d.accounts["b@example.test"] = hash_password("x")
    d.accounts["a@example.test"] = hash_password("x")
    d.save()
    d = Directory(tmp_path, hostname="mail.example.test")
    assert d.postmaster_account() == "b@example.test"  # the first made, not the first sorted
    assert d.resolve("postmaster").targets == ("b@example.test",)
    assert d.resolve("root").targets == ("b@example.test",)
    assert d.resolve("root@mail.example.test").kind == "alias"
    assert d.resolve("someone@mail.example.test").kind == "unknown"
    assert d.resolve("root@other.test").kind == "remote"
    assert d.expand("Postmaster@Example.Test") == (["b@example.test"], [])
    # the key names another account; an explicit alias still wins
    d.postmaster = "a@example.test"
    assert d.resolve("abuse@example.test").targets == ("a@example.test",)
    d.add_alias("postmaster@example.test", ["ext@remote.test"])
    assert d.expand("postmaster@example.test") == ([], ["ext@remote.test"])
    # a system user's cron mail (e.g. daemon@<hostname>) reaches the postmaster too
    assert d.resolve("daemon").kind == "alias"
    # no account at all: refused (never accepted to be lost)
    empty = Directory(tmp_path / "empty", hostname="h.example")
    assert empty.resolve("postmaster").kind == "unknown"
