"""RemoteDelivery end to end, in-process: a real DNS server on loopback, real receiving
SMTP servers (aiosmtpd) on 127.0.0.x, real TLS, a QueuedMessage over a real file."""
from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import dkim as dkimpy
import dns.nameserver
import dns.resolver
import pytest

from mailstack import dkim as msdkim
from mailstack.config import from_dict
from mailstack.directory import Directory
from mailstack.events import EventBus
from mailstack.queue.remote import RemoteDelivery
from mailstack.queue.types import QueuedMessage
from mailstack.services import Services, SessionRegistry
from mailstack.store.base import MessageSource
from tests.dnsserver import DNSServer
from tests.smtpsink import CA, ScriptedServer, Sink, free_port_on, read_line, self_signed_context, server_context

MX1, MX2, RELAY = "127.0.0.2", "127.0.0.3", "127.0.0.4"

MESSAGE = (b"From: Alice <alice@local.test>\r\n"
           b"To: Bob <bob@remote.test>\r\n"
           b"Subject: outbound test\r\n"
           b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <1@local.test>\r\n"
           b"\r\n"
           b"Hello Bob.\r\n"
           b".a line that starts with a dot\r\n"
           b"..and one with two\r\n"
           b"Bye.\r\n")


class Env:
    """One RemoteDelivery with its config, DNS server and a port shared by the sinks."""

    def __init__(self, tmp_path: Path, dns: DNSServer, port: int) -> None:
        self.tmp, self.dns, self.port = tmp_path, dns, port
        self.sinks: list[Sink] = []
        self._n = itertools.count()
        self.delivery_overrides: dict = {}
        self.dns_timeout = 2.0
        self._remote: RemoteDelivery | None = None

    def config(self, **delivery):
        raw = {
            "server": {"hostname": "mail.local.test", "data_dir": str(self.tmp / "data")},
            "dns": {"nameservers": [self.dns.address], "timeout": self.dns_timeout},
            "delivery": {"port": self.port, "connect_timeout": 2.0, "command_timeout": 5.0,
                         "data_timeout": 5.0, **self.delivery_overrides, **delivery},
        }
        return from_dict(raw, base=self.tmp)

    def remote(self, **delivery) -> RemoteDelivery:
        cfg = self.config(**delivery)
        directory = Directory(cfg.data_dir)
        directory.add_domain("local.test")
        services = Services(config=cfg, directory=directory, events=EventBus(), tls=None, throttle=None,
                            sessions=SessionRegistry())
        return RemoteDelivery(services)

    def sink(self, host: str, port: int | None = None, **kw) -> Sink:
        sink = Sink(host, port or self.port, **kw).start()
        self.sinks.append(sink)
        return sink

    def message(self, rcpts: list[str], body: bytes = MESSAGE, sender: str = "alice@local.test",
                meta: dict | None = None) -> QueuedMessage:
        # The message sits after an envelope in its spool file: exercise the offset.
        path = self.tmp / f"q{next(self._n)}"
        junk = b"ENVELOPE-JUNK\n" * 3
        path.write_bytes(junk + body + b"TRAILING-JUNK")
        return QueuedMessage(qid=path.name, sender=sender, recipients=list(rcpts),
                             source=MessageSource(str(path), len(junk), len(body)), arrival=0.0, meta=meta or {})

    def deliver(self, remote: RemoteDelivery, msg: QueuedMessage, rcpts: list[str] | None = None):
        async def go():
            try:
                return await remote.deliver(msg, rcpts or msg.recipients)
            finally:
                await remote.close()
        return asyncio.run(go())

    def close(self) -> None:
        for s in self.sinks:
            s.stop()


