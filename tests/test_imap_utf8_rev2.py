"""UTF8=ACCEPT (RFC 6855) and the IMAP4rev2 (RFC 9051) behaviour a client gets once it
ENABLEs them: imaplib's UTF-8 mode, raw commands for APPEND UTF8 (~{n}literal8) and for
exact responses."""
from __future__ import annotations

import imaplib
import logging
import re

import pytest

from imap_fixtures import InProcessIMAP
from mailstack.imap.framer import CommandFramer, Continuation, Frame
from test_imap_list_extended import ALICE, PW, Client, _ctx

SNOWMAN = "Größe ☃"
MUTF7 = b"Gr&APYA3w-e &JgM-"
UTF8_MSG = ("From: Jörg Müller <jörg@bücher.example>\r\nTo: alice@example.test\r\n"
            "Subject: Grüße aus Köln ☃\r\nMessage-ID: <u1@bücher.example>\r\n\r\nHallo, schöne Grüße\r\n").encode()
MSG = b"From: a@example.org\r\nSubject: s%d\r\nMessage-ID: <m%d@example.org>\r\n\r\nbody %d\r\n"


@pytest.fixture
def srv(tmp_path):
    s = InProcessIMAP(tmp_path)
    yield s
    s.close()


def session(srv) -> Client:
    return Client(srv.ports["imaps"], _ctx(srv), ALICE, PW)


# ---------------------------------------------------------------------------- UTF8=ACCEPT

def test_utf8_mailbox_names_both_ways_with_imaplib(srv, caplog):
    caplog.set_level(logging.INFO, logger="mailstack.imap")
    c = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=_ctx(srv))
    c.login(ALICE, PW)
    assert b"UTF8=ACCEPT" in c.capability()[1][0].split()
    typ, data = c.enable("UTF8=ACCEPT")  # imaplib switches to UTF-8 commands
    assert typ == "OK" and c.utf8_enabled
    assert c.create(f'"{SNOWMAN}/Ünter"')[0] == "OK"
    typ, data = c.list()
    assert typ == "OK"
    assert f'(\\HasChildren) "/" "{SNOWMAN}"'.encode() in data  # UTF-8 quoted, not modified UTF-7
    assert f'(\\HasNoChildren) "/" "{SNOWMAN}/Ünter"'.encode() in data
    typ, data = c.list('""', '"Gr*"')
    assert len(data) == 2
    typ, data = c.status(f'"{SNOWMAN}"', "(MESSAGES SIZE)")
    assert data == [f'"{SNOWMAN}" (MESSAGES 0 SIZE 0)'.encode()]
    assert c.select(f'"{SNOWMAN}/Ünter"')[0] == "OK"
    c.logout()
    assert any(r.getMessage() == "IMAP enable UTF8=ACCEPT" for r in caplog.records)
    # a client that did not enable it sees the same mailbox in modified UTF-7
    legacy = session(srv)
    assert b'* LIST (\\HasChildren) "/" "' + MUTF7 + b'"' in legacy.ok('LIST "" "Gr*"')
    legacy.ok(b'SELECT "' + MUTF7 + b'/&ANw-nter"')
    legacy.close()


def test_utf8_names_are_taken_as_utf8_not_modified_utf7(srv):
    c = session(srv)
    c.ok("ENABLE UTF8=ACCEPT")
    c.ok('CREATE "A&B-c"')  # "&" is just a character now
    legacy = session(srv)
    assert b'* LIST (\\HasNoChildren) "/" A&-B-c' in legacy.ok('LIST "" A*')
    lines, status, tagged = c.cmd(b'CREATE "bad \xff name"')
    assert status == "BAD", tagged  # RFC 6855 section 3: not UTF-8 is BAD
    lines, status, tagged = c.cmd('CREATE "line\u2028sep"'.encode())
    assert status == "NO" and b"[CANNOT]" in tagged  # RFC 6855 3: no U+2028 in names
    c.close()
    legacy.close()


def test_append_utf8_literal8_and_utf8_headers_stored_as_is(srv):
    c = session(srv)
    c.ok("ENABLE UTF8=ACCEPT")
    # synchronising literal8: the server says "+" before the message
    c.n += 1
    c.sock.sendall(b"a1 APPEND INBOX (\\Seen) UTF8 (~{%d}\r\n" % len(UTF8_MSG))
    assert c.line().startswith(b"+ ")
    c.sock.sendall(UTF8_MSG + b")\r\n")
    tagged = c.line()
    assert tagged.startswith(b"a1 OK [APPENDUID "), tagged
    # non-synchronising, and a literal8 holding a NUL byte (it is binary-safe)
    binary = UTF8_MSG.replace(b"Hallo", b"Ha\x00llo")
    c.ok(b"APPEND INBOX UTF8 (~{%d+}\r\n" % len(binary) + binary + b")")
    c.ok("SELECT INBOX")
    lines = c.ok("FETCH 1 (BODY.PEEK[HEADER] ENVELOPE RFC822.SIZE)")
    assert UTF8_MSG.split(b"\r\n\r\n")[0] in lines[0]  # the UTF-8 header bytes, as sent
    assert b"RFC822.SIZE %d" % len(UTF8_MSG) in lines[0]
    # on disk byte for byte
    cur = srv.cfg.mail_dir / "example.test" / "alice"
    stored = sorted(p.read_bytes() for sub in ("cur", "new") for p in (cur / sub).iterdir())
    assert UTF8_MSG in stored
    # SEARCH without CHARSET matches UTF-8; with CHARSET it is BAD once UTF8=ACCEPT is on
    assert c.ok('SEARCH SUBJECT "Grüße"'.encode()) == [b"* SEARCH 1 2"]
    lines, status, tagged = c.cmd("SEARCH CHARSET UTF-8 ALL")
    assert status == "BAD" and b"UTF8=ACCEPT" in tagged
    # APPEND UTF8 grammar errors
    for bad in (b"APPEND INBOX UTF8 ({3+}\r\nabc)", b"APPEND INBOX UTF8 (~{3+}\r\nabc"):
        assert c.cmd(bad)[1] == "BAD", bad
    c.close()


