"""The IMAP session over real sockets (in-process listener, real TLS), with imaplib,
imapclient, aioimaplib and a raw socket client for exact protocol checks."""
from __future__ import annotations

import asyncio
import datetime
import imaplib
import random
import re
import socket
import threading
import time

import pytest

from harness import wait_for
from imap_fixtures import HOST, InProcessIMAP

ALICE, PW = "alice@example.test", "secret"
MSG = (b"From: Al <al@x.org>\r\nTo: alice@example.test\r\nSubject: hello %d\r\n"
       b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m%d@x.org>\r\n\r\nbody text %d\r\n")


def msg(n: int) -> bytes:
    return MSG % (n, n, n)


# Every in-process test runs on the real Maildir store and on the small in-memory one
# (which checks that the session relies only on the Store interface).
STORE_KINDS = ["memory", "maildir"]


@pytest.fixture(params=STORE_KINDS)
def srv(request, tmp_path):
    s = InProcessIMAP(tmp_path, store=request.param)
    yield s
    s.close()


class Raw:
    """A line-level IMAP client, so tests see exactly what the server sends."""

    def __init__(self, srv: InProcessIMAP, tls: bool = True, login: bool = True, timeout: float = 10) -> None:
        sock = socket.create_connection(("127.0.0.1", srv.ports["imaps" if tls else "imap"]), timeout=timeout)
        if tls:
            sock = srv.client_tls().wrap_socket(sock, server_hostname=HOST)
        self.sock = sock
        self.buf = b""
        self.n = 0
        self.greeting = self.line()
        if login:
            self.ok(f"LOGIN {ALICE} {PW}")

    def recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(self.buf)
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self.recv()
        line, self.buf = self.buf.split(b"\r\n", 1)
        m = re.search(rb"\{(\d+)\}$", line)
        if m:  # read the literal and the rest of the line
            need = int(m.group(1))
            while len(self.buf) < need:
                self.buf += self.recv()
            lit, self.buf = self.buf[:need], self.buf[need:]
            return line + b"\r\n" + lit + self.line()
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, text: str | bytes) -> tuple[list[bytes], bytes]:
        """Send a command; return (untagged lines, tagged line)."""
        self.n += 1
        tag = b"t%d" % self.n
        self.send(tag + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> tuple[list[bytes], bytes]:
        lines = []
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return lines, line
            lines.append(line)

    def ok(self, text) -> list[bytes]:
        lines, tagged = self.cmd(text)
        assert b" OK " in tagged, (text, lines, tagged)
        return lines

    def close(self) -> None:
        self.sock.close()


def imap_tls(srv) -> imaplib.IMAP4_SSL:
    c = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=_ctx(srv))
    c.login(ALICE, PW)
    return c


def _ctx(srv):
    ctx = srv.client_tls()
    ctx.check_hostname = False
    return ctx


# --- greeting, TLS, authentication ---------------------------------------------------------------

def test_plaintext_login_is_refused_until_starttls(srv):
    c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
    assert "LOGINDISABLED" in c.capabilities and "STARTTLS" in c.capabilities
    assert "AUTH=PLAIN" not in c.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        c.login(ALICE, PW)
    c.starttls(_ctx(srv))
    assert "LOGINDISABLED" not in c.capabilities and "AUTH=PLAIN" in c.capabilities
    assert "STARTTLS" not in c.capabilities
    typ, data = c.login(ALICE, PW)
    assert typ == "OK" and b"IDLE" in data[0]
    typ, caps = c.capability()
    for cap in (b"UIDPLUS", b"MOVE", b"NAMESPACE", b"SPECIAL-USE", b"CHILDREN", b"UNSELECT", b"LITERAL+"):
        assert cap in caps[0]
    c.logout()


def test_starttls_refuses_pipelined_plaintext(srv):
    s = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=5)
    s.recv(1000)
    s.sendall(b"a STARTTLS\r\nb LOGIN alice@example.test secret\r\n")
    data = b""
    while True:
        chunk = s.recv(1000)
        if not chunk:
            break
        data += chunk
    assert b"a BAD" in data and b"b OK" not in data


def test_plaintext_allowed_by_config(tmp_path):
    s = InProcessIMAP(tmp_path, {"allow_plaintext_auth": True})
    try:
        c = imaplib.IMAP4("127.0.0.1", s.ports["imap"])
        assert "LOGINDISABLED" not in c.capabilities
        assert c.login(ALICE, PW)[0] == "OK"
        c.logout()
    finally:
        s.close()


