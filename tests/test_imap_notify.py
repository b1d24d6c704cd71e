"""NOTIFY (RFC 5465): the grammar (pure, fuzzed), and two real sessions over sockets: one
watches, the other (or a delivery: the store's, or SMTP into the real server process)
changes things.  Compared with Dovecot 2.3 (NOTIFY with mailbox_list_index=yes)."""
from __future__ import annotations

import re
import smtplib
import socket

import pytest
from hypothesis import given, settings, strategies as st

from harness import MailServer, wait_for
from imap_fixtures import InProcessIMAP
from test_imap_compress import ALICE, ZRaw, msg

from mailstack.events import MailboxEvent
from mailstack.imap import notify
from mailstack.imap.parser import ParseError, parse_command

FULL = ("NOTIFY SET STATUS (selected (MessageNew (UID FLAGS BODY[HEADER.FIELDS (SUBJECT)]) MessageExpunge "
        "FlagChange)) (personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))")


@pytest.fixture
def srv(tmp_path):
    s = InProcessIMAP(tmp_path, imap_overrides={"allow_plaintext_auth": True})
    yield s
    s.close()


def quiet(c: ZRaw, seconds: float = 0.3) -> bytes:
    """What arrives within `seconds` (used only to assert that nothing arrives)."""
    c.sock.settimeout(seconds)
    try:
        data = c.buf + c.recv()
    except (TimeoutError, socket.timeout):
        data = c.buf
    finally:
        c.sock.settimeout(15)
    c.buf = b""
    return data


# --- grammar -------------------------------------------------------------------------------------

def parse(line: str):
    return parse_command([line.encode()])


def test_grammar():
    cmd = parse("a " + FULL)
    spec = cmd.args["spec"]
    assert spec.status and cmd.args["refused"] is None
    sel, personal = spec.groups
    assert sel.filter == "selected" and sel.events == ("MessageNew", "MessageExpunge", "FlagChange")
    assert [a.name for a in sel.fetch_atts] == ["UID", "FLAGS", "BODY[]"] and sel.fetch_atts[2].peek
    assert personal.events[-2:] == ("MailboxName", "SubscriptionChange")
    assert parse("a NOTIFY NONE").args["spec"] is None
    spec = parse('a notify set (subtree (INBOX "a b") (messagenew messageexpunge)) (mailboxes x NONE)').args["spec"]
    assert spec.groups[0].mailboxes == ("INBOX", "a b") and spec.groups[1].events == ()
    # well-formed but refused: NO with the code
    assert parse("a NOTIFY SET (personal (AnnotationChange MessageNew MessageExpunge))").args["refused"][0] == \
        "BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)"
    assert parse("a NOTIFY SET (personal (Whatever))").args["refused"][0].startswith("BADEVENT")
    many = " ".join(f"m{i}" for i in range(notify.MAX_NAMED + 1))
    assert parse(f"a NOTIFY SET (mailboxes ({many}) (MessageNew MessageExpunge))").args["refused"] == \
        ("NOTIFICATIONOVERFLOW", "Too many mailbox names")
    for bad in ["NOTIFY", "NOTIFY SET", "NOTIFY SET ()", "NOTIFY bogus", "NOTIFY NONE ",
                "NOTIFY SET (personal MessageNew)", "NOTIFY SET (nowhere (MessageNew MessageExpunge))",
                "NOTIFY SET (selected (MailboxName))",  # mailbox events not with selected
                "NOTIFY SET (personal (MessageNew))",  # MessageNew needs MessageExpunge
                "NOTIFY SET (personal (FlagChange))",
                "NOTIFY SET (selected (MessageNew MessageExpunge)) (selected-delayed (MessageNew MessageExpunge))",
                "NOTIFY SET (personal (MessageNew (UID) MessageExpunge))",  # fetch items: selected only
                "NOTIFY SET (selected (MessageNew (RFC822) MessageExpunge))",  # would set \\Seen
                "NOTIFY SET (personal (MessageNew MessageExpunge)) "]:
        with pytest.raises(ParseError) as e:
            parse("a " + bad)
        assert e.value.tag == "a", bad