def test_framer_frames_a_literal8():
    f = CommandFramer(8192, 1 << 20, 1 << 20)
    f.feed(b"a APPEND INBOX UTF8 (~{4}\r\n")
    assert isinstance(f.events.pop(0), Continuation)
    f.feed(b"\x00\xff\r\n)\r\n")
    frame = f.events.pop(0)
    assert isinstance(frame, Frame) and frame.parts == [b"a APPEND INBOX UTF8 (~{4}", b"\x00\xff\r\n", b")"]


def test_enable_utf8_only_before_select(srv):
    c = session(srv)
    c.ok("SELECT INBOX")
    assert c.ok("ENABLE UTF8=ACCEPT IMAP4rev2") == [b"* ENABLED"]  # RFC 6855 3: authenticated state only
    c.ok("CLOSE")
    assert c.ok("ENABLE UTF8=ACCEPT") == [b"* ENABLED UTF8=ACCEPT"]
    assert c.ok("ENABLE UTF8=ACCEPT") == [b"* ENABLED"]  # RFC 5161: only what is newly enabled
    c.close()


# ---------------------------------------------------------------------------- IMAP4rev2

def test_rev2_select_has_no_recent_or_unseen_and_lists_the_mailbox(srv):
    for i in range(3):
        srv.deliver(ALICE, MSG % (i, i, i))
    c = session(srv)
    assert c.ok("ENABLE IMAP4rev2") == [b"* ENABLED IMAP4rev2"]
    caps = c.ok("CAPABILITY")[0]
    assert b"IMAP4rev1" in caps and b"IMAP4rev2" in caps
    # what RFC 9051 takes in from extensions is offered too (LITERAL+ covers LITERAL-)
    for ext in (b"NAMESPACE", b"UNSELECT", b"UIDPLUS", b"ESEARCH", b"SEARCHRES", b"ENABLE", b"IDLE", b"SASL-IR",
                b"LITERAL+", b"BINARY", b"SPECIAL-USE", b"LIST-EXTENDED", b"LIST-STATUS", b"MOVE", b"STATUS=SIZE"):
        assert ext in caps.split(), ext
    lines = c.ok("SELECT INBOX")
    assert b"* 3 EXISTS" in lines and b'* LIST () "/" INBOX' in lines
    assert not [x for x in lines if b"RECENT" in x or b"[UNSEEN" in x], lines
    assert not [x for x in c.ok("FETCH 1:3 (FLAGS)") if b"\\Recent" in x]
    srv.deliver(ALICE, MSG % (4, 4, 4))
    assert c.ok("NOOP") == [b"* 4 EXISTS"]
    # the same with a rev1 session: RECENT is there
    old = session(srv)
    srv.deliver(ALICE, MSG % (5, 5, 5))
    lines = old.ok("SELECT INBOX")
    assert b"* 1 RECENT" in lines and not [x for x in lines if x.startswith(b"* LIST")]
    assert b"\\Recent" in old.ok("FETCH 5 (FLAGS)")[0]
    old.close()
    c.close()


def test_rev2_search_answers_esearch(srv):
    for i in range(4):
        srv.deliver(ALICE, MSG % (i, i, i), flags=["\\Seen"] if i in (0, 2) else [])
    c = session(srv)
    c.ok("ENABLE IMAP4rev2")
    c.ok("SELECT INBOX")
    tag = c.n + 1
    assert c.ok("SEARCH SEEN") == [b'* ESEARCH (TAG "c%d") ALL 1,3' % tag]
    assert c.ok("UID SEARCH ALL") == [b'* ESEARCH (TAG "c%d") UID ALL 1:4' % (tag + 1)]
    assert c.ok("SEARCH SUBJECT nothing-like-this") == [b'* ESEARCH (TAG "c%d")' % (tag + 2)]
    c.close()


