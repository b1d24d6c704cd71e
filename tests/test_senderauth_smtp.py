"""The senderauth stage in an in-process SMTP server: SPF refusal at MAIL FROM, bounded DNS
time, the TTL cache shared across sessions, the queue meta and the log line."""
from __future__ import annotations

import logging
import time

import pytest

from mailstack.pipeline import build_stages
from tests.dnsserver import DNSServer
from tests.smtp_fixture import SMTPServer, USER
from tests.senderauth_fixtures import message

SPF_LOCALHOST = "v=spf1 ip4:127.0.0.1 -all"


@pytest.fixture(scope="module")
def zone():
    z = DNSServer({
        "good.test": {"TXT": [SPF_LOCALHOST]},
        "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
        "bad.test": {"TXT": ["v=spf1 -all exp=why.bad.test"]},
        "why.bad.test": {"TXT": ["%{i} is not one of %{d}'s senders"]},
        "client.good.test": {"TXT": [SPF_LOCALHOST]},
        "cached.test": {"TXT": [SPF_LOCALHOST]},
        "strict.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject"]},
        "inject.test": {"TXT": ["v=spf1 -all exp=why.inject.test"]},
        "why.inject.test": {"TXT": ["no\r\n250 2.0.0 fake"]},
        "_dmarc.cached.test": {"TXT": ["v=DMARC1; p=reject"]},
    }, ttl=300).start()
    z.silent.add("slow.test")
    z.silent.add("_dmarc.slowdmarc.test")
    z.add("slowdmarc.test", "TXT", SPF_LOCALHOST)
    yield z
    z.stop()


def _server(tmp_path, zone, **senderauth) -> SMTPServer:
    srv = SMTPServer(tmp_path, extra_config={
        "dns": {"nameservers": [zone.address], "timeout": 10.0},
        "senderauth": {"dns_timeout": 1.0, **senderauth}})
    srv.services.stages = build_stages(srv.services)
    return srv.start()


def _transaction(srv, sender: str, data: bytes | None = None, helo: str = "client.good.test") -> list[str]:
    with srv.connect() as c:
        c.reply()
        out = [c.cmd(f"EHLO {helo}"), c.cmd(f"MAIL FROM:<{sender}>")]
        if out[-1].startswith("250") and data is not None:
            out.append(c.cmd(f"RCPT TO:<{USER}>"))
            out.append(c.cmd("DATA"))
            c.send(data + b".\r\n")
            out.append(c.reply())
        c.cmd("QUIT")
    return out


def test_spf_refusal_at_mail_from_when_configured(tmp_path, zone):
    with _server(tmp_path, zone, spf_reject=True) as srv:
        assert _transaction(srv, "x@good.test")[-1].startswith("250")
        reply = _transaction(srv, "x@bad.test")[-1]
        assert reply == "550 5.7.23 SPF: 127.0.0.1 is not allowed to send mail from bad.test: " \
                        "127.0.0.1 is not one of bad.test's senders"
        # the sender domain's explanation cannot break our reply into lines
        assert _transaction(srv, "x@inject.test")[-1] == \
            "550 5.7.23 SPF: 127.0.0.1 is not allowed to send mail from inject.test: no 250 2.0.0 fake"
        started = time.monotonic()
        reply = _transaction(srv, "x@slow.test")[-1]
        assert reply.startswith("451 4.7.24")
        assert time.monotonic() - started < 6.0  # dns_timeout 1 s bounds it, not the resolver's 10 s
        # HELO is the identity of the null sender
        assert _transaction(srv, "", helo="client.good.test")[-1].startswith("250")


def test_spf_is_only_recorded_by_default(tmp_path, zone):
    with _server(tmp_path, zone) as srv:
        out = _transaction(srv, "x@bad.test", message("x@bad.test", subject="rec-1"))
        assert out[-1].startswith("250")
        (msg, data), = srv.queued()
        assert msg.meta["authres"]["spf"] == "fail"
        assert b"spf=fail" in data and b"smtp.mailfrom=x@bad.test" in data


def test_slow_dns_at_data_is_bounded_and_recorded_as_temperror(tmp_path, zone):
    with _server(tmp_path, zone) as srv:
        started = time.monotonic()
        out = _transaction(srv, "x@slowdmarc.test", message("x@slowdmarc.test", subject="slow-1"))
        assert out[-1].startswith("250")
        assert time.monotonic() - started < 6.0  # dns_timeout 1 s, not the resolver's 10 s
        (msg, data), = srv.queued()
        assert msg.meta["authres"]["dmarc"]["result"] == "temperror"
        assert b"dmarc=temperror" in data