def test_failed_logins_are_slowed_down(srv):
    r = Raw(srv, login=False)
    _, tagged = r.cmd(f"LOGIN {ALICE} wrong")
    assert b"NO [AUTHENTICATIONFAILED]" in tagged
    durations = []
    for _ in range(2):
        t0 = time.monotonic()
        r.cmd(f"LOGIN {ALICE} wrong")
        durations.append(time.monotonic() - t0)
    assert durations[-1] >= 0.1  # fail_delay 0.05 doubled
    r.ok(f"LOGIN {ALICE} {PW}")


def test_authenticate_plain_with_and_without_initial_response(srv):
    import base64
    token = base64.b64encode(f"\0{ALICE}\0{PW}".encode()).decode()
    r = Raw(srv, login=False)
    assert b"AUTH=PLAIN" in r.greeting and b"SASL-IR" in r.greeting
    r.ok(f"AUTHENTICATE PLAIN {token}")
    r.close()
    r = Raw(srv, login=False)
    r.send(b"a AUTHENTICATE PLAIN\r\n")
    assert r.line() == b"+ "
    r.send(token.encode() + b"\r\n")
    _, tagged = r.until(b"a")
    assert tagged.startswith(b"a OK")
    r = Raw(srv, login=False)
    r.send(b"a AUTHENTICATE PLAIN\r\n")
    r.line()
    r.send(b"*\r\n")
    assert r.until(b"a")[1].startswith(b"a BAD")
    _, tagged = r.cmd("AUTHENTICATE PLAIN " + base64.b64encode(f"\0{ALICE}\0bad".encode()).decode())
    assert b"NO [AUTHENTICATIONFAILED]" in tagged


def test_commands_in_wrong_state(srv):
    r = Raw(srv, login=False)
    assert b"BAD" in r.cmd("SELECT INBOX")[1]
    assert b"BAD" in r.cmd("FETCH 1 FLAGS")[1]
    r.ok(f"LOGIN {ALICE} {PW}")
    assert b"BAD" in r.cmd("FETCH 1 FLAGS")[1]
    assert b"BAD" in r.cmd(f"LOGIN {ALICE} {PW}")[1]
    lines = r.ok("ID NIL")
    assert lines[0].startswith(b'* ID ("name"')
    assert r.ok("NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL']
    assert r.ok("ENABLE X-UNKNOWN") == [b"* ENABLED"]
    lines, tagged = r.cmd("LOGOUT")
    assert lines == [b"* BYE Logging out"] and b"OK" in tagged


# --- SELECT, FETCH, STORE, SEARCH ------------------------------------------------------------------

def test_select_reports_mailbox_state(srv):
    for i in range(3):
        srv.deliver(ALICE, msg(i))
    r = Raw(srv)
    lines, tagged = r.cmd("SELECT INBOX")
    text = b"\n".join(lines)
    assert b"* 3 EXISTS" in lines and b"* 3 RECENT" in lines
    assert b"* OK [UNSEEN 1]" in text and b"* OK [UIDVALIDITY " in text and b"* OK [UIDNEXT 4]" in text
    assert b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft)" in lines
    assert b"PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft \\*)" in text
    assert tagged.endswith(b"OK [READ-WRITE] SELECT completed")
    # a second session does not get \Recent for the same messages
    r2 = Raw(srv)
    lines, tagged = r2.cmd("EXAMINE INBOX")
    assert b"* 0 RECENT" in lines and b"[READ-ONLY]" in tagged
    assert b"NO" in r2.cmd("STORE 1 +FLAGS (\\Seen)")[1]