@pytest.fixture
def env(tmp_path):
    dns = DNSServer({
        "remote.test": {"MX": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
        "mx1.remote.test": {"A": [MX1]},
        "mx2.remote.test": {"A": [MX2]},
        "backup.test": {"MX": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
        "null.test": {"MX": [(0, ".")]},
        "broken.test": {"MX": [(10, "mx1.remote.test")]},
        "xn--bcher-kva.test": {"MX": [(10, "mx1.remote.test")]},
        "loop.test": {"MX": [(10, "mail.local.test")]},
        "mail.local.test": {"A": [MX1]},
        "plain.test": {"A": [MX1]},
    }).start()
    dns.servfail.add("broken.test")
    dns.silent.add("slow.test")
    e = Env(tmp_path, dns, free_port_on(MX1, MX2, RELAY))
    yield e
    e.close()
    dns.stop()


def by_rcpt(results):
    return {r.recipient: r for r in results}


# --- routing and delivery ---------------------------------------------------------
def test_mail_arrives_via_mx_with_tls(env, tmp_path):
    sink = env.sink(MX1, tls=self_signed_context(tmp_path, "mx1.remote.test"))
    msg = env.message(["bob@remote.test", "carol@remote.test"], body=MESSAGE.replace(b"\r\n", b"\n"))
    results = env.deliver(env.remote(), msg)
    assert [(r.status, r.relay) for r in results] == [("sent", f"mx1.remote.test[{MX1}]:{env.port}")] * 2
    assert results[0].reply.startswith("250")
    assert len(sink.messages) == 1  # one transaction for both recipients
    got = sink.messages[0]
    assert got.rcpt_tos == ["bob@remote.test", "carol@remote.test"]
    assert got.mail_from == "alice@local.test"
    assert got.tls, "policy `may` must use the offered STARTTLS"
    assert got.helo == "mail.local.test"
    assert "SIZE=%d" % len(MESSAGE) in got.mail_options
    # Bare LFs became CRLF, and dot-stuffing was undone by the receiver: the text is intact.
    assert got.content.endswith(MESSAGE)


def test_mx_fallback_when_first_host_is_down(env):
    sink = env.sink(MX2)  # nothing listens on MX1
    results = env.deliver(env.remote(), env.message(["bob@remote.test"]))
    assert results[0].status == "sent"
    assert results[0].relay == f"mx2.remote.test[{MX2}]:{env.port}"
    assert len(sink.messages) == 1


def test_all_hosts_down_defers_with_the_reason(env):
    r = env.deliver(env.remote(), env.message(["bob@remote.test"]))[0]
    assert r.status == "deferred"
    assert r.reply.startswith("451 4.4.1 connect to mx2.remote.test") and "refused" in r.reply


def test_no_mx_uses_the_domain_address(env):
    sink = env.sink(MX1)
    r = env.deliver(env.remote(), env.message(["x@plain.test"]))[0]
    assert r.status == "sent" and r.relay == f"plain.test[{MX1}]:{env.port}"
    assert sink.messages[0].rcpt_tos == ["x@plain.test"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_per_recipient_replies(env, pipelining):
    sink = env.sink(MX1, pipelining=pipelining,
                    rcpt_replies={"gone@remote.test": "550 5.1.1 <gone@remote.test>: user unknown",
                                  "busy@remote.test": "450 4.2.1 mailbox busy"})
    results = by_rcpt(env.deliver(env.remote(), env.message(
        ["ok@remote.test", "gone@remote.test", "busy@remote.test"])))
    assert results["ok@remote.test"].status == "sent"
    assert results["gone@remote.test"].status == "bounced"
    assert results["gone@remote.test"].reply == \
        "550 5.1.1 <gone@remote.test>: user unknown (in reply to RCPT TO command)"
    assert results["gone@remote.test"].relay == f"mx1.remote.test[{MX1}]:{env.port}"
    assert results["busy@remote.test"].status == "deferred"
    assert results["busy@remote.test"].reply.startswith("450 4.2.1 mailbox busy")
    assert [m.rcpt_tos for m in sink.messages] == [["ok@remote.test"]]


def test_all_recipients_rejected_sends_no_data(env):
    sink = env.sink(MX1, rcpt_replies={"gone@remote.test": "550 5.1.1 user unknown"})
    results = env.deliver(env.remote(), env.message(["gone@remote.test"]))
    assert results[0].status == "bounced"
    assert sink.messages == []


@pytest.mark.parametrize("reply,status", [("554 5.7.1 rejected as spam", "bounced"),
                                          ("451 4.3.0 try later", "deferred")])
def test_reply_to_end_of_data(env, reply, status):
    env.sink(MX1, data_reply=reply)
    results = env.deliver(env.remote(), env.message(["a@remote.test", "b@remote.test"]))
    assert [r.status for r in results] == [status, status]
    assert results[0].reply == f"{reply} (in reply to end of DATA command)"


def test_mail_from_rejected_bounces(env):
    env.sink(MX1, mail_reply="553 5.7.1 sender not allowed")
    r = env.deliver(env.remote(), env.message(["a@remote.test"]))[0]
    assert r.status == "bounced" and r.reply.startswith("553 5.7.1 sender not allowed")


def test_null_mx_bounces(env):
    r = env.deliver(env.remote(), env.message(["a@null.test"]))[0]
    assert r.status == "bounced"
    assert r.reply == "556 5.1.10 Domain null.test does not accept mail (nullMX)"


def test_nxdomain_bounces(env):
    r = env.deliver(env.remote(), env.message(["a@nowhere.test"]))[0]
    assert r.status == "bounced" and r.reply.startswith("550 5.4.4 Host or domain name not found")


@pytest.mark.parametrize("domain,why", [("broken.test", "try again"), ("slow.test", "timed out")])
def test_servfail_and_timeout_defer(env, domain, why):
    env.dns_timeout = 0.5
    r = env.deliver(env.remote(), env.message([f"a@{domain}"]))[0]
    assert r.status == "deferred" and r.reply.startswith("451 4.4.3") and why in r.reply


def test_mail_for_a_domain_whose_mx_is_us_bounces(env):
    r = env.deliver(env.remote(), env.message(["a@loop.test"]))[0]
    assert r.status == "bounced" and "loops back to myself" in r.reply


def test_idn_domain_sent_in_a_label_form(env):
    sink = env.sink(MX1, smtputf8=False)
    r = env.deliver(env.remote(), env.message(["hans@bücher.test"]))[0]
    assert r.status == "sent"
    assert sink.messages[0].rcpt_tos == ["hans@xn--bcher-kva.test"]


def test_several_domains_in_one_call(env):
    sink1 = env.sink(MX1)
    results = by_rcpt(env.deliver(env.remote(), env.message(
        ["a@remote.test", "b@plain.test", "c@null.test", "bad\r\nRCPT TO:<x@y>@remote.test"])))
    assert results["a@remote.test"].status == "sent"
    assert results["b@plain.test"].status == "sent"
    assert results["c@null.test"].status == "bounced"
    assert results["bad\r\nRCPT TO:<x@y>@remote.test"].status == "bounced"
    assert sorted(r for m in sink1.messages for r in m.rcpt_tos) == ["a@remote.test", "b@plain.test"]


def test_recipient_limit_splits_transactions(env):
    sink = env.sink(MX1)
    rcpts = [f"u{i}@remote.test" for i in range(5)]
    results = env.deliver(env.remote(destination_recipient_limit=2), env.message(rcpts))
    assert all(r.status == "sent" for r in results)
    assert [len(m.rcpt_tos) for m in sink.messages] == [2, 2, 1]
    assert len(sink.sessions) == 1


# --- SIZE, SMTPUTF8, 8BITMIME --------------------------------------------------------
def test_message_larger_than_server_size_bounces(env):
    sink = env.sink(MX1, size_limit=100)
    r = env.deliver(env.remote(), env.message(["a@remote.test"]))[0]
    assert r.status == "bounced" and r.reply.startswith("552 5.3.4 message size")
    assert sink.messages == []


def test_smtputf8_needed_but_not_offered_bounces(env):
    env.sink(MX1, smtputf8=False)
    r = env.deliver(env.remote(), env.message(["jörg@remote.test"], meta={"smtputf8": True}))[0]
    assert r.status == "bounced"
    assert r.reply.startswith("554 5.6.7 SMTPUTF8 is required, but was not offered by host mx1.remote.test")


def test_smtputf8_and_8bitmime_used_when_offered(env):
    sink = env.sink(MX1, smtputf8=True)
    body = MESSAGE.replace(b"Subject: outbound test", "Subject: Grüße".encode())
    r = env.deliver(env.remote(), env.message(["jörg@remote.test"], body=body, meta={"smtputf8": True}))[0]
    assert r.status == "sent"
    got = sink.messages[0]
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options
    assert got.rcpt_tos == ["jörg@remote.test"]


# --- TLS policies ------------------------------------------------------------------
def test_policy_verify_defers_self_signed(env, tmp_path):
    sink = env.sink(MX1, tls=self_signed_context(tmp_path, "mx1.remote.test"))
    r = env.deliver(env.remote(tls_security_level="verify"), env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "certificate not verified" in r.reply
    assert sink.messages == []


def test_policy_verify_delivers_to_a_trusted_certificate(env, tmp_path):
    ca = CA.create(tmp_path / "ca")
    sink = env.sink(MX1, tls=server_context(*ca.issue("mx1.remote.test")))
    remote = env.remote(tls_security_level="verify", tls_ca_file=str(ca.path))
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    assert r.status == "sent" and sink.messages[0].tls


def test_policy_verify_checks_the_host_name(env, tmp_path):
    ca = CA.create(tmp_path / "ca")
    env.sink(MX1, tls=server_context(*ca.issue("other.example.test")))
    remote = env.remote(tls_security_level="verify", tls_ca_file=str(ca.path))
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "certificate not verified" in r.reply


def test_policy_encrypt_defers_without_starttls(env):
    sink = env.sink(MX1)  # no STARTTLS offered
    r = env.deliver(env.remote(tls_security_level="encrypt"), env.message(["a@remote.test"]))[0]
    assert r.status == "deferred"
    assert r.reply.startswith("451 4.7.4 TLS is required, but was not offered by host mx1.remote.test")
    assert sink.messages == []


def test_policy_encrypt_accepts_self_signed(env, tmp_path):
    sink = env.sink(MX1, tls=self_signed_context(tmp_path, "mx1.remote.test"))
    r = env.deliver(env.remote(tls_security_level="encrypt"), env.message(["a@remote.test"]))[0]
    assert r.status == "sent" and sink.messages[0].tls


def test_policy_none_stays_plaintext(env, tmp_path):
    sink = env.sink(MX1, tls=self_signed_context(tmp_path, "mx1.remote.test"))
    r = env.deliver(env.remote(tls_security_level="none"), env.message(["a@remote.test"]))[0]
    assert r.status == "sent" and not sink.messages[0].tls


# --- DKIM -----------------------------------------------------------------------------
def loopback_txt(dns_server: DNSServer):
    resolver = dns.resolver.Resolver(configure=False)
    host, port = dns_server.address.rsplit(":", 1)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, int(port))]
    resolver.lifetime = 3

    def get_txt(name: bytes, timeout: float = 5):
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(rr.strings) for rr in answer)
    return get_txt


def test_dkim_signature_verifies_against_the_published_key(env):
    cfg = env.config()
    key = msdkim.generate_key(cfg.data_dir, "local.test", "mail")
    env.dns.add("mail._domainkey.local.test", "TXT", msdkim.public_record(key.read_bytes()))
    sink = env.sink(MX1)
    r = env.deliver(env.remote(), env.message(["bob@remote.test"]))[0]
    assert r.status == "sent"
    content = sink.messages[0].content
    assert content.startswith(b"DKIM-Signature: ")
    assert b"d=local.test" in content and b"s=mail" in content
    get_txt = loopback_txt(env.dns)
    assert dkimpy.verify(content, dnsfunc=get_txt)
    assert ("mail._domainkey.local.test", "TXT", "tcp") in env.dns.queries or \
        ("mail._domainkey.local.test", "TXT", "udp") in env.dns.queries
    # And the check is real: a changed body no longer verifies.
    assert not dkimpy.verify(content.replace(b"Hello Bob.", b"Hello Eve."), dnsfunc=get_txt)


def test_no_dkim_for_foreign_from_or_when_disabled(env):
    cfg = env.config()
    msdkim.generate_key(cfg.data_dir, "local.test", "mail")
    sink = env.sink(MX1)
    foreign = MESSAGE.replace(b"alice@local.test", b"alice@elsewhere.test")
    env.deliver(env.remote(), env.message(["a@remote.test"], body=foreign))
    env.deliver(env.remote(**{}), env.message(["a@remote.test"]))
    assert not sink.messages[0].content.startswith(b"DKIM-Signature")
    assert sink.messages[1].content.startswith(b"DKIM-Signature")
    env.delivery_overrides = {}
    remote = env.remote()
    remote.services.config.dkim.enabled = False
    env.deliver(remote, env.message(["a@remote.test"]))
    assert not sink.messages[2].content.startswith(b"DKIM-Signature")


# --- connections --------------------------------------------------------------------
def test_connection_reused_for_the_next_message(env, tmp_path):
    sink = env.sink(MX1, tls=self_signed_context(tmp_path, "mx1.remote.test"))
    remote = env.remote(connection_cache_time=5.0)
    msgs = [env.message(["a@remote.test"]), env.message(["b@remote.test"]), env.message(["c@backup.test"])]

    async def go():
        results = []
        for m in msgs:
            results += await remote.deliver(m, m.recipients)
            assert remote.cache.count() >= 1  # idle and kept for the next message
        opened = remote.connections_opened
        await remote.close()
        assert remote.cache.count() == 0
        return results, opened
    results, opened = asyncio.run(go())
    assert [r.status for r in results] == ["sent"] * 3
    # remote.test twice over one (TLS) connection; backup.test is another destination: its own.
    assert opened == 2
    assert sink.messages[0].session == sink.messages[1].session != sink.messages[2].session
    assert all(m.tls for m in sink.messages)


def test_cached_connection_closed_by_server_is_replaced(env):
    sink = env.sink(MX1)
    remote = env.remote(connection_cache_time=5.0)
    m1, m2 = env.message(["a@remote.test"]), env.message(["b@remote.test"])

    async def go():
        await remote.deliver(m1, m1.recipients)
        # The server goes away and comes back: the cached connection is dead.
        sink.stop()
        env.sinks.remove(sink)
        fresh = env.sink(MX1)
        r = await remote.deliver(m2, m2.recipients)
        await remote.close()
        return r, fresh
    r, fresh = asyncio.run(go())
    assert r[0].status == "sent" and len(fresh.messages) == 1
    assert remote.connections_opened == 2


def test_no_reuse_when_cache_time_is_zero(env):
    sink = env.sink(MX1)
    remote = env.remote(connection_cache_time=0.0)
    m1, m2 = env.message(["a@remote.test"]), env.message(["b@remote.test"])

    async def go():
        await remote.deliver(m1, m1.recipients)
        await remote.deliver(m2, m2.recipients)
        await remote.close()
    asyncio.run(go())
    assert remote.connections_opened == 2
    assert sink.messages[0].session != sink.messages[1].session


def test_destination_concurrency_limit(env):
    active, peak, lock = [0], [0], threading.Lock()
    sink = env.sink(MX1)
    original = sink._controller.handler.handle_DATA

    async def slow_data(server, session, envelope):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.1)  # the server takes its time, so deliveries overlap
        with lock:
            active[0] -= 1
        return await original(server, session, envelope)
    sink._controller.handler.handle_DATA = slow_data
    remote = env.remote(destination_concurrency=2)
    msgs = [env.message([f"u{i}@remote.test"]) for i in range(6)]

    async def go():
        out = await asyncio.gather(*(remote.deliver(m, m.recipients) for m in msgs))
        await remote.close()
        return out
    results = asyncio.run(go())
    assert all(r[0].status == "sent" for r in results)
    assert len(sink.messages) == 6
    assert peak[0] == 2


