"""POP3 server in process: real sockets, real TLS, real store, poplib and raw sockets as clients."""
from __future__ import annotations

import base64
import poplib
import socket
import time

import pytest

from harness import wait_for
from pop3_fixture import OTHER, OTHER_PASSWORD, PASSWORD, USER, POP3Server

LF_MSG = b"From: x@example.test\nSubject: lf\n\nline one\n.dot line\n..two dots\n.\nlast\n"
CRLF_MSG = b"From: y@example.test\r\nSubject: crlf\r\n\r\nbody\r\n.\r\nafter lone dot\r\n"
NOEOL_MSG = b"Subject: no eol\r\n\r\nno newline at the end"


@pytest.fixture
def srv(tmp_path):
    server = POP3Server(tmp_path)
    yield server
    server.stop()


@pytest.fixture(params=["asyncio", "uvloop"])
def any_loop_srv(tmp_path, request):
    server = POP3Server(tmp_path, loop=request.param)
    yield server
    server.stop()


def deliver_three(srv, account=USER):
    for msg in (LF_MSG, CRLF_MSG, NOEOL_MSG):
        srv.deliver(account, msg)


def retr_raw(client, n: int) -> tuple[bytes, bytes]:
    """(status line, exact bytes between it and the terminating .CRLF)."""
    status = client.cmd(b"RETR %d" % n)
    body = b"".join(client.multiline())
    return status, body


# --- every command, both listeners ----------------------------------------------------

@pytest.mark.parametrize("how", ["stls", "pop3s"])
def test_every_command_with_poplib(any_loop_srv, how):
    srv = any_loop_srv
    deliver_three(srv)
    p = srv.pop3_stls() if how == "stls" else srv.pop3s()
    caps = p.capa()
    assert "USER" in caps and caps["SASL"] == ["PLAIN"] and "UIDL" in caps and "TOP" in caps
    assert "RESP-CODES" in caps and "PIPELINING" in caps and "STLS" not in caps
    assert p.user(USER).startswith(b"+OK")
    assert p.pass_(PASSWORD).startswith(b"+OK")
    count, octets = p.stat()
    assert count == 3
    resp, listing, _ = p.list()
    sizes = {int(n): int(s) for n, s in (line.split() for line in listing)}
    assert sorted(sizes) == [1, 2, 3] and sum(sizes.values()) == octets
    assert p.list(2) == b"+OK 2 %d" % sizes[2]
    resp, uidls, _ = p.uidl()
    uids = dict(line.split() for line in uidls)
    assert len(set(uids.values())) == 3
    assert p.uidl(3).split()[2] == uids[b"3"]
    resp, lines, _ = p.retr(1)
    assert lines == LF_MSG.rstrip(b"\n").split(b"\n")  # poplib unstuffs ".." -> "."
    resp, lines, _ = p.top(2, 1)
    assert lines == [b"From: y@example.test", b"Subject: crlf", b"", b"body"]
    resp, lines, _ = p.top(2, 0)
    assert lines == [b"From: y@example.test", b"Subject: crlf", b""]
    assert p.noop().startswith(b"+OK")
    assert p.dele(1).startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match="already deleted"):
        p.retr(1)
    assert p.stat() == (2, octets - sizes[1])
    assert p.rset().startswith(b"+OK")
    assert p.stat() == (3, octets)
    p.dele(1)
    p.dele(3)
    assert p.quit().startswith(b"+OK")
    # UPDATE applied: only message 2 is left, with the same UIDL as before.
    p = srv.login()
    assert p.stat() == (1, sizes[2])
    resp, uidls, _ = p.uidl()
    assert uidls == [b"1 " + uids[b"2"]]
    assert p.retr(1)[1] == CRLF_MSG.rstrip(b"\r\n").split(b"\r\n")
    p.quit()