def test_fetch_items_and_macros(srv):
    srv.deliver(ALICE, msg(1))
    c = imap_tls(srv)
    c.select("INBOX")
    typ, data = c.fetch("1", "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODY BODYSTRUCTURE)")
    head = data[0] if isinstance(data[0], bytes) else data[0][0]
    assert head.startswith(b"1 (UID 1 FLAGS (\\Recent) RFC822.SIZE %d INTERNALDATE \"" % len(msg(1)))
    assert b'ENVELOPE ("Mon, 1 Jan 2024 10:00:00 +0000" "hello 1" (("Al" NIL "al" "x.org"))' in head
    assert b'BODY ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 13 1)' in head
    assert b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 13 1 NIL NIL NIL NIL)' in head
    for macro, items in (("ALL", [b"ENVELOPE"]), ("FAST", [b"RFC822.SIZE"]), ("FULL", [b"BODY ("])):
        typ, data = c.fetch("1", macro)
        assert typ == "OK" and all(i in data[0] for i in items)
    typ, data = c.fetch("1", "(RFC822.HEADER)")
    assert data[0][1].endswith(b"<m1@x.org>\r\n\r\n")
    typ, data = c.fetch("1", "(BODY.PEEK[TEXT]<2.5> BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert data[0][0].endswith(b"BODY[TEXT]<2> {5}") and data[0][1] == b"dy te"
    assert data[1][1] == b"Subject: hello 1\r\n\r\n"
    assert b"\\Seen" not in c.fetch("1", "FLAGS")[1][0]  # PEEK leaves \Seen alone
    typ, data = c.fetch("1", "(BODY[])")
    assert data[0][1] == msg(1)
    assert b"\\Seen" in data[1] or b"\\Seen" in data[0][0]  # FETCH BODY[] sets \Seen, reported
    typ, data = c.fetch("1", "(RFC822)")
    assert data[0][1] == msg(1)
    assert c.fetch("1", "(BODY[]<1000.10>)")[1][0][1] == b""
    with pytest.raises(imaplib.IMAP4.error, match="Invalid message sequence"):
        c.fetch("5", "FLAGS")
    c.logout()


def test_uid_fetch_store_and_search(srv):
    for i in range(5):
        srv.deliver(ALICE, msg(i))
    c = imap_tls(srv)
    c.select("INBOX")
    typ, data = c.uid("FETCH", "2:*", "FLAGS")
    assert [re.match(rb"(\d+) \(UID (\d+)", d).groups() for d in data] == [
        (b"2", b"2"), (b"3", b"3"), (b"4", b"4"), (b"5", b"5")]
    assert c.uid("FETCH", "99:*", "FLAGS")[1] == [b"5 (UID 5 FLAGS (\\Recent))"]  # "*" = highest UID
    typ, data = c.uid("STORE", "2,4", "+FLAGS", "(\\Flagged $Important)")
    assert data == [b"2 (UID 2 FLAGS ($Important \\Flagged \\Recent))", b"4 (UID 4 FLAGS (\\Flagged $Important \\Recent))"] \
        or all(b"\\Flagged" in d and b"UID" in d for d in data)
    typ, data = c.store("1:2", "-FLAGS.SILENT", "(\\Flagged)")
    assert data == [None]
    assert c.search(None, "FLAGGED")[1] == [b"4"]
    assert c.search(None, "KEYWORD", "$Important")[1] == [b"2 4"]
    assert c.uid("SEARCH", "SUBJECT", '"hello 3"')[1] == [b"4"]
    assert c.search(None, "OR", "SUBJECT", '"hello 1"', "BODY", '"text 3"')[1] == [b"2 4"]
    assert c.search(None, "NOT", "UID", "1:3")[1] == [b"4 5"]
    assert c.search("UTF-8", "SENTON", "1-Jan-2024", "2:3")[1] == [b"2 3"]
    typ, data = c.store("1", "FLAGS", "(\\Seen \\Answered)")
    assert b"\\Answered" in data[0] and b"\\Seen" in data[0]
    assert c.search(None, "ANSWERED SEEN")[1] == [b"1"]
    with pytest.raises(imaplib.IMAP4.error, match="unknown search key"):
        c.search(None, "BOGUS")
    c.logout()


def test_expunge_close_unselect_and_uid_expunge(srv):
    for i in range(6):
        srv.deliver(ALICE, msg(i))
    r = Raw(srv)
    r.ok("SELECT INBOX")
    r.ok("STORE 2,4,5 +FLAGS.SILENT (\\Deleted)")
    lines = r.ok("UID EXPUNGE 4:6")
    assert lines == [b"* 5 EXPUNGE", b"* 4 EXPUNGE"]
    lines = r.ok("EXPUNGE")
    assert lines == [b"* 2 EXPUNGE"]
    lines = r.ok("FETCH 1:* (UID)")
    assert lines == [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)", b"* 3 FETCH (UID 6)"]
    r.ok("STORE 1 +FLAGS (\\Deleted)")
    r.ok("UNSELECT")  # no expunge
    r.ok("SELECT INBOX")
    assert r.ok("FETCH 1 (UID)") == [b"* 1 FETCH (UID 1)"]
    lines, tagged = r.cmd("CLOSE")
    assert lines == [] and b"OK" in tagged  # CLOSE expunges silently
    lines = r.ok("SELECT INBOX")
    assert b"* 2 EXISTS" in lines
    assert b"BAD" in r.cmd("FETCH 3 FLAGS")[1]


def test_copy_move_and_uidplus(srv):
    for i in range(3):
        srv.deliver(ALICE, msg(i))
    r = Raw(srv)
    r.ok("SELECT INBOX")
    st = r.ok("STATUS Archive (UIDVALIDITY UIDNEXT MESSAGES)")[0]
    uv = int(re.search(rb"UIDVALIDITY (\d+)", st).group(1))
    _, tagged = r.cmd("COPY 1:2 Archive")
    assert tagged.endswith(b"OK [COPYUID %d 1:2 1:2] COPY completed" % uv)
    lines = r.ok("UID MOVE 2:3 Archive")
    assert lines[0] == b"* OK [COPYUID %d 2:3 3:4] Moved" % uv
    assert lines[1:] == [b"* 3 EXPUNGE", b"* 2 EXPUNGE"]
    assert b"[TRYCREATE]" in r.cmd("COPY 1 Nowhere")[1]
    lines = r.ok("STATUS Archive (MESSAGES UIDNEXT)")
    assert lines == [b"* STATUS Archive (MESSAGES 4 UIDNEXT 5)"]
    r.ok("SELECT Archive")
    assert r.ok("UID FETCH 1:* (UID)") == [b"* %d FETCH (UID %d)" % (i, i) for i in range(1, 5)]


def test_append_literals_flags_and_dates(srv):
    r = Raw(srv)
    body = msg(7)
    r.send(b'a1 APPEND Drafts (\\Draft $Label) "07-Feb-2020 10:00:00 +0100" {%d}\r\n' % len(body))
    assert r.line().startswith(b"+ ")
    r.send(body + b"\r\n")
    lines, tagged = r.until(b"a1")
    m = re.match(rb"a1 OK \[APPENDUID (\d+) 1\] APPEND completed", tagged)
    assert m, tagged
    r.send(b"a2 APPEND Drafts {%d+}\r\n" % len(body) + body + b"\r\n")  # LITERAL+: no "+" wait
    assert b"[APPENDUID %s 2]" % m.group(1) in r.until(b"a2")[1]
    assert b"[TRYCREATE]" in r.cmd(b"APPEND Nowhere {3+}\r\nabc")[1]
    r.ok("SELECT Drafts")
    lines = r.ok("FETCH 1 (FLAGS INTERNALDATE)")
    assert b"\\Draft" in lines[0] and b"$Label" in lines[0]
    assert b"INTERNALDATE" in lines[0]
    when = re.search(rb'INTERNALDATE "([^"]+)"', lines[0]).group(1).decode()
    assert datetime.datetime.strptime(when.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp() == 1581066000
    assert r.ok("FETCH 2 BODY.PEEK[]")[0].endswith(body + b")")


def test_mailbox_management_and_list(srv):
    c = imap_tls(srv)
    assert c.create("Projects/2024/Q1")[0] == "OK"
    assert c.create("Entw&APw-rfe")[0] == "OK"
    typ, data = c.list('""', "*")
    names = [d.decode() for d in data]
    assert '(\\HasNoChildren \\Sent) "/" Sent' in names
    assert '(\\HasChildren) "/" Projects' in names and '(\\HasNoChildren) "/" Projects/2024/Q1' in names
    assert any(n.endswith("Entw&APw-rfe") for n in names)
    assert names[0].endswith(" INBOX")
    typ, data = c.list('""', "%")
    assert not any("Projects/2024" in d.decode() for d in data)
    typ, data = c.list("Projects/", "%")
    assert [d.decode() for d in data] == ['(\\HasChildren) "/" Projects/2024']
    assert c.list('""', '""')[1] == [b'(\\Noselect) "/" ""']
    assert c.list('""', "inbox")[1][0].endswith(b" INBOX")
    assert c.rename("Projects", "Work")[0] == "OK"
    assert any(d.endswith(b"Work/2024/Q1") for d in c.list('""', "Work/*")[1])
    assert c.delete("Work/2024/Q1")[0] == "OK"
    assert c.subscribe("Work")[0] == "OK"
    assert any(d.endswith(b" Work") for d in c.lsub('""', "*")[1])
    assert c.unsubscribe("Work")[0] == "OK"
    assert not any(d.endswith(b" Work") for d in c.lsub('""', "*")[1])
    assert c.create("Sent")[0] == "NO"
    assert c.delete("INBOX")[0] == "NO"
    for bad in ("../escape", "/etc", "a//b", "./x", "a/../b", ".hidden"):
        typ, data = c.create(f'"{bad}"')
        assert typ == "NO", bad
    assert c.select("Nonexistent")[0] == "NO"
    c.logout()


def test_rename_inbox_moves_messages(srv):
    for i in range(2):
        srv.deliver(ALICE, msg(i))
    c = imap_tls(srv)
    assert c.rename("INBOX", "Old")[0] == "OK"
    assert c.status("INBOX", "(MESSAGES)")[1] == [b"INBOX (MESSAGES 0)"]
    assert c.status("Old", "(MESSAGES)")[1] == [b"Old (MESSAGES 2)"]
    c.logout()


def test_users_cannot_see_each_other(srv):
    srv.deliver("bob@example.test", msg(1))
    c = imap_tls(srv)
    c.select("INBOX")
    assert c.search(None, "ALL")[1] == [b""]
    for name in ("../bob", "bob@example.test/INBOX", "../../example.test/bob"):
        assert c.select(f'"{name}"')[0] == "NO"
    c.logout()


# --- many sessions, IDLE ----------------------------------------------------------------------------

def test_idle_gets_exists_at_once_from_delivery(srv):
    r = Raw(srv)
    r.ok("SELECT INBOX")
    r.send(b"i IDLE\r\n")
    assert r.line() == b"+ idling"
    t0 = time.monotonic()
    threading.Thread(target=srv.deliver, args=(ALICE, msg(1))).start()
    assert r.line() == b"* 1 EXISTS"
    assert time.monotonic() - t0 < 1.0  # pushed, not polled (idle_refresh is 30 s)
    assert r.line() == b"* 1 RECENT"
    r.send(b"DONE\r\n")
    assert r.until(b"i")[1] == b"i OK IDLE terminated"
    r.ok("NOOP")


def test_two_sessions_see_each_others_changes_at_allowed_times(srv):
    for i in range(3):
        srv.deliver(ALICE, msg(i))
    a, b = Raw(srv), Raw(srv)
    a.ok("SELECT INBOX")
    b.ok("SELECT INBOX")
    a.ok("STORE 2 +FLAGS (\\Deleted \\Flagged)")
    a.ok("EXPUNGE")
    # b is in the middle of non-UID FETCH: no EXPUNGE may be sent, numbers stay valid
    lines = b.ok("FETCH 1:3 (UID)")
    assert lines[-1] == b"* 3 FETCH (UID 3)"
    assert not any(b"EXPUNGE" in x for x in lines)
    lines = b.ok("NOOP")
    assert b"* 2 EXPUNGE" in lines
    srv.deliver(ALICE, msg(9))
    a.ok("STORE 1 +FLAGS (\\Answered)")
    lines = b.ok("NOOP")
    assert b"* 3 EXISTS" in lines
    assert any(x.startswith(b"* 1 FETCH (FLAGS (") and b"\\Answered" in x for x in lines)
    lines = b.ok("UID FETCH 1:* (UID)")
    assert lines == [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)", b"* 3 FETCH (UID 4)"]


def test_idle_notices_expunge_and_flags_from_other_session(srv):
    srv.deliver(ALICE, msg(1))
    srv.deliver(ALICE, msg(2))
    a, b = Raw(srv), Raw(srv)
    a.ok("SELECT INBOX")
    b.ok("SELECT INBOX")
    b.send(b"i IDLE\r\n")
    assert b.line() == b"+ idling"
    a.ok("STORE 1 +FLAGS (\\Deleted)")
    assert b.line().startswith(b"* 1 FETCH (FLAGS (\\Deleted")
    a.ok("EXPUNGE")
    assert b.line() == b"* 1 EXPUNGE"
    b.send(b"DONE\r\n")
    b.until(b"i")


# --- bounds and garbage -------------------------------------------------------------------------------

def test_long_line_and_big_literal_get_errors_and_session_survives(tmp_path):
    s = InProcessIMAP(tmp_path, {"max_line_length": 1024})
    try:
        r = Raw(s)
        lines, tagged = r.cmd(b"NOOP " + b"x" * 5000)
        assert b"BAD" in tagged and b"too long" in tagged
        r.ok("NOOP")
        _, tagged = r.cmd(b"APPEND INBOX {%d}" % (s.cfg.smtp.max_message_size + 1))
        assert b"NO [TOOBIG]" in tagged
        _, tagged = r.cmd(b"LOGIN {5000}")
        assert b"TOOBIG" in tagged
        r.ok("NOOP")
        r.send(b"x APPEND INBOX {%d+}\r\n" % (s.cfg.smtp.max_message_size + 1))
        assert r.line().startswith(b"* BYE [TOOBIG]")
    finally:
        s.close()


def test_autologout_after_idle_timeout(srv):
    srv.services.config.imap.idle_timeout = 0.3  # the schema minimum is 30 s; shortened for the test
    r = Raw(srv)
    t0 = time.monotonic()
    assert r.line().startswith(b"* BYE Autologout")
    assert time.monotonic() - t0 < 5
    wait_for(lambda: srv.session_count() == 0, what="session to end")


def test_connection_limit(tmp_path):
    s = InProcessIMAP(tmp_path, {"max_connections": 2})
    try:
        a, b = Raw(s, login=False), Raw(s, login=False)
        c = Raw(s, login=False)
        assert c.greeting.startswith(b"* BYE")
        a.close()
        wait_for(lambda: s.session_count() == 1)
        d = Raw(s)
        d.ok("NOOP")
        del b
    finally:
        s.close()


def test_fuzz_live_session_answers_bad_and_stays_usable(srv):
    srv.deliver(ALICE, msg(1))
    r = Raw(srv)
    r.ok("SELECT INBOX")
    rng = random.Random(1234)
    words = [b"FETCH", b"UID", b"STORE", b"SEARCH", b"(", b")", b"[", b"]", b"BODY[", b"1:*", b"*", b"\\Seen",
             b'"', b"NIL", b"<0.1>", b"OR", b"NOT", b"LIST", b"INBOX", b"&-", b"\x00", b"\xff", b"%", b"{x}",
             b"COPY", b"MOVE", b"HEADER.FIELDS", b"0", b"4294967296", b"-1", b"RENAME", b"CREATE"]
    for i in range(300):
        if rng.random() < 0.3:
            junk = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(0, 60)))
            junk = junk.replace(b"\n", b"").replace(b"\r", b"").replace(b"{", b"")
        else:
            junk = b" ".join(rng.choice(words) for _ in range(rng.randrange(0, 12)))
            junk = junk.replace(b"{", b"")
        tag = b"f%d" % i
        r.send(tag + b" " + junk + b"\r\n")
        lines, tagged = r.until(tag) if True else None
        assert re.match(rb"f\d+ (OK|NO|BAD) ", tagged), (junk, tagged)
    lines = r.ok("FETCH 1 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"hello 1" in lines[-1]


# --- other clients ------------------------------------------------------------------------------------

def test_imapclient_library(srv):
    from imapclient import IMAPClient
    for i in range(3):
        srv.deliver(ALICE, msg(i))
    with IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl=True, ssl_context=_ctx(srv)) as c:
        c.login(ALICE, PW)
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 3 and info[b"UIDNEXT"] == 4
        data = c.fetch([1, 2, 3], ["ENVELOPE", "BODYSTRUCTURE", "RFC822.SIZE", "FLAGS"])
        assert data[2][b"ENVELOPE"].subject == b"hello 1"
        assert data[2][b"ENVELOPE"].from_[0].host == b"x.org"
        assert data[1][b"BODYSTRUCTURE"][0] == b"TEXT"
        c.add_flags([1, 2], [b"\\Seen"])
        assert c.search(["SEEN"]) == [1, 2]
        c.move([3], "Archive")
        assert c.search(["ALL"]) == [1, 2]
        folders = {f[2]: f[0] for f in c.list_folders()}
        assert b"\\Trash" in folders["Trash"]
        assert c.namespace().personal[0][0] == ""
        assert (b"name", b"mailstack") in c.id_({"name": "test"})
        c.idle()
        srv.deliver(ALICE, msg(5))
        responses = c.idle_check(timeout=5)
        assert (3, b"EXISTS") in responses
        c.idle_done()
        c.unselect_folder()