def test_matching_rules():
    spec = parse("a NOTIFY SET (selected (MessageNew MessageExpunge)) (mailboxes Spam NONE) "
                 "(subtree Lists (MessageNew MessageExpunge)) (personal (MailboxName))").args["spec"]
    assert notify.matches(spec, "INBOX", "MessageNew", "INBOX")
    assert not notify.matches(spec, "INBOX", "FlagChange", "INBOX")
    assert not notify.matches(spec, "INBOX", "MessageNew", "Sent")  # not selected, not in a filter
    assert notify.matches(spec, "Lists/python", "MessageNew", "INBOX")
    assert not notify.matches(spec, "Listsx", "MessageNew", "INBOX")
    assert not notify.matches(spec, "Spam", "MailboxName", None)  # NONE stops the search
    assert notify.matches(spec, "Other", "MailboxName", None)
    subs = parse("a NOTIFY SET (subscribed (MessageNew MessageExpunge)) (inboxes (MessageNew MessageExpunge))")
    assert notify.matches(subs.args["spec"], "S", "MessageNew", None, {"S"})
    assert notify.matches(subs.args["spec"], "INBOX/x", "MessageNew", None, set())
    assert not notify.matches(subs.args["spec"], "T", "MessageNew", None, {"S"})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_grammar_fuzz(tail):
    try:
        parse_command([b"a NOTIFY " + tail])
    except ParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["(", ")", " ", "SET", "NONE", "STATUS", "selected", "personal", "subtree",
                                 "mailboxes", "INBOX", '"x y"', "MessageNew", "MessageExpunge", "FlagChange",
                                 "MailboxName", "(UID FLAGS)", "BODY[]", "selected-delayed"]), max_size=16))
def test_grammar_fuzz_tokens(tokens):
    try:
        parse_command([("a NOTIFY " + "".join(tokens)).encode()])
    except ParseError:
        pass


# --- sessions ------------------------------------------------------------------------------------

def test_status_push_for_other_mailboxes_and_selected_fetch(srv):
    a, b = ZRaw(srv), ZRaw(srv)
    lines = a.ok(FULL)
    statuses = {re.match(rb"\* STATUS (\S+) ", x).group(1) for x in lines}
    assert {b"INBOX", b"Archive", b"Sent", b"Trash", b"Junk", b"Drafts"} <= statuses
    assert a.ok("SELECT INBOX")
    # a delivery into a folder that is not selected: STATUS, with no command from the client
    srv.deliver(ALICE, msg(1), mailbox="Archive")
    assert re.fullmatch(rb"\* STATUS Archive \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1\)", a.line())
    # into the selected one: EXISTS, then the FETCH asked for, also without a command
    srv.deliver(ALICE, msg(2))
    assert a.line() == b"* 1 EXISTS"
    assert a.line() == b"* 1 RECENT"
    pushed = a.line()
    assert pushed.startswith(b"* 1 FETCH (UID 1 FLAGS (\\Recent) BODY[HEADER.FIELDS (SUBJECT)] {")
    assert pushed.endswith(b"Subject: hello number 2\r\n\r\n)")
    # the other session's changes to the selected mailbox: FETCH FLAGS, EXPUNGE; \Seen was not set
    b.ok("SELECT INBOX")
    b.ok("STORE 1 +FLAGS (\\Flagged)")
    assert a.line() == b"* 1 FETCH (FLAGS (\\Flagged \\Recent))"
    b.ok("STORE 1 +FLAGS (\\Deleted)")
    assert a.line() == b"* 1 FETCH (FLAGS (\\Deleted \\Flagged \\Recent))"
    b.ok("EXPUNGE")
    assert a.line() == b"* 1 EXPUNGE"
    # flags in another mailbox: UNSEEN (as Dovecot)
    b.ok("SELECT Archive")
    b.ok("STORE 1 +FLAGS (\\Seen)")
    assert a.line() == b"* STATUS Archive (UNSEEN 0)"
    a.ok("NOOP")
    a.close()
    b.close()