def test_sizes_are_the_messages_not_the_transmissions(any_loop_srv):
    """RFC 1939: LIST/STAT count the message in CRLF form, not RETR's dot-stuffing (issue 10:
    206 was listed for a 205-octet message), as Dovecot does."""
    srv = any_loop_srv
    big_lf = b"Subject: big\n\n" + b"".join(b".%06d dotted line stored with LF\n" % i for i in range(40000))
    messages = (LF_MSG, CRLF_MSG, NOEOL_MSG, big_lf, b".starts with dot\n", b"x")
    for msg in messages:
        srv.deliver(USER, msg)
    c = srv.raw()
    c.cmd(b"USER " + USER.encode())
    assert c.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
    stat = c.cmd(b"STAT").split()
    assert c.cmd(b"LIST").startswith(b"+OK")
    listing = [line.split() for line in c.multiline()]
    total = biggest = 0
    for (n, size), msg in zip(listing, messages):
        status, body = retr_raw(c, int(n))
        assert status == b"+OK %s octets\r\n" % size
        crlf = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert int(size) == len(crlf), f"message {n}"
        unstuffed = b"\r\n".join(x[1:] if x.startswith(b"..") else x for x in body.split(b"\r\n"))
        assert unstuffed == (crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n")
        assert body.endswith(b"\r\n") and b"\n" not in body.replace(b"\r\n", b"")
        total += int(size)
        biggest = max(biggest, len(body))
    assert int(stat[2]) == total and int(stat[1]) == 6
    assert biggest > 1024 * 1024  # the big one went out in several pieces
    c.cmd(b"QUIT")


def test_dot_line_size_matches_poplib(srv):
    message = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n"
    srv.deliver(USER, message)
    p = srv.login()
    assert p.stat() == (1, len(message))
    assert p.list(1) == b"+OK 1 %d" % len(message)
    resp, lines, octets = p.retr(1)
    assert resp == b"+OK %d octets" % len(message) and octets == len(message)
    assert b"\r\n".join(lines) + b"\r\n" == message
    # TOP sends the same bytes, stuffed on the wire and whole after poplib removes it
    resp, lines, octets = p.top(1, 2)
    assert lines == [b"Subject: dots", b"", b".leading dot", b"..two dots"]
    p.quit()


def test_sizes_are_cached_in_the_store_beside_other_entries(srv):
    deliver_three(srv)
    box = srv.call(srv.services.store.open(USER, "INBOX"))
    uids = [m.uid for m in box.messages]
    srv.call(box.cache_put({uids[0]: {"imap": {"envelope": "x"}}}))  # what the IMAP layer keeps
    p = srv.login()
    sizes = [int(line.split()[1]) for line in p.list()[1]]
    p.quit()
    entries = [srv.call(box.cache_get(uid)) for uid in uids]
    assert [e["pop3"]["size"] for e in entries] == sizes
    assert entries[0]["imap"] == {"envelope": "x"}  # not clobbered
    # The next login takes sizes from the cache, not from reading every message again.
    srv.call(box.cache_put({uids[1]: {**entries[1], "pop3": {"size": 12345, "v": 2}}}))
    p = srv.login()
    assert int(p.list(2).split()[2]) == 12345
    p.quit()
    srv.call(box.close())


def test_auth_plain_initial_response_and_continuation(srv):
    srv.deliver(USER, LF_MSG)
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    p = srv.pop3s()
    assert p._shortcmd("AUTH PLAIN " + token).startswith(b"+OK")
    assert p.stat()[0] == 1
    p.quit()
    c = srv.raw()
    assert c.cmd(b"AUTH") == b"+OK Supported mechanisms\r\n" and c.multiline() == [b"PLAIN\r\n"]
    assert c.cmd(b"AUTH PLAIN") == b"+ \r\n"
    assert c.cmd(b"*").startswith(b"-ERR")
    assert c.cmd(b"AUTH PLAIN") == b"+ \r\n"
    assert c.cmd(token.encode()).startswith(b"+OK")
    c.cmd(b"QUIT")
    # Someone else's identity (authzid) is refused.
    c = srv.raw()
    bad = base64.b64encode(f"{OTHER}\0{USER}\0{PASSWORD}".encode())
    assert c.cmd(b"AUTH PLAIN " + bad).startswith(b"-ERR [AUTH]")
    assert c.cmd(b"AUTH CRAM-MD5").startswith(b"-ERR")
    assert c.cmd(b"AUTH PLAIN !!!").startswith(b"-ERR")
    c.close()


def test_plaintext_auth_refused_before_stls(srv):
    c = srv.raw(tls=False)
    assert c.cmd(b"CAPA").startswith(b"+OK")
    caps = c.multiline()
    assert b"STLS\r\n" in caps and b"USER\r\n" not in caps and not any(l.startswith(b"SASL") for l in caps)
    assert c.cmd(b"USER " + USER.encode()).startswith(b"-ERR [AUTH]")
    assert c.cmd(b"PASS " + PASSWORD.encode()).startswith(b"-ERR [AUTH]")
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    assert c.cmd(b"AUTH PLAIN " + token).startswith(b"-ERR [AUTH]")
    assert c.cmd(b"STAT").startswith(b"-ERR")  # still not logged in
    c.close()
    p = srv.pop3s()
    assert "STLS" not in p.capa()
    with pytest.raises(poplib.error_proto):
        p._shortcmd("STLS")
    p.quit()


def test_plaintext_allowed_by_config(tmp_path):
    srv = POP3Server(tmp_path, pop3={"allow_plaintext_auth": True})
    try:
        p = srv.pop3()
        assert "USER" in p.capa()
        p.user(USER)
        p.pass_(PASSWORD)
        assert p.stat() == (0, 0)
        p.quit()
    finally:
        srv.stop()


def test_stls_drops_plaintext_pipelined_after_it(any_loop_srv):
    srv = any_loop_srv
    raw = socket.create_connection(("127.0.0.1", srv.ports["pop3"]), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"+OK")
    # An attacker in the path appends a command to the client's STLS (CVE-2011-0411 style).
    raw.sendall(b"STLS\r\nCAPA\r\n")
    assert f.readline().startswith(b"+OK Begin TLS")
    tls = srv.client_tls().wrap_socket(raw, server_hostname="mail.example.test")
    tf = tls.makefile("rb")
    tls.sendall(b"NOOP\r\n")
    # The first answer inside TLS is the one to NOOP (not valid before login), not a CAPA list.
    assert tf.readline().startswith(b"-ERR")
    tls.sendall(b"STLS\r\n")
    assert tf.readline().startswith(b"-ERR")  # no STLS twice
    tls.close()


# --- UPDATE state, locking, IMAP view -----------------------------------------------------

def test_dropped_connection_deletes_nothing_and_releases_the_lock(srv):
    deliver_three(srv)
    c = srv.raw()
    c.cmd(b"USER " + USER.encode())
    assert c.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
    assert c.cmd(b"DELE 1").startswith(b"+OK")
    assert c.cmd(b"DELE 2").startswith(b"+OK")
    c.close()  # no QUIT

    def relogin():
        try:
            return srv.login()
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0]
            return None

    p = wait_for(relogin, 5, what="the lock to be released")
    assert p.stat()[0] == 3
    p.quit()