def test_dns_answers_are_cached_across_sessions_by_ttl(tmp_path, zone, caplog):
    with _server(tmp_path, zone) as srv, caplog.at_level(logging.INFO, logger="mailstack.smtp"):
        zone.queries.clear()
        for i in range(3):
            reply = _transaction(srv, "x@cached.test", message("x@cached.test", subject=f"cache-{i}"))[-1]
            assert reply.startswith("250")
        names = [q[0] for q in zone.queries]
        assert names.count("cached.test") == 1 and names.count("_dmarc.cached.test") == 1
        lines = [r.getMessage() for r in caplog.records if "from=<x@cached.test>" in r.getMessage()]
        assert len(lines) == 3 and all("spf=pass, dkim=none, dmarc=pass, arc=none" in ln for ln in lines)


def test_submission_gets_auth_pass(tmp_path, zone):
    with _server(tmp_path, zone) as srv:
        with srv.connect("submission") as c:
            c.reply()
            c.cmd("EHLO client")
            c.starttls()
            c.cmd("EHLO client")
            assert c.login().startswith("235")
            assert c.cmd(f"MAIL FROM:<{USER}>").startswith("250")
            assert c.cmd(f"RCPT TO:<{USER}>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            forged = b"Authentication-Results: mail.example.test; dmarc=pass\r\n" + message(USER)
            c.send(forged + b".\r\n")
            assert c.reply().startswith("250")
        (msg, data), = srv.queued()
        assert b"Authentication-Results: mail.example.test;\r\n\tauth=pass smtp.auth=alice@example.test\r\n" in data
        assert b"dmarc=pass" not in data


@pytest.mark.parametrize("settings,reply,junk", [
    ({}, "550 5.7.1 Email rejected per DMARC policy for strict.test", None),
    ({"dmarc_policy": "quarantine"}, "250", "DMARC quarantine policy of strict.test"),
    ({"dmarc_policy": "monitor"}, "250", None),
    ({"allow": ["strict.test"]}, "250", None),
    ({"allow": ["127.0.0.0/8"]}, "250", None),
])
def test_dmarc_enforcement_keys(tmp_path, zone, settings, reply, junk):
    with _server(tmp_path, zone, **settings) as srv:
        out = _transaction(srv, "x@strict.test", message("x@strict.test", subject="keys-1"))
        assert out[-1].startswith(reply), out
        if reply == "250":
            (msg, data), = srv.queued()
            assert msg.meta.get("junk") == junk
            assert msg.meta["authres"]["dmarc"]["result"] == "fail"
            assert msg.meta["authres"]["dmarc"]["override"] == ("" if junk else
                                                                 "monitor only" if settings.get("dmarc_policy")
                                                                 else "allow-listed")


def test_dmarc_verdicts_are_kept_for_reports_also_when_refused(tmp_path, zone):
    import json

    from tests.harness import wait_for
    with _server(tmp_path, zone) as srv:
        assert _transaction(srv, "x@strict.test", message("x@strict.test"))[-1].startswith("550 5.7.1")
        assert _transaction(srv, "x@good.test", message("x@good.test"))[-1].startswith("250")
        assert _transaction(srv, "x@bad.test", message("x@bad.test"))[-1].startswith("250")  # no DMARC record
        folder = srv.data_dir / "dmarc"

        def rows():
            files = list(folder.glob("*.jsonl")) if folder.is_dir() else []
            found = [json.loads(line) for f in files for line in f.read_text().splitlines()]
            return found if len(found) >= 2 else None

        got = {r["header_from"]: r for r in wait_for(rows, 10, what="verdict lines")}
        assert set(got) == {"strict.test", "good.test"}
        assert (got["strict.test"]["dmarc"], got["strict.test"]["disposition"]) == ("fail", "reject")
        assert (got["good.test"]["dmarc"], got["good.test"]["spf_aligned"]) == ("pass", True)
        assert got["strict.test"]["ip"] == "127.0.0.1"


def test_an_unsigned_message_is_dkim_none_even_with_a_malformed_header_line(tmp_path, zone):
    """No DKIM-Signature: nothing to verify (RFC 8601 "none"), and no parse of the whole
    message by dkimpy on the loop, which answered "permerror" for a header line it could
    not read although the message carries no signature."""
    data = message("x@good.test", subject="unsigned-1").replace(b"\r\n\r\n", b"\r\nno colon on this line\r\n\r\n", 1)
    with _server(tmp_path, zone) as srv:
        assert _transaction(srv, "x@good.test", data)[-1].startswith("250")
        (msg, stored), = srv.queued()
        assert msg.meta["authres"]["dkim"] == [], msg.meta["authres"]
        assert b"dkim=none" in stored and b"dkim=permerror" not in stored