def test_mailbox_names_and_subscriptions(srv):
    a, b = ZRaw(srv), ZRaw(srv)
    a.ok("NOTIFY SET (personal (MailboxName SubscriptionChange))")
    b.ok("CREATE Projects")
    assert a.line() == b'* LIST () "/" Projects'
    b.ok("RENAME Projects Done")
    assert a.line() == b'* LIST () "/" Done ("OLDNAME" (Projects))'
    b.ok("SUBSCRIBE Done")
    assert a.line() == b'* LIST (\\Subscribed) "/" Done'
    b.ok("UNSUBSCRIBE Done")
    assert a.line() == b'* LIST () "/" Done'
    b.ok("DELETE Done")
    assert a.line() == b'* LIST (\\NonExistent) "/" Done'
    b.ok("SUBSCRIBE Nowhere")
    assert a.line() == b'* LIST (\\NonExistent \\Subscribed) "/" Nowhere'
    assert quiet(a) == b""
    a.close()
    b.close()


def test_idle_without_a_selected_mailbox_and_notify_none(srv):
    """A client that watches INBOX while it sits in IDLE with nothing selected (through
    COMPRESS, too); NOTIFY NONE ends it."""
    a = ZRaw(srv)
    a.compress()
    a.ok("NOTIFY SET (inboxes (MessageNew MessageExpunge FlagChange))")
    a.send(b"i IDLE\r\n")
    assert a.line() == b"+ idling"
    srv.deliver(ALICE, msg(1))
    assert re.fullmatch(rb"\* STATUS INBOX \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1\)", a.line())
    srv.deliver(ALICE, msg(2), mailbox="Archive")  # not watched
    a.send(b"DONE\r\n")
    assert a.until(b"i")[1] == b"i OK IDLE terminated"
    assert a.ok("NOTIFY NONE") == []
    srv.deliver(ALICE, msg(3))
    assert quiet(a) == b""
    assert a.ok("NOOP") == []
    a.close()


def test_selected_delayed_waits_for_a_command(srv):
    a = ZRaw(srv)
    a.ok("NOTIFY SET (selected-delayed (MessageNew MessageExpunge)) (personal (MessageNew MessageExpunge))")
    a.ok("SELECT INBOX")
    srv.deliver(ALICE, msg(1))
    srv.deliver(ALICE, msg(2), mailbox="Sent")
    assert a.line().startswith(b"* STATUS Sent (MESSAGES 1 ")  # the other mailbox: at once
    assert quiet(a) == b""  # the selected one: not before a command
    assert a.ok("NOOP") == [b"* 1 EXISTS", b"* 1 RECENT"]
    a.close()


def test_overflow_turns_notify_off(srv, monkeypatch):
    monkeypatch.setattr(notify, "MAX_PENDING", 5)
    a = ZRaw(srv)
    a.ok("NOTIFY SET (personal (MessageNew MessageExpunge))")

    async def burst():  # ten mailboxes change before the session gets to run
        for i in range(10):
            srv.services.events.publish(MailboxEvent(ALICE, f"box{i}", "new", (1,)))
    srv.call(burst())
    assert a.line() == b"* OK [NOTIFICATIONOVERFLOW] Too many changes at once: NOTIFY is off"
    srv.deliver(ALICE, msg(1), mailbox="Archive")
    assert quiet(a) == b""
    assert srv.services.events._account_subs == {}  # unsubscribed
    a.close()


def test_refusals(srv):
    a = ZRaw(srv, login=False)
    _, tagged = a.cmd("NOTIFY NONE")
    assert b" BAD " in tagged
    a.ok(f"LOGIN {ALICE} secret")
    _, tagged = a.cmd("NOTIFY SET (personal (AnnotationChange MessageNew MessageExpunge))")
    assert b"NO [BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)]" in tagged
    many = " ".join(f"m{i}" for i in range(notify.MAX_NAMED + 1))
    _, tagged = a.cmd(f"NOTIFY SET (mailboxes ({many}) (MessageNew MessageExpunge))")
    assert b"NO [NOTIFICATIONOVERFLOW]" in tagged
    _, tagged = a.cmd("NOTIFY SET (selected (MailboxName))")
    assert b" BAD " in tagged
    assert b"NOTIFY" in a.ok("CAPABILITY")[0].split()
    a.close()


def test_sessions_leave_no_subscription(srv):
    a = ZRaw(srv)
    a.ok("NOTIFY SET (personal (MessageNew MessageExpunge))")
    assert srv.services.events._account_subs
    a.close()
    wait_for(lambda: srv.session_count() == 0, what="session end")
    assert srv.services.events._account_subs == {}


