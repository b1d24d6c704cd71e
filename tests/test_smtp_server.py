"""SMTP in, through real sockets: ports 25 (STARTTLS), 465 (implicit TLS), 587 (STARTTLS+AUTH),
with smtplib, aiosmtplib, swaks and a raw line client; the server on asyncio's loop and on uvloop."""
from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import socket
import struct
import subprocess
import time

import aiosmtplib
import pytest

from harness import wait_for
from smtp_fixture import HOSTNAME, OTHER, PASSWORD, USER, RawClient, SMTPServer

LOOPS = ["asyncio", "uvloop"]
MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\nSubject: test\r\n"
           b"Message-ID: <1@example.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
           b"Hello.\r\n.leading dot\r\n\r\nBye.\r\n")
RECEIVED = re.compile(
    rb"^Received: from (?P<helo>\S+) \((?P<rdns>\S+) \[127\.0\.0\.1\]\)\r\n"
    rb"(?:\t\(using (?P<tls>TLSv1\.[23]) with cipher \S+ \(\d+/\d+ bits\)\)\r\n)?"
    rb"\tby mail\.example\.test \(mailstack\) with (?P<proto>E?SMTPS?A?) id (?P<qid>[0-9A-V]+);\r\n"
    rb"\t\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n")


@pytest.fixture(params=LOOPS)
def srv(request, tmp_path):
    with SMTPServer(tmp_path, loop=request.param) as server:
        yield server


@pytest.fixture
def make_server(tmp_path):
    """For tests that need non-default settings: make_server(smtp={...}, loop=...)."""
    servers = []

    def make(loop="asyncio", **kwargs):
        server = SMTPServer(tmp_path / f"s{len(servers)}", loop=loop, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def split_received(data: bytes) -> tuple[re.Match, bytes]:
    m = RECEIVED.match(data)
    assert m, data[:400]
    return m, data[m.end():]


def smtplib_25(srv) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.ports["smtp"], local_hostname="client.example.org", timeout=10)
    s.starttls(context=srv.client_tls(check_hostname=False))
    return s


# --- delivery through each port -------------------------------------------------------------
def test_port25_starttls_smtplib_bytes_on_disk(srv):
    with smtplib_25(srv) as s:
        assert s.sendmail("someone@remote.test", [USER, "sales@example.test"], MESSAGE) == {}
    [(msg, data)] = srv.queued()
    assert msg.sender == "someone@remote.test"
    assert msg.recipients == [USER, "sales@example.test"]
    assert msg.meta["listener"] == "smtp" and msg.meta["auth_user"] is None
    assert msg.meta["client_helo"] == "client.example.org" and msg.meta["client_ip"] == "127.0.0.1"
    m, rest = split_received(data)
    assert rest == MESSAGE  # exactly what was sent (dot-unstuffed), nothing re-written
    assert m["helo"] == b"client.example.org" and m["rdns"] == b"localhost"
    assert m["proto"] == b"ESMTPS" and m["tls"] and m["qid"].decode() == msg.qid


def test_port25_plain_without_tls_is_esmtp(srv):
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], local_hostname="c.test") as s:
        s.sendmail("", [USER], MESSAGE)  # the null sender is fine from the internet
    [(msg, data)] = srv.queued()
    m, rest = split_received(data)
    assert msg.sender == "" and m["proto"] == b"ESMTP" and m["tls"] is None and rest == MESSAGE


def test_helo_client_gets_smtp_protocol(srv):
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], local_hostname="old.test") as s:
        s.helo("old.test")
        s.sendmail("a@remote.test", [USER], MESSAGE)
    m, _ = split_received(srv.queued()[0][1])
    assert m["proto"] == b"SMTP"


def test_port465_implicit_tls_auth_login_relays_and_adds_headers(srv):
    bare = b"Subject: no id, no date\r\n\r\nbody\r\n"
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=srv.client_tls(False)) as s:
        s.ehlo("laptop")
        assert "PLAIN LOGIN" in s.esmtp_features["auth"]
        s.login(USER, PASSWORD, initial_response_ok=False)  # PLAIN after a 334 (LOGIN: see below)
        s.sendmail(USER, ["friend@remote.test"], bare)
    [(msg, data)] = srv.queued()
    assert msg.recipients == ["friend@remote.test"] and msg.meta["auth_user"] == USER
    assert msg.meta["listener"] == "submissions"
    m, rest = split_received(data)
    assert m["proto"] == b"ESMTPSA"
    head, _, body = rest.partition(b"Subject:")
    assert re.fullmatch(rb"Message-ID: <[^>]+@mail\.example\.test>\r\nDate: [^\r\n]+\r\n", head), head
    assert b"Subject:" + body == bare