# --- relayhost and transports ------------------------------------------------------------
def test_relayhost_with_auth(env, tmp_path):
    relay_port = free_port_on(RELAY)
    sink = env.sink(RELAY, port=relay_port, tls=self_signed_context(tmp_path, "relay.test"),
                    auth=("smarthost-user", "s3cret"))
    remote = env.remote(relayhost=f"[{RELAY}]:{relay_port}", relayhost_username="smarthost-user",
                        relayhost_password="s3cret")
    results = env.deliver(remote, env.message(["a@remote.test", "b@anywhere.invalid"]))
    assert [r.status for r in results] == ["sent", "sent"]
    assert results[0].relay == f"{RELAY}[{RELAY}]:{relay_port}"
    assert len(sink.messages) == 1
    assert sink.messages[0].auth_user == "smarthost-user" and sink.messages[0].tls
    assert sink.messages[0].rcpt_tos == ["a@remote.test", "b@anywhere.invalid"]


def test_relayhost_wrong_password_defers(env, tmp_path):
    relay_port = free_port_on(RELAY)
    sink = env.sink(RELAY, port=relay_port, tls=self_signed_context(tmp_path, "relay.test"),
                    auth=("smarthost-user", "s3cret"))
    remote = env.remote(relayhost=f"[{RELAY}]:{relay_port}", relayhost_username="smarthost-user",
                        relayhost_password="wrong")
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "SASL authentication failed" in r.reply
    assert sink.messages == []