def test_mailbox_locked_for_one_session(srv):
    srv.deliver(USER, LF_MSG)
    first = srv.login()
    second = srv.pop3s()
    second.user(USER)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    # Another account is not affected.
    other = srv.login(OTHER, OTHER_PASSWORD)
    other.quit()
    first.quit()
    second.user(USER)
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_mailbox_lock_file_keeps_other_processes_out(srv):
    import fcntl
    import os
    import urllib.parse
    p = srv.login()
    path = srv.data_dir / "locks" / "pop3" / (urllib.parse.quote(USER, safe="@.-_+") + ".lock")
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p.quit()
        wait_for(lambda: not srv.services.extra["pop3_locks"].held(USER), 5)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
        # ... and while another process holds it, a login is refused with IN-USE.
        q = srv.pop3s()
        q.user(USER)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            q.pass_(PASSWORD)
        q.quit()
    finally:
        os.close(fd)


def test_imap_view_sees_pop3_deletions_as_expunged(srv):
    deliver_three(srv)
    events = []
    imap_view = srv.call(srv.services.store.open(USER, "INBOX"))
    uids = [m.uid for m in imap_view.messages]
    srv.call(_subscribe(srv, events))
    p = srv.login()
    p.dele(2)
    p.retr(1)
    p.quit()
    expunges = [e for e in events if e.kind == "expunge"]
    assert expunges and set(sum((e.uids for e in expunges), ())) == {uids[1]}
    changes = srv.call(imap_view.refresh())
    assert changes.expunged == [uids[1]]
    assert [m.uid for m in imap_view.messages] == [uids[0], uids[2]]
    assert "\\Seen" in imap_view.messages[0].flags  # RETR'd messages show as read
    srv.call(imap_view.close())


async def _subscribe(srv, events):
    srv.services.events.subscribe(USER, "INBOX", events.append)


def test_uidl_stable_across_sessions_and_restart(tmp_path):
    srv = POP3Server(tmp_path)
    try:
        deliver_three(srv)
        p = srv.login()
        first = p.uidl()[1]
        p.quit()
        p = srv.login()
        assert p.uidl()[1] == first
        p.quit()
    finally:
        srv.stop()
    srv = POP3Server(tmp_path)  # a new process's worth of objects on the same data directory
    try:
        p = srv.login()
        assert p.uidl()[1] == first
        p.dele(1)
        p.quit()
        p = srv.login()
        assert p.uidl()[1] == [b"1 " + first[1].split()[1], b"2 " + first[2].split()[1]]
        p.quit()
    finally:
        srv.stop()


# --- failed logins --------------------------------------------------------------------------

def test_failed_logins_are_slowed_by_the_shared_throttle(tmp_path):
    srv = POP3Server(tmp_path, auth={"fail_delay": 0.3, "fail_delay_max": 0.4})
    try:
        c = srv.raw()
        c.cmd(b"USER " + USER.encode())
        assert c.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
        # The same throttle object IMAP and SMTP AUTH use now holds this address and account.
        assert srv.services.throttle.delay_for("127.0.0.1", USER) == pytest.approx(0.3)
        c.cmd(b"USER " + USER.encode())
        t0 = time.monotonic()
        assert c.cmd(b"PASS wrong again").startswith(b"-ERR [AUTH]")
        second = time.monotonic() - t0
        assert second >= 0.3  # waited for the earned delay before the password was even checked
        c.cmd(b"USER " + USER.encode())
        assert c.cmd(b"PASS third").startswith(b"-ERR [AUTH]")
        assert c.closed_by_server()  # three strikes
        # A success makes this address known good for the account: the account's count (from
        # guesses anywhere) no longer slows it; the address keeps its own count.
        p = srv.login()
        p.quit()
        assert srv.services.throttle.known_good("127.0.0.1", USER)
    finally:
        srv.stop()