def test_aioimaplib(srv):
    import aioimaplib

    async def run():
        c = aioimaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=_ctx(srv))
        await c.wait_hello_from_server()
        assert (await c.login(ALICE, PW)).result == "OK"
        await c.select("INBOX")
        res = await c.append(msg(3), mailbox="INBOX", flags="(\\Seen)")
        assert res.result == "OK"
        res = await c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert res.result == "OK" and any(b"hello 3" in bytes(x) for x in res.lines if isinstance(x, (bytes, bytearray)))
        idle = await c.idle_start(timeout=5)
        srv_deliver = asyncio.get_running_loop().run_in_executor(None, srv.deliver, ALICE, msg(4))
        pushed = await c.wait_server_push(timeout=5)
        c.idle_done()
        await asyncio.wait_for(idle, 5)
        await srv_deliver
        assert any(b"EXISTS" in (p if isinstance(p, bytes) else str(p).encode()) for p in pushed)
        await c.logout()

    asyncio.run(run())


def test_uids_stable_across_reconnects(srv):
    for i in range(4):
        srv.deliver(ALICE, msg(i))
    c = imap_tls(srv)
    c.select("INBOX")
    uv1 = c.response("UIDVALIDITY")[1]
    c.store("2", "+FLAGS", "\\Deleted")
    c.expunge()
    c.logout()
    c = imap_tls(srv)
    c.select("INBOX")
    assert c.response("UIDVALIDITY")[1] == uv1
    assert c.uid("SEARCH", "ALL")[1] == [b"1 3 4"]
    srv.deliver(ALICE, msg(5))
    c.noop()
    assert c.uid("SEARCH", "ALL")[1] == [b"1 3 4 5"]
    c.logout()