def test_closed_response_on_select_of_another_mailbox(srv):
    c = session(srv)
    c.ok("SELECT INBOX")
    assert not [x for x in c.ok("SELECT Sent") if b"[CLOSED]" in x]  # a plain rev1 client: none
    c.ok("UNSELECT")
    c.ok("ENABLE IMAP4rev2")
    assert not [x for x in c.ok("SELECT INBOX") if b"[CLOSED]" in x]  # nothing was selected
    lines = c.ok("EXAMINE Sent")
    assert lines[0] == b"* OK [CLOSED] Previous mailbox closed."
    lines, status, _ = c.cmd("SELECT Nonexistent")
    assert status == "NO" and lines == [b"* OK [CLOSED] Previous mailbox closed."]  # closed all the same
    c.close()


def test_rev2_list_namespace_status_and_utf8_names(srv):
    c = session(srv)
    c.ok("CREATE a/b")
    c.ok("DELETE a")
    c.ok("ENABLE IMAP4rev2")
    lines = c.ok('LIST "" "%"')
    assert b'* LIST (\\NonExistent \\HasChildren) "/" a' in lines
    # NAMESPACE and LIST "" "" agree on the personal prefix and the delimiter
    assert c.ok("NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL']
    assert c.ok('LIST "" ""') == [b'* LIST (\\Noselect) "/" ""']
    srv.deliver(ALICE, MSG % (1, 1, 1), flags=["\\Deleted"])
    assert c.ok("STATUS INBOX (MESSAGES SIZE DELETED)") == [
        b"* STATUS INBOX (MESSAGES 1 SIZE %d DELETED 1)" % len(MSG % (1, 1, 1))]
    # IMAP4rev2 mailbox names are UTF-8 (without UTF8=ACCEPT)
    c.ok(f'CREATE "{SNOWMAN}"'.encode())
    assert f'* LIST (\\HasNoChildren) "/" "{SNOWMAN}"'.encode() in c.ok('LIST "" "Gr*"')
    c.close()


# ------------------------------------------------------------ SMTPUTF8 in, UTF8=ACCEPT out

def test_smtputf8_message_reads_back_unchanged_over_utf8_accept(tmp_path):
    """The whole EAI path in the real server process: a message submitted with SMTPUTF8
    (UTF-8 address and headers) is delivered and read by an IMAP client that enabled
    UTF8=ACCEPT, headers byte for byte, searchable without CHARSET."""
    import smtplib

    from harness import MailServer
    srv = MailServer(tmp_path)
    srv.add_domain("example.test")
    srv.add_user("carol@example.test", "c-pass")
    srv.start()
    try:
        msg = UTF8_MSG.replace(b"alice@example.test", b"carol@example.test")
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.ehlo("client.example")
            assert s.has_extn("smtputf8")
            s.sendmail("jörg@bücher.example", ["carol@example.test"], msg, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        c = Client(srv.ports["imaps"], srv.client_tls(), "carol@example.test", "c-pass")
        c.ok("ENABLE UTF8=ACCEPT")
        c.ok("SELECT INBOX")
        from harness import wait_for
        wait_for(lambda: c.ok('SEARCH SUBJECT "Grüße aus Köln"'.encode()) == [b"* SEARCH 1"], 20, 0.1, "delivery")
        header = c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])")[0]
        assert "From: Jörg Müller <jörg@bücher.example>\r\nSubject: Grüße aus Köln ☃".encode() in header
        c.close()
    finally:
        assert srv.stop() == 0


def test_mutt_opens_a_utf8_folder_after_enable_utf8_accept(srv, tmp_path, caplog):
    """mutt 2.2 ENABLEs UTF8=ACCEPT when offered and then names folders in UTF-8."""
    import os
    import shutil
    import subprocess
    assert shutil.which("mutt") and shutil.which("script"), "mutt is in tests/run.sh DEBS, script in bsdutils"
    caplog.set_level(logging.INFO, logger="mailstack.imap")
    c = session(srv)
    c.ok("ENABLE UTF8=ACCEPT")
    c.ok(f'CREATE "{SNOWMAN}"'.encode())
    c.close()
    for i in range(2):
        srv.deliver(ALICE, MSG % (i, i, i), SNOWMAN)
    (tmp_path / "certs").write_text(srv.cert.read_text())
    rc = tmp_path / "muttrc"
    rc.write_text(f"""
set folder="imaps://{ALICE.replace('@', '%40')}@127.0.0.1:{srv.ports['imaps']}/"
set spoolfile="+{SNOWMAN}"
set imap_pass="{PW}"
set certificate_file="{tmp_path}/certs"
set ssl_verify_host=no
set charset="utf-8"
set sleep_time=0
""", encoding="utf-8")
    env = dict(os.environ, TERM="xterm", HOME=str(tmp_path), LC_ALL="C.UTF-8")
    r = subprocess.run(["script", "-qec", f"mutt -n -F {rc} -e 'push <quit>'", "/dev/null"],
                       capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:]
    assert b"Msgs:2" in r.stdout, r.stdout[-2000:]  # mutt's status bar: it opened the folder
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages.count("IMAP enable UTF8=ACCEPT") == 2, messages  # ours above, then mutt's