def test_smtp_delivery_reaches_a_watching_client(tmp_path):
    """The real server process (on uvloop, as production): mail over SMTP lands in INBOX
    while the client, compressed, has another folder selected; the STATUS push arrives
    without a command."""
    srv = MailServer(tmp_path, loop="uvloop")
    srv.add_domain("example.test")
    srv.add_user("carol@example.test", "c-pass")
    srv.start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=15)
        ctx = srv.client_tls()
        ctx.check_hostname = False

        class Client(ZRaw):
            def __init__(self):  # noqa: D401 - the ZRaw reader over this server's socket
                self.sock, self.buf, self.n, self.deflate, self.inflate, self.wire_in = \
                    ctx.wrap_socket(s), b"", 0, None, None, 0
                self.greeting = self.line()
        c = Client()
        c.ok("LOGIN carol@example.test c-pass")
        c.compress()
        c.ok("SELECT Archive")
        c.ok("NOTIFY SET (selected (MessageNew MessageExpunge)) (inboxes (MessageNew MessageExpunge))")
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as smtp:
            smtp.sendmail("x@remote.example", ["carol@example.test"],
                          b"From: x@remote.example\r\nSubject: hi\r\n\r\nhello\r\n")
        assert re.fullmatch(rb"\* STATUS INBOX \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1\)", c.line())
        c.ok("LOGOUT")
        c.close()
    finally:
        assert srv.stop() == 0


# --- side by side with Dovecot -------------------------------------------------------------------

def _scenario(connect) -> list[bytes]:
    """What a watching session is told while another one works; UIDVALIDITY and Dovecot's
    HIGHESTMODSEQ (it has CONDSTORE) taken out."""
    a, b = connect(), connect()
    b.ok("CREATE Folder")
    a.ok("NOTIFY SET (personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))")
    seen = []

    def told():
        line = re.sub(rb" UIDVALIDITY \d+", b"", a.line())
        seen.append(re.sub(rb" HIGHESTMODSEQ \d+", b"", line))
    message = msg(1)
    b.ok(b"APPEND Folder {%d+}\r\n" % len(message) + message)
    told()
    b.ok("CREATE New1")
    told()
    b.ok("SUBSCRIBE Folder")
    told()
    b.ok("DELETE New1")
    told()
    b.ok("SELECT Folder")
    b.ok("STORE 1 +FLAGS (\\Seen)")
    told()
    b.ok("STORE 1 +FLAGS (\\Deleted)")
    b.ok("EXPUNGE")
    told()
    a.ok("NOTIFY NONE")
    a.close()
    b.close()
    return seen


def test_same_notifications_as_dovecot(srv, tmp_path):
    from dovecot_fixture import Dovecot  # noqa: PLC0415
    # Dovecot offers NOTIFY only with the list index; it learns of changes by inotify, and
    # when the machine's inotify instances run out, by looking every idle_check_interval
    dc = Dovecot(extra="mailbox_list_index = yes\nmailbox_idle_check_interval = 1 secs\n").start()
    try:
        dc.add_user(ALICE, "secret")

        def to_dovecot():
            c = ZRaw.__new__(ZRaw)
            c.sock = socket.create_connection(("127.0.0.1", dc.imap_port), timeout=15)
            c.buf, c.n, c.deflate, c.inflate, c.wire_in = b"", 0, None, None, 0
            c.greeting = c.line()
            c.ok(f"LOGIN {ALICE} secret")
            assert b" NOTIFY " in c.ok("CAPABILITY")[0] + b" "
            return c
        theirs = _scenario(to_dovecot)
    finally:
        dc.cleanup()
    ours = _scenario(lambda: ZRaw(srv))
    assert ours == theirs == [
        b"* STATUS Folder (MESSAGES 1 UIDNEXT 2 UNSEEN 1)",
        b'* LIST () "/" New1',
        b'* LIST (\\Subscribed) "/" Folder',
        b'* LIST (\\NonExistent) "/" New1',
        b"* STATUS Folder (UNSEEN 0)",
        b"* STATUS Folder (MESSAGES 0 UIDNEXT 2 UNSEEN 0)",
    ]