def test_8bit_headers_and_nested_structure_survive_the_metadata_cache(srv):
    from test_imap_fetch import NESTED
    raw8 = "From: Jürgen <j@example.org>\r\nSubject: Grüße\r\n\r\nx\r\n".encode()
    srv.deliver(ALICE, raw8)
    srv.deliver(ALICE, NESTED)
    r = Raw(srv)
    r.ok("SELECT INBOX")
    first = r.ok("FETCH 1:2 (ENVELOPE BODYSTRUCTURE)")
    r.ok("UNSELECT")
    r2 = Raw(srv)  # a new session: served from the cache
    r2.ok("SELECT INBOX")
    second = r2.ok("FETCH 1:2 (ENVELOPE BODYSTRUCTURE)")
    assert first == second
    assert b"{7}\r\nGr\xc3\xbc\xc3\x9fe" in second[0]
    assert b'"MIXED" ("BOUNDARY" "outer-boundary")' in second[1]
    lines = r2.ok("FETCH 2 (BODY.PEEK[3.1] BODY.PEEK[1.2.MIME] BODY[2]<0.8>)")
    assert b"BODY[3.1] {35}\r\nforwarded body (default text/plain)" in lines[0]
    assert b'BODY[1.2.MIME] {44}\r\nContent-Type: text/html; charset="utf-8"\r\n\r\n' in lines[0]
    assert b"BODY[2]<0> {8}\r\nAAECAwQF" in lines[0]