def test_auth_login_mechanism(srv):
    with RawClient(srv, "submissions") as c:
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        assert c.cmd("YWxpY2VAZXhhbXBsZS50ZXN0") == "334 UGFzc3dvcmQ6"  # alice@example.test
        assert c.cmd("YWxpY2UgcHc=").startswith("235 2.7.0")  # "alice pw"


def test_port587_starttls_auth_plain(srv):
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.ehlo("laptop")
        assert "auth" not in s.esmtp_features  # never offered in the clear
        s.starttls(context=srv.client_tls(False))
        s.ehlo("laptop")
        s.login(USER, PASSWORD)
        s.sendmail(USER, ["x@remote.test", OTHER], MESSAGE)
    [(msg, data)] = srv.queued()
    _, rest = split_received(data)
    assert rest == MESSAGE  # has Message-ID and Date already: nothing added
    assert msg.meta["listener"] == "submission" and msg.meta["auth_user"] == USER


@pytest.mark.parametrize("listener", ["smtp", "submission", "submissions"])
def test_aiosmtplib(srv, listener):
    async def send():
        implicit = listener == "submissions"
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.ports[listener], use_tls=implicit,
                                 start_tls=not implicit, tls_context=srv.client_tls(False), timeout=10)
        async with client:
            if listener != "smtp":
                await client.login(USER, PASSWORD)
            errors, reply = await client.sendmail(USER, [OTHER], MESSAGE)
            assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")
            return reply.rsplit(" ", 1)[1]

    qid = asyncio.run(send())
    [(msg, data)] = srv.queued()
    assert msg.qid == qid and split_received(data)[1] == MESSAGE