def test_relayhost_credentials_never_sent_in_clear(env):
    relay_port = free_port_on(RELAY)
    sink = env.sink(RELAY, port=relay_port)  # no TLS at all
    remote = env.remote(relayhost=f"[{RELAY}]:{relay_port}", relayhost_username="u", relayhost_password="p")
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    # aiosmtpd does not offer AUTH without TLS, so we deliver unauthenticated; either way no secret went out.
    assert r.status == "sent" and sink.messages[0].auth_user is None


def test_transport_override_beats_relayhost_and_mx(env):
    port = free_port_on(RELAY)
    special = env.sink(RELAY, port=port)
    remote = env.remote(relayhost="[192.0.2.1]:25", transports={"remote.test": f"[{RELAY}]:{port}"})
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    assert r.status == "sent" and r.relay == f"{RELAY}[{RELAY}]:{port}"
    assert special.messages[0].rcpt_tos == ["a@remote.test"]


def test_configured_nexthop_that_does_not_resolve_defers(env):
    remote = env.remote(relayhost="[relay.nowhere.test]")
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "Host not found" in r.reply


def test_unreadable_spool_file_defers(env):
    msg = env.message(["a@remote.test"])
    Path(msg.source.path).unlink()
    r = env.deliver(env.remote(), msg)[0]
    assert r.status == "deferred" and r.reply.startswith("451 4.3.0 cannot read the queued message")