def test_outside_changes_are_noticed_at_next_command_and_during_idle(tmp_path):
    s = InProcessIMAP(tmp_path, {"idle_refresh": 0.2}, store="maildir")
    try:
        inbox = s.cfg.mail_dir / "example.test" / "alice"
        r = Raw(s)
        r.ok("SELECT INBOX")
        # another program (procmail, a backup restore...) drops files into the Maildir
        (inbox / "new" / "1700000000.outside1.host").write_bytes(msg(1))
        lines = r.ok("NOOP")
        assert b"* 1 EXISTS" in lines
        r.send(b"i IDLE\r\n")
        assert r.line() == b"+ idling"
        (inbox / "cur" / "1700000001.outside2.host:2,S").write_bytes(msg(2))
        t0 = time.monotonic()
        assert r.line() == b"* 2 EXISTS"
        assert time.monotonic() - t0 < 5
        r.line()  # RECENT
        r.send(b"DONE\r\n")
        r.until(b"i")
        lines = r.ok("UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"UID 2 FLAGS (\\Seen" in lines[1] and b"hello 2" in lines[1]
    finally:
        s.close()


def test_literal_plus_in_login_and_literal_mailbox_names(srv):
    r = Raw(srv, login=False)
    r.send(b"a LOGIN {18+}\r\nalice@example.test {6+}\r\nsecret\r\n")
    assert r.until(b"a")[1].startswith(b"a OK")
    r.send(b"b SELECT {5}\r\n")
    assert r.line().startswith(b"+ ")
    r.send(b"INBOX\r\n")
    assert r.until(b"b")[1].startswith(b"b OK [READ-WRITE]")


def test_listing_a_big_mailbox_comes_from_the_metadata_cache(tmp_path):
    s = InProcessIMAP(tmp_path, store="maildir")
    try:
        cur = s.cfg.mail_dir / "example.test" / "alice" / "cur"
        n = 300
        for i in range(n):
            (cur / f"{1700000000 + i}.M{i}P1.host,S={len(msg(i))}:2,S").write_bytes(msg(i))
        r = Raw(s)
        r.ok("SELECT INBOX")
        first = r.ok("FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)")
        assert len(first) == n and b'"hello 299"' in first[-1]
        r.ok("CLOSE")
        for p in cur.iterdir():  # the bodies are gone: only the cache can answer now
            p.write_bytes(b"")
        r.ok("SELECT INBOX")
        second = r.ok("FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)")
        assert second == [x.replace(b" \\Recent", b"") for x in first]
        assert b"NO [BADCHARSET" in r.cmd("SEARCH CHARSET KOI8-R ALL")[1]
    finally:
        s.close()


def test_big_message_append_and_fetch(srv):
    body = b"".join(b"line %07d of a big message padded to a sensible width.....\r\n" % i for i in range(50000))
    big = b"Subject: big\r\n\r\n" + body
    c = imap_tls(srv)
    typ, data = c.append("INBOX", None, None, big)
    assert typ == "OK"
    c.select("INBOX")
    typ, data = c.fetch("1", "(RFC822.SIZE BODY.PEEK[] BODY.PEEK[TEXT]<100000.20>)")
    assert data[0][1] == big
    assert b"RFC822.SIZE %d" % len(big) in data[0][0]
    assert data[1][1] == body[100000:100020]
    c.logout()


def test_idle_without_done_is_bad_but_the_next_command_is_answered(srv):
    r = Raw(srv)
    r.ok("SELECT INBOX")
    r.send(b"i IDLE\r\n")
    assert r.line() == b"+ idling"
    r.send(b"n NOOP\r\n")
    lines, tagged = r.until(b"i")
    assert tagged.startswith(b"i BAD")
    assert r.until(b"n")[1].startswith(b"n OK")
    srv.services.config.imap.idle_timeout = 0.3
    r.send(b"j IDLE\r\n")
    assert r.line() == b"+ idling"
    assert r.line().startswith(b"* BYE Autologout")


def test_append_literals_share_the_in_memory_budget(srv):
    from mailstack.smtp.budget import budget_for
    budget = budget_for(srv.services)
    budget.used = budget.limit - 100_000  # other sessions hold almost all of it
    r = Raw(srv)
    _, tagged = r.cmd(b"APPEND INBOX {200000}")
    assert tagged.endswith(b"NO [LIMIT] Server busy, try again later")
    budget.used = 0
    big = b"Subject: x\r\n\r\n" + b"y" * 199_986
    r.send(b"a APPEND INBOX {200000}\r\n")
    assert r.line().startswith(b"+ ")
    assert budget.used == 200000
    r.send(big + b"\r\n")
    assert r.until(b"a")[1].startswith(b"a OK [APPENDUID")
    assert budget.used == 0


def test_listing_caches_headers_then_structure_is_completed(srv):
    """A first listing (ENVELOPE only) parses headers only; a later BODYSTRUCTURE completes the
    cache entry, and both give what a full parse gives."""
    from test_imap_fetch import NESTED
    srv.deliver(ALICE, NESTED)
    r = Raw(srv)
    r.ok("SELECT INBOX")
    env_first = r.ok("FETCH 1 (ENVELOPE)")
    both = r.ok("FETCH 1 (ENVELOPE BODYSTRUCTURE)")
    assert b'"MIXED" ("BOUNDARY" "outer-boundary")' in both[0]
    assert env_first[0].split(b"ENVELOPE ", 1)[1][:-1] in both[0]
    r2 = Raw(srv)  # from the completed cache
    r2.ok("SELECT INBOX")
    assert r2.ok("FETCH 1 (ENVELOPE BODYSTRUCTURE)") == both
