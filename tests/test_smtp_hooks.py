"""The stage contract (smtp/hooks.py) through a real SMTP session: every point of the
conversation asks the stages, the first refusal wins, and a data verdict's headers,
replacement, envelope changes, hold, discard and meta all reach the queue file."""
from __future__ import annotations

import asyncio
import smtplib

import pytest

from mailstack.queue.local import LocalTransport
from mailstack.queue.types import QueuedMessage
from mailstack.smtp import hooks
from smtp_fixture import DOMAIN, USER, SMTPServer
from queue_fixture import QueueEnv, message

MSG = b"From: a@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


class Toy:
    """A stage whose answers the test sets; it records what it was asked."""

    name = "toy"

    def __init__(self) -> None:
        self.refuse: dict[str, str] = {}
        self.verdict = hooks.Verdict()
        self.seen: list[tuple] = []
        self.closed = 0

    async def connect(self, conn):
        self.seen.append(("connect", conn.ip, conn.listener))
        return self.refuse.get("connect")

    async def helo(self, conn):
        self.seen.append(("helo", conn.helo))
        return self.refuse.get("helo")

    async def mail(self, conn, txn):
        self.seen.append(("mail", txn.mail_from))
        return self.refuse.get("mail")

    async def rcpt(self, conn, txn, rcpt):
        self.seen.append(("rcpt", rcpt, tuple(txn.rcpts)))
        return self.refuse.get("rcpt")

    async def data(self, conn, txn, message):
        self.seen.append(("data", txn.qid, message, conn.helo))
        return self.verdict

    def close(self, conn):
        self.closed += 1


class Second(Toy):
    name = "second"


@pytest.fixture
def server(tmp_path):
    srv = SMTPServer(tmp_path)
    srv.toy, srv.second = Toy(), Second()
    srv.services.stages = (srv.toy, srv.second)
    with srv.start():
        yield srv


def test_every_point_asks_the_stages_in_order(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        s.sendmail("a@remote.test", [USER], MSG)
    kinds = [e[0] for e in server.toy.seen]
    assert kinds == ["connect", "helo", "mail", "rcpt", "data"]
    assert [e[0] for e in server.second.seen] == kinds
    qid = server.toy.seen[-1][1]
    assert qid and server.toy.seen[-1][2] == MSG and server.toy.seen[-1][3] == "client.test"
    (msg, data), = server.queued()
    assert msg.qid == qid and data.endswith(MSG)


@pytest.mark.parametrize("point", ["mail", "rcpt"])
def test_first_refusal_wins_and_later_stages_are_not_asked(server, point):
    server.toy.refuse[point] = "550 5.7.1 toy says no"
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo("client.test")
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPRecipientsRefused)) as e:
            s.sendmail("a@remote.test", [USER], MSG)
        assert "toy says no" in str(e.value)
    assert point not in [e[0] for e in server.second.seen]
    assert server.queued() == []


def test_refusal_at_connect_is_the_greeting(server):
    server.toy.refuse["connect"] = "554 5.7.1 go away"
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10)
    assert e.value.smtp_code == 554


def test_refused_helo_leaves_the_client_without_a_greeting(server):
    server.toy.refuse["helo"] = "550 5.7.1 bad helo"
    c = server.connect()
    assert c.reply().startswith("220")
    assert c.cmd("EHLO bad.test").startswith("550 5.7.1 bad helo")
    assert c.cmd("MAIL FROM:<a@remote.test>").startswith("503")
    c.close()


def test_data_verdict_headers_replacement_envelope_and_meta(server):
    replaced = b"Subject: replaced\r\n\r\nNew body.\r\n"
    server.toy.verdict = hooks.Verdict(headers=[("X-Toy", "one")], message=replaced,
                                       meta={"junk": "toy", "spam": {"score": 9.0}},
                                       add_rcpts=[f"bob@{DOMAIN}"], del_rcpts=[USER.upper()],
                                       sender="changed@remote.test", log={"toy": "ok"})
    server.second.verdict = hooks.Verdict(headers=[("X-Second", "two\n\tfolded")])
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("a@remote.test", [USER], MSG)
    assert server.second.seen[-1][2] == replaced  # the second stage sees the replacement
    (msg, data), = server.queued()
    assert msg.sender == "changed@remote.test"
    assert msg.recipients == [f"bob@{DOMAIN}"]
    assert msg.meta["junk"] == "toy" and msg.meta["spam"] == {"score": 9.0}
    assert data.startswith(b"Received: ")
    assert data.endswith(b"X-Toy: one\r\nX-Second: two\r\n\tfolded\r\n" + replaced)


@pytest.mark.parametrize("code", ["550 5.7.1 rejected by toy", "451 4.7.1 try later, toy"])
def test_data_refusal_comes_before_250_and_nothing_is_queued(server, code):
    server.toy.verdict = hooks.Verdict(reply=code)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@remote.test", [USER], MSG)
    assert e.value.smtp_code == int(code[:3])
    assert server.second.seen[-1][0] != "data"
    assert server.queued() == []


def test_discard_says_250_and_keeps_nothing(server):
    server.toy.verdict = hooks.Verdict(discard=True)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("a@remote.test", [USER], MSG)
    assert server.queued() == [] and server.enqueued == []


def test_hold_writes_straight_into_hold_and_wakes_no_delivery(server):
    server.toy.verdict = hooks.Verdict(hold="toy quarantine")
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("a@remote.test", [USER], MSG)
    assert server.queued() == [] and server.enqueued == []
    held = list((server.cfg.queue_dir / "hold").iterdir())
    assert len(held) == 1


def test_close_is_called_once_per_connection(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.noop()
    assert _until(lambda: server.toy.closed == 1 and server.second.closed == 1)


def _until(cond, timeout=5.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_junk_meta_delivers_into_junk_and_inbox_when_junk_is_gone(tmp_path):
    env = QueueEnv(tmp_path)

    async def run():
        services = env.make_services()
        transport = LocalTransport(services)
        services.spool.setup()
        store = services.store
        await store.ensure_account("alice@example.test")
        qid = await services.spool.enqueue("a@remote.test", ["alice@example.test"], [message("junky")],
                                           {"junk": "dmarc quarantine"})
        msg = _read(services.spool, qid)
        r, = await transport.deliver(msg, ["alice@example.test"])
        assert r.status == "sent" and "Junk" in r.reply
        assert (await store.status("alice@example.test", "Junk"))["MESSAGES"] == 1
        await store.delete_mailbox("alice@example.test", "Junk")
        qid = await services.spool.enqueue("a@remote.test", ["alice@example.test"], [message("junk2")],
                                           {"junk": "spam"})
        r, = await transport.deliver(_read(services.spool, qid), ["alice@example.test"])
        assert r.status == "sent"
        assert (await store.status("alice@example.test", "INBOX"))["MESSAGES"] == 1

    asyncio.run(run())


def _read(spool, qid) -> QueuedMessage:
    from mailstack.queue.spool import read_envelope
    return read_envelope(spool.path("incoming", qid))