def test_starttls_and_reuse_under_uvloop(env, tmp_path):
    """The server runs on uvloop when installed: STARTTLS (start_tls) and the cache must work there too."""
    import uvloop  # a dependency of the project
    sink = env.sink(MX1, tls=self_signed_context(tmp_path, "mx1.remote.test"))
    remote = env.remote(connection_cache_time=5.0)
    m1, m2 = env.message(["a@remote.test"]), env.message(["b@remote.test"])

    async def go():
        out = await remote.deliver(m1, m1.recipients) + await remote.deliver(m2, m2.recipients)
        await remote.close()
        return out
    results = uvloop.run(go())
    assert [r.status for r in results] == ["sent", "sent"]
    assert remote.connections_opened == 1 and all(m.tls for m in sink.messages)


# --- misbehaving servers ---------------------------------------------------------------
@pytest.fixture
def scripted(env):
    servers = []

    def make(host, script):
        srv = ScriptedServer(host, env.port, script).start()
        servers.append(srv)
        return srv
    yield make
    for srv in servers:
        srv.stop()


def test_silent_server_times_out_and_next_mx_is_tried(env, scripted):
    gate = threading.Event()
    scripted(MX1, lambda sock: gate.wait(10))  # accepts, never greets
    sink = env.sink(MX2)
    try:
        r = env.deliver(env.remote(command_timeout=0.5), env.message(["a@remote.test"]))[0]
    finally:
        gate.set()
    assert r.status == "sent" and r.relay.startswith("mx2.remote.test")
    assert len(sink.messages) == 1