# --- bounds and bad input ---------------------------------------------------------------------

def test_malformed_and_oversized_commands_get_err_and_session_stays_usable(srv):
    srv.deliver(USER, LF_MSG)
    c = srv.raw()
    for bad in (b"", b"XYZZY", b"\x00\x01", b"US\xffER x", b"A" * 10000, b"STAT", b"RETR 1"):
        assert c.cmd(bad).startswith(b"-ERR"), bad
    c.cmd(b"USER " + USER.encode())
    assert c.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
    for bad in (b"RETR", b"RETR x", b"RETR 0", b"RETR 2", b"RETR 99999999999", b"TOP 1", b"TOP 1 -1",
                b"DELE", b"LIST 1 2", b"STAT 1", b"USER x", b"B" * 100000, b"LIST 4294967296"):
        assert c.cmd(bad).startswith(b"-ERR"), bad
    assert c.cmd(b"NOOP") == b"+OK\r\n"
    assert c.cmd(b"STAT").startswith(b"+OK 1 ")
    c.cmd(b"QUIT")


def test_too_many_errors_disconnects(tmp_path):
    srv = POP3Server(tmp_path, pop3={"max_errors": 3})
    try:
        c = srv.raw()
        assert c.cmd(b"BAD1").startswith(b"-ERR")
        assert c.cmd(b"BAD2").startswith(b"-ERR")
        assert b"too many errors" in c.cmd(b"BAD3")
        assert c.closed_by_server()
    finally:
        srv.stop()


def test_too_many_commands_disconnects(tmp_path):
    srv = POP3Server(tmp_path, pop3={"max_commands": 10})
    try:
        c = srv.raw()
        for _ in range(10):
            assert c.cmd(b"CAPA").startswith(b"+OK")
            c.multiline()
        assert c.cmd(b"CAPA").startswith(b"-ERR")
        assert c.closed_by_server()
    finally:
        srv.stop()


def test_idle_timeout_closes_session(tmp_path):
    srv = POP3Server(tmp_path, pop3={"idle_timeout": 1})
    try:
        c = srv.raw()
        t0 = time.monotonic()
        assert c.line().startswith(b"-ERR")  # arrives without us sending anything
        assert c.closed_by_server()
        assert 0.9 <= time.monotonic() - t0 < 5
    finally:
        srv.stop()


def test_connection_limits(tmp_path):
    srv = POP3Server(tmp_path, pop3={"max_connections_per_ip": 2})
    try:
        a, b = srv.raw(), srv.raw()
        wait_for(lambda: srv.services.sessions.count("pop3") == 2, 5)
        c = srv.raw(tls=False)
        assert c.greeting.startswith(b"-ERR [SYS/TEMP]")
        assert c.closed_by_server()
        a.cmd(b"QUIT")
        wait_for(lambda: srv.services.sessions.count("pop3") == 1, 5)
        d = srv.raw()
        assert d.greeting.startswith(b"+OK")
        for x in (b, d):
            x.close()
    finally:
        srv.stop()


def test_pipelined_commands_answered_in_order(srv):
    deliver_three(srv)
    c = srv.raw()
    c.send(b"USER %s\r\nPASS %s\r\nSTAT\r\nLIST 1\r\nUIDL\r\nRETR 3\r\nNOOP\r\nQUIT\r\n"
           % (USER.encode(), PASSWORD.encode()))
    assert c.line().startswith(b"+OK")  # USER
    assert c.line().startswith(b"+OK Logged in")
    assert c.line().startswith(b"+OK 3 ")
    assert c.line().startswith(b"+OK 1 ")
    assert c.line().startswith(b"+OK") and len(c.multiline()) == 3
    assert c.line().startswith(b"+OK") and c.multiline()[-1] == b"no newline at the end\r\n"
    assert c.line() == b"+OK\r\n"
    assert c.line().startswith(b"+OK")
    assert c.closed_by_server()


def test_shutdown_says_goodbye(srv):
    c = srv.raw()
    wait_for(lambda: srv.services.sessions.count("pop3") == 1, 5)

    async def close_all():
        for s in list(srv.services.sessions.sessions):
            s.close_for_shutdown()

    srv.call(close_all())
    assert c.line().startswith(b"-ERR [SYS/TEMP]")
    assert c.closed_by_server()
    wait_for(lambda: srv.services.sessions.count("pop3") == 0, 5)