def swaks(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--helo", "swaks.test", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_swaks_pipelining_port25(srv):
    r = swaks("--port", str(srv.ports["smtp"]), "--from", "x@remote.test", "--to", f"{USER},{OTHER}",
              "--pipeline", "--header", "Subject: piped", "--body", "hello")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    [(msg, data)] = srv.queued()
    assert msg.recipients == [USER, OTHER] and b"Subject: piped" in data


def test_swaks_auth_submission_and_submissions(srv):
    for extra in (["--port", str(srv.ports["submission"]), "--tls", "--auth", "PLAIN"],
                  ["--port", str(srv.ports["submissions"]), "--tlsc", "--auth", "LOGIN"]):
        r = swaks(*extra, "--auth-user", USER, "--auth-password", PASSWORD, "--from", USER,
                  "--to", "far@remote.test", "--pipeline")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "235 2.7.0" in r.stdout
    assert len(srv.queued()) == 2


def test_swaks_wrong_password(srv):
    r = swaks("--port", str(srv.ports["submissions"]), "--tlsc", "--auth", "PLAIN", "--auth-user", USER,
              "--auth-password", "wrong", "--from", USER, "--to", "far@remote.test")
    assert r.returncode != 0 and "535 5.7.8" in r.stdout
    assert srv.queued() == []


def test_pipelined_commands_answered_in_order(srv):
    with RawClient(srv) as c:
        c.reply()
        c.send("EHLO p\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
               "RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert c.reply().startswith("250-mail.example.test")
        assert [c.reply()[:9] for _ in range(5)] == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354 End d"]
        c.send("Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n")
        assert c.reply().startswith("250 2.0.0 Ok: queued as ")
        assert c.reply() == "221 2.0.0 Bye"
    assert srv.queued()[0][0].recipients == [USER, OTHER]


# --- EHLO ---------------------------------------------------------------------------------
def ehlo_caps(c: RawClient) -> list[str]:
    return [line[4:] for line in c.cmd("EHLO me").splitlines()[1:]]


def test_ehlo_capabilities(srv):
    with RawClient(srv) as c:
        assert c.reply().startswith(f"220 {HOSTNAME} ")
        caps = ehlo_caps(c)
        for cap in ("PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"):
            assert cap in caps
        assert not any(cap.startswith("AUTH") for cap in caps)
        c.starttls()
        caps = ehlo_caps(c)
        assert "STARTTLS" not in caps and "AUTH PLAIN LOGIN" in caps
    with RawClient(srv, "submissions") as c:
        c.reply()
        caps = ehlo_caps(c)
        assert "STARTTLS" not in caps and "AUTH PLAIN LOGIN" in caps


# --- refusals -------------------------------------------------------------------------------
def session(srv, listener="smtp", tls=False, login=False) -> RawClient:
    c = RawClient(srv, listener)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.test")
    if tls:
        c.starttls()
        c.cmd("EHLO client.test")
    if login:
        assert c.login().startswith("235 2.7.0")
    return c


def test_unknown_user_and_relay_denied(srv):
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@remote.test>").startswith("250 2.1.0")
        assert c.cmd("RCPT TO:<nobody@example.test>") == \
            "550 5.1.1 <nobody@example.test>: Recipient address rejected: user unknown"
        assert c.cmd("RCPT TO:<someone@remote.test>") == "554 5.7.1 <someone@remote.test>: Relay access denied"
        assert c.cmd("DATA").startswith("554 5.5.1")  # no valid recipients


# (address as sent, expected reply prefix); a 250 must mean local delivery.
RELAY_TRICKS = [
    ("<user%remote.test@example.test>", "550 5.1.1"),
    ('<"user@remote.test"@example.test>', "550 5.1.1"),
    ("<@example.test:user@remote.test>", "554 5.7.1"),
    ("<@example.test,@other.test:user@remote.test>", "554 5.7.1"),
    ("<user@remote.test@example.test>", "501 5.1.3"),
    ("<remote.test!user@example.test>", "550 5.1.1"),
    ("<user@remote.test>", "554 5.7.1"),
    ("<user@[127.0.0.1]>", "554 5.7.1"),
    ("<user@remote.test.>", "501 5.1.3"),
    ("<alice@example.test>@remote.test", "501 5.5.4"),
    # accepted, and local: a catch-all domain, a source route to a local address, and the bare
    # <postmaster> that RFC 5321 4.5.1 requires (it goes to the postmaster account)
    ("<postmaster>", "250 2.1.5"),
    ("<user%remote.test@other.test>", "250 2.1.5"),
    ('<"user@remote.test"@other.test>', "250 2.1.5"),
    ("<remote.test!user@other.test>", "250 2.1.5"),
    ("<@remote.test:alice@example.test>", "250 2.1.5"),
    ("<ALICE@EXAMPLE.TEST>", "250 2.1.5"),
]


@pytest.mark.parametrize("loop", LOOPS)
def test_no_open_relay_under_any_address_trick(make_server, loop):
    srv = make_server(loop=loop, smtp={"max_errors": 100})  # every refusal counts as an error
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<spammer@remote.test>").startswith("250")
        for address, expected in RELAY_TRICKS:
            assert c.cmd(f"RCPT TO:{address}").startswith(expected), address
        assert c.cmd("RSET").startswith("250")
    # Also after STARTTLS (unauthenticated): nothing changes.
    with session(srv, tls=True) as c:
        assert c.cmd("MAIL FROM:<spammer@remote.test>").startswith("250")
        for address, expected in RELAY_TRICKS:
            assert c.cmd(f"RCPT TO:{address}").startswith(expected), address
        assert c.cmd("DATA").startswith("354")
        assert c.cmd("Subject: x\r\n\r\nx\r\n.").startswith("250 2.0.0")
    [(msg, _)] = srv.queued()
    directory = srv.services.directory
    assert len(msg.recipients) == 6
    for rcpt in msg.recipients:
        assert directory.resolve(rcpt).kind in ("local", "alias"), rcpt
        local, remote = directory.expand(rcpt)
        assert local == [USER] and remote == [], rcpt


def test_trusted_network_may_relay(make_server):
    srv = make_server(smtp={"trusted_networks": ["127.0.0.0/8"]})
    with session(srv) as c:
        c.cmd("MAIL FROM:<app@example.test>")
        assert c.cmd("RCPT TO:<someone@remote.test>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<nobody@example.test>").startswith("550 5.1.1")


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_submission_requires_auth(srv, listener):
    with session(srv, listener, tls=listener == "submission") as c:
        assert c.cmd(f"MAIL FROM:<{USER}>") == "530 5.7.0 Authentication required"
        assert c.cmd(f"RCPT TO:<{OTHER}>").startswith("503 5.5.1")


def test_auth_needs_tls(srv):
    for listener in ("smtp", "submission"):
        with session(srv, listener) as c:
            assert c.login().startswith("538 5.7.11")


def test_authenticated_user_relays_via_port25(srv):
    with session(srv, tls=True, login=True) as c:
        assert c.cmd(f"MAIL FROM:<{USER}>").startswith("250")
        assert c.cmd("RCPT TO:<far@remote.test>").startswith("250 2.1.5")


def test_sender_must_be_owned(srv):
    with session(srv, "submissions", login=True) as c:
        assert c.cmd(f"MAIL FROM:<{OTHER}>") == f"553 5.7.1 <{OTHER}>: Sender address rejected: not owned by user"
        assert c.cmd("MAIL FROM:<>").startswith("553 5.7.1")
        assert c.cmd("MAIL FROM:<x@remote.test>").startswith("553 5.7.1")
        assert c.cmd("MAIL FROM:<alice+tag@example.test>").startswith("250 2.1.0")  # +tag is hers
        c.cmd("RSET")
        assert c.cmd("MAIL FROM:<sales@example.test>").startswith("250 2.1.0")  # alias of hers


def test_auth_failures_are_slowed_and_refused(srv):
    with session(srv, "submissions") as c:
        assert c.login(USER, "nope") == "535 5.7.8 Error: authentication failed"
        start = time.monotonic()
        assert c.login(USER, "nope again").startswith("535 5.7.8")
        assert time.monotonic() - start >= 0.04  # the throttle's delay (fail_delay 0.05 in tests)
        assert c.cmd("AUTH CRAM-MD5").startswith("504 5.5.4")
        assert c.cmd("AUTH PLAIN !!!").startswith("501 5.5.2")
        assert c.cmd("AUTH PLAIN") == "334 "
        assert c.cmd("*").startswith("501 5.7.0")
        assert c.login().startswith("235 2.7.0")
        assert c.login().startswith("503 5.5.1")


def test_size_declared_and_actual(make_server):
    srv = make_server(smtp={"max_message_size": 10_000})
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@remote.test> SIZE=10001").startswith("552 5.3.4")
        assert c.cmd("MAIL FROM:<a@remote.test> SIZE=9000").startswith("250")
        c.cmd(f"RCPT TO:<{USER}>")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200)
        assert c.cmd(".").startswith("552 5.3.4")
        assert c.cmd("NOOP") == "250 2.0.0 Ok"  # the session goes on
    assert srv.queued() == []


def test_too_many_recipients(make_server):
    srv = make_server(smtp={"max_recipients": 2})
    with session(srv) as c:
        c.cmd("MAIL FROM:<a@remote.test>")
        assert c.cmd(f"RCPT TO:<{USER}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{OTHER}>").startswith("250")
        assert c.cmd("RCPT TO:<sales@example.test>") == "452 4.5.3 Too many recipients"


def test_command_line_too_long(srv):
    with session(srv) as c:
        assert c.cmd("NOOP " + "x" * 5000) == "500 5.5.2 Error: line too long"
        assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_data_line_too_long_refused_at_end(make_server):
    srv = make_server(smtp={"max_line_length": 1000})
    with session(srv) as c:
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd(f"RCPT TO:<{USER}>")
        c.cmd("DATA")
        c.send(b"Subject: long\r\n\r\n" + b"y" * 1001 + b"\r\nmore\r\n")
        assert c.cmd(".").startswith("500 5.5.2")
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert srv.queued() == []


def test_unknown_and_out_of_order_commands(srv):
    with RawClient(srv) as c:
        c.reply()
        assert c.cmd("MAIL FROM:<a@remote.test>").startswith("503 5.5.1")
        assert c.cmd("FOO").startswith("500 5.5.1")
        assert c.cmd("EHLO x").startswith("250")
        assert c.cmd("RCPT TO:<alice@example.test>").startswith("503 5.5.1")
        assert c.cmd("MAIL FROM:<a@remote.test> FOO=BAR").startswith("555 5.5.4")
        assert c.cmd("MAIL FROM:a@remote.test").startswith("501 5.1.7")
        assert c.cmd("MAIL FROM:<ü@remote.test>").startswith("553 5.6.7")
        assert c.cmd("MAIL FROM:<ü@remote.test> SMTPUTF8 BODY=8BITMIME").startswith("250 2.1.0")
        assert c.cmd("MAIL FROM:<a@remote.test>").startswith("503 5.5.1")  # nested
        assert c.cmd("VRFY alice").startswith("502 5.5.1")
        assert c.send(b"NOOP \xff\r\n") is None and c.reply().startswith("500 5.5.2")


def test_max_errors_disconnects(make_server):
    srv = make_server(smtp={"max_errors": 3})
    with RawClient(srv) as c:
        c.reply()
        assert c.cmd("BAD1").startswith("500")
        assert c.cmd("BAD2").startswith("500")
        assert c.cmd("BAD3").startswith("500")
        assert c.reply() == f"421 4.7.0 {HOSTNAME} Error: too many errors"
        assert c.closed()


def test_command_timeout(make_server):
    srv = make_server(smtp={"command_timeout": 1})
    with RawClient(srv) as c:
        c.reply()
        start = time.monotonic()
        assert c.reply() == f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"
        assert 0.9 < time.monotonic() - start < 5
        assert c.closed()


def test_command_timeout_counts_from_the_last_read_not_the_first(make_server):
    # One idle timer a session (server.py): it was armed by the first read, fires while the
    # client is still busy with later commands, and must then wait for the current read's
    # own deadline, mid-DATA too.
    srv = make_server(smtp={"command_timeout": 1})
    with RawClient(srv) as c:
        c.reply()
        start = time.monotonic()
        while time.monotonic() - start < 2.5:
            assert c.cmd("NOOP").startswith("250")
            time.sleep(0.4)
        assert c.cmd("EHLO client.example.org").startswith("250")
        assert c.cmd(f"MAIL FROM:<{OTHER}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{USER}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        start = time.monotonic()
        while time.monotonic() - start < 2.5:
            c.send(b"Subject: slow\r\n")
            time.sleep(0.4)
        c.send(b"\r\nbody\r\n.\r\n")
        assert c.reply().startswith("250")
        last = time.monotonic()
        assert c.reply() == f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"
        assert 0.9 < time.monotonic() - last < 5
        assert c.closed()


def test_session_time_limit(make_server):
    srv = make_server(smtp={"max_session_time": 1})
    with RawClient(srv) as c:
        c.reply()
        start = time.monotonic()
        while time.monotonic() - start < 5:
            reply = c.cmd("NOOP")
            if reply.startswith("421"):
                break
            time.sleep(0.1)
        assert reply == f"421 4.4.2 {HOSTNAME} Error: session time limit exceeded"
        assert c.closed()


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_limits(make_server, loop):
    srv = make_server(loop=loop, smtp={"max_connections": 3, "max_connections_per_ip": 2})
    first, second = RawClient(srv), RawClient(srv, "submission")
    assert first.reply().startswith("220") and second.reply().startswith("220")
    with RawClient(srv) as third:  # same IP: over the per-IP limit
        assert third.reply() == f"421 4.7.0 {HOSTNAME} Error: too many connections"
        assert third.closed()
    first.cmd("QUIT")
    assert first.closed()
    wait_for(lambda: srv.call(lambda: srv.services.sessions.count("smtp")) == 1, 5, what="session gone")
    with RawClient(srv, "submissions") as again:
        assert again.reply().startswith("220")
    second.close()


def test_total_connection_limit(make_server):
    srv = make_server(smtp={"max_connections": 1})
    with RawClient(srv) as first:
        assert first.reply().startswith("220")
        with RawClient(srv) as second:
            assert second.reply().startswith("421 4.7.0")


def test_shutdown_says_421(srv):
    with session(srv) as c:
        srv.call(lambda: [s.close_for_shutdown() for s in list(srv.services.sessions.sessions)])
        assert c.reply() == "421 4.3.2 Service shutting down"
        assert c.closed()


def test_enqueue_failure_is_451_never_250(srv):
    incoming = srv.cfg.queue_dir / "incoming"
    incoming.rmdir()
    incoming.write_text("not a directory")
    with session(srv) as c:
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd(f"RCPT TO:<{USER}>")
        c.cmd("DATA")
        assert c.cmd("Subject: x\r\n\r\nx\r\n.").startswith("451 4.3.0")


def test_log_lines(srv, caplog):
    caplog.set_level(logging.INFO, logger="mailstack.smtp")
    with session(srv) as c:
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd("RCPT TO:<x@remote.test>")
        c.cmd(f"RCPT TO:<{USER}>")
        c.cmd("DATA")
        qid = c.cmd("Subject: x\r\n\r\nx\r\n.").rsplit(" ", 1)[1]
    queued = [r for r in caplog.records if r.getMessage().endswith("(queued)")]
    assert len(queued) == 1 and queued[0].qid == qid and queued[0].client == "127.0.0.1"
    assert re.fullmatch(r"from=<a@remote\.test>, size=\d+, nrcpt=1 \(queued\)", queued[0].getMessage())
    assert any("Relay access denied" in r.getMessage() and "x@remote.test" in r.getMessage()
               for r in caplog.records)


# --- smuggling and bare line ends ---------------------------------------------------------------
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"]


@pytest.mark.parametrize("bare", ["reject", "normalize"])
def test_smuggling_forms_over_the_wire(make_server, bare):
    srv = make_server(smtp={"bare_lf": bare})
    for form in SMUGGLING:
        with session(srv) as c:
            c.cmd("MAIL FROM:<a@remote.test>")
            c.cmd(f"RCPT TO:<{USER}>")
            assert c.cmd("DATA").startswith("354")
            # a smuggled second message: must never become a transaction of its own
            c.send(b"Subject: outer\r\n\r\nouter" + form +
                   b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                   b"Subject: smuggled\r\n\r\ninner\r\n.\r\n")
            reply = c.reply()
            if bare == "reject":
                assert reply == "550 5.6.0 Message contains bare LF or CR", form
            else:
                assert reply.startswith("250 2.0.0"), form
            assert c.cmd("NOOP") == "250 2.0.0 Ok", form  # nothing else was answered
    queued = srv.queued()
    if bare == "reject":
        assert queued == []
    else:
        assert len(queued) == len(SMUGGLING)
        for msg, data in queued:
            _, text = split_received(data)
            assert text.startswith(b"Subject: outer") and b"MAIL FROM:<ceo@example.test>\r\n" in text
            assert text.count(b"\r") == text.count(b"\n") == text.count(b"\r\n")


@pytest.mark.parametrize("bare", ["reject", "normalize"])
def test_bare_lf_in_commands(make_server, bare):
    srv = make_server(smtp={"bare_lf": bare})
    with RawClient(srv) as c:
        c.reply()
        c.send("EHLO x\nNOOP\r\n")
        if bare == "reject":
            assert c.reply() == "500 5.5.2 Error: bare LF/CR not allowed"
        else:
            assert c.reply().startswith("250-")
        assert c.reply() == "250 2.0.0 Ok"
        c.send("NOOP\rNOOP\r\n")
        if bare == "reject":
            assert c.reply().startswith("500 5.5.2")
        else:
            assert c.reply() == "250 2.0.0 Ok" and c.reply() == "250 2.0.0 Ok"


def test_bare_lf_in_text_with_normalize_is_stored_with_crlf(make_server):
    srv = make_server(smtp={"bare_lf": "normalize"})
    with session(srv) as c:
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd(f"RCPT TO:<{USER}>")
        c.cmd("DATA")
        assert c.cmd("Subject: lf\n\nline1\nline2\r\nline3\r\n.").startswith("250 2.0.0")
    _, text = split_received(srv.queued()[0][1])
    assert text == b"Subject: lf\r\n\r\nline1\r\nline2\r\nline3\r\n"


# --- STARTTLS -----------------------------------------------------------------------------
def test_starttls_command_injection_is_discarded(srv):
    with RawClient(srv) as c:
        c.reply()
        c.cmd("EHLO x")
        c.send("STARTTLS\r\nEHLO injected\r\n")  # EHLO in the same packet, in the clear
        assert c.reply().startswith("220 2.0.0")
        c.sock = srv.client_tls().wrap_socket(c.sock, server_hostname=HOSTNAME)
        # Had the injected EHLO run inside TLS, its 250 would come first and MAIL would be accepted.
        assert c.cmd("MAIL FROM:<a@remote.test>") == "503 5.5.1 Error: send HELO/EHLO first"


def test_starttls_resets_state_and_refuses_twice(srv):
    with session(srv) as c:
        c.cmd("MAIL FROM:<a@remote.test>")
        c.starttls()
        assert c.cmd("MAIL FROM:<a@remote.test>").startswith("503 5.5.1")  # HELO forgotten
        c.cmd("EHLO again")
        assert c.cmd("STARTTLS").startswith("554 5.5.1")
        assert c.cmd("MAIL FROM:<a@remote.test>").startswith("250")
    with session(srv, "submissions") as c:
        assert c.cmd("STARTTLS").startswith("554 5.5.1")


def test_failed_handshake_closes_only_that_session(srv):
    with session(srv) as c:
        assert c.cmd("STARTTLS").startswith("220")
        c.send(b"this is not a TLS client hello\r\n" * 4)
        assert c.closed()
    with session(srv) as c:
        assert c.cmd("NOOP") == "250 2.0.0 Ok"


# --- memory bound -----------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
def test_data_in_flight_bound(make_server, loop):
    MiB = 1024 * 1024
    srv = make_server(loop=loop, smtp={"max_data_in_flight": MiB})
    line = b"z" * 98 + b"\r\n"
    big = line * (700 * 1024 // len(line))

    def used():
        return srv.call(lambda: srv.services.extra["smtp_data_budget"].used)

    a, b = session(srv), session(srv)
    for c in (a, b):
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd(f"RCPT TO:<{USER}>")
        assert c.cmd("DATA").startswith("354")
    a.send(big)  # A holds ~700 KiB, not finished
    wait_for(lambda: used() >= len(big) - 1024, 10, what="A's data in flight")
    b.send(big)
    assert b.cmd(".") == "451 4.3.1 Insufficient system resources, try again later"
    assert a.cmd(".").startswith("250 2.0.0")
    assert used() == 0
    # B retries now that memory is free
    b.cmd("MAIL FROM:<a@remote.test>")
    b.cmd(f"RCPT TO:<{USER}>")
    b.cmd("DATA")
    b.send(big)
    assert b.cmd(".").startswith("250 2.0.0")
    a.close(), b.close()
    sizes = [len(split_received(data)[1]) for _, data in srv.queued()]
    assert sizes == [len(big), len(big)]


def test_smtputf8_and_8bitmime_recorded(srv):
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<jürgen@bücher.example> SMTPUTF8 BODY=8BITMIME").startswith("250 2.1.0")
        assert c.cmd(f"RCPT TO:<{USER}>").startswith("250 2.1.5")
        c.cmd("DATA")
        c.send("Subject: Grüße\r\n\r\nÄpfel\r\n".encode())
        assert c.cmd(".").startswith("250 2.0.0")
    [(msg, data)] = srv.queued()
    assert msg.sender == "jürgen@bücher.example"
    assert msg.meta["smtputf8"] is True and msg.meta["body"] == "8BITMIME"
    assert split_received(data)[1] == "Subject: Grüße\r\n\r\nÄpfel\r\n".encode()


def test_a_client_that_hangs_up_while_its_message_is_stored_does_not_cut_it_short(tmp_path):
    # The store runs in the session's own task (no shielded task of its own since session 4):
    # a hang-up then must not cancel it.  The spool's write is held until the connection is
    # gone on the server's side, and the whole message must still be queued, exactly.
    with SMTPServer(tmp_path) as srv:
        spool = srv.services.spool
        real_enqueue = spool.enqueue
        release = asyncio.Event()

        async def held_enqueue(*args, **kwargs):
            await release.wait()
            return await real_enqueue(*args, **kwargs)

        spool.enqueue = held_enqueue
        c = srv.connect()
        assert c.reply().startswith("220")
        assert c.cmd("EHLO client.example.org").startswith("250")
        assert c.cmd("MAIL FROM:<someone@remote.test>").startswith("250")
        assert c.cmd(f"RCPT TO:<{USER}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        wait_for(lambda: any(s.busy for s in list(srv.services.sessions.sessions)), 10,
                 what="the session storing the message")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()  # a reset: the server's transport is lost at once
        wait_for(lambda: srv.call(lambda: all(s.transport is None for s in list(srv.services.sessions.sessions))),
                 10, what="the server seeing the hang-up")
        srv.call(release.set)
        wait_for(lambda: srv.queued(), 10, what="the message in the queue")
        [(msg, data)] = srv.queued()
        assert msg.recipients == [USER]
        _, rest = split_received(data)
        assert rest == MESSAGE