def test_silent_server_alone_defers_with_timeout(env, scripted):
    gate = threading.Event()
    scripted(MX1, lambda sock: gate.wait(10))
    scripted(MX2, lambda sock: gate.wait(10))
    try:
        r = env.deliver(env.remote(command_timeout=0.3), env.message(["a@remote.test"]))[0]
    finally:
        gate.set()
    assert r.status == "deferred"
    assert "timed out while receiving the initial server greeting" in r.reply


def _smtp_until_data(sock, ehlo_extra=b""):
    sock.sendall(b"220 scripted ESMTP\r\n")
    while True:
        line = read_line(sock)
        if not line:
            return False
        cmd = line[:4].upper()
        if cmd == b"EHLO":
            sock.sendall(b"250-scripted\r\n" + ehlo_extra + b"250 8BITMIME\r\n")
        elif cmd == b"DATA":
            sock.sendall(b"354 go ahead\r\n")
            return True
        else:
            sock.sendall(b"250 ok\r\n")


def test_connection_lost_after_end_of_data_defers_not_retried_elsewhere(env, scripted):
    def script(sock):
        if _smtp_until_data(sock):
            while read_line(sock) not in (b".\r\n", b""):
                pass
            sock.close()  # no reply to the final dot
    scripted(MX1, script)
    sink = env.sink(MX2)
    r = env.deliver(env.remote(), env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "after end of data" in r.reply and "delivered twice" in r.reply
    assert sink.messages == []  # not sent again to another MX in the same attempt


def test_oversized_reply_is_a_protocol_error(env, scripted):
    scripted(MX1, lambda sock: sock.sendall(b"220-" + b"x" * 100000 + b"\r\n"))
    scripted(MX2, lambda sock: sock.sendall(b"220-hi\r\n" * 10000))
    r = env.deliver(env.remote(), env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "protocol error" in r.reply


def test_data_after_starttls_reply_is_refused(env, scripted):
    """A reply pipelined behind "220 go ahead" would be read as if it came over TLS (CVE-2011-0411)."""
    def script(sock):
        sock.sendall(b"220 scripted ESMTP\r\n")
        while True:
            line = read_line(sock)
            if not line:
                return
            if line.upper().startswith(b"EHLO"):
                sock.sendall(b"250-scripted\r\n250 STARTTLS\r\n")
            elif line.upper().startswith(b"STARTTLS"):
                sock.sendall(b"220 go ahead\r\n250 injected\r\n")
            else:
                sock.sendall(b"250 ok\r\n")
    scripted(MX1, script)
    r = env.deliver(env.remote(tls_security_level="encrypt"), env.message(["a@remote.test"]))[0]
    assert r.status == "deferred" and "sent data after the STARTTLS reply" in r.reply


def test_helo_fallback_when_ehlo_is_refused(env, scripted):
    seen = []

    def script(sock):
        sock.sendall(b"220 old server\r\n")
        while True:
            line = read_line(sock)
            if not line:
                return
            seen.append(line.split(b" ")[0].upper().strip())
            if line.upper().startswith(b"EHLO"):
                sock.sendall(b"502 command not implemented\r\n")
            elif line.upper().startswith(b"DATA"):
                sock.sendall(b"354 go\r\n")
                while read_line(sock) not in (b".\r\n", b""):
                    pass
                sock.sendall(b"250 accepted\r\n")
            elif line.upper().startswith(b"QUIT"):
                sock.sendall(b"221 bye\r\n")
                return
            else:
                sock.sendall(b"250 ok\r\n")
    scripted(MX1, script)
    r = env.deliver(env.remote(), env.message(["a@remote.test"]))[0]
    assert r.status == "sent"
    assert seen[:5] == [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA"]
    # Without EHLO there is no SIZE/BODY parameter on MAIL FROM.


def test_relayhost_with_implicit_tls_and_auth(env, tmp_path):
    relay_port = free_port_on(RELAY)
    sink = env.sink(RELAY, port=relay_port, implicit_tls=self_signed_context(tmp_path, "relay.test"),
                    auth=("u", "pw"))
    remote = env.remote(relayhost=f"[{RELAY}]:{relay_port}", relayhost_implicit_tls=True,
                        relayhost_username="u", relayhost_password="pw")
    r = env.deliver(remote, env.message(["a@remote.test"]))[0]
    assert r.status == "sent", r.reply
    assert sink.messages[0].tls and sink.messages[0].auth_user == "u"
    # `verify` checks the relay's certificate, also without STARTTLS.
    r = env.deliver(env.remote(relayhost=f"[{RELAY}]:{relay_port}", relayhost_implicit_tls=True,
                               tls_security_level="verify"), env.message(["b@remote.test"]))[0]
    assert r.status == "deferred" and "certificate not verified" in r.reply


def test_limiter_holds_under_contention_and_cancellation():
    from mailstack.queue.remote import Limiter

    async def go():
        lim, active, peak = Limiter(), [0], [0]

        async def worker(i):
            await lim.acquire(2)
            try:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            finally:
                active[0] -= 1
                lim.release()
        tasks = [asyncio.create_task(worker(i)) for i in range(20)]
        await asyncio.sleep(0)
        tasks[5].cancel()  # a waiter that gives up must not take a slot with it
        tasks[6].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert peak[0] == 2 and lim.active == 0 and lim.idle
        # Still usable after the storm.
        await asyncio.wait_for(lim.acquire(1), 1)
    asyncio.run(go())
