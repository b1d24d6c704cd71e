"""IMAP points of issue 10 found from outside, each checked over a real socket against the
in-process listener on the real Maildir store: \\Recent, MOVE into the same mailbox,
keyword announcements, bad mailbox names, LSUB wildcards, EXPUNGEISSUED, top-level
message/rfc822 parts, address comments."""
from __future__ import annotations

import re

import pytest

from imap_fixtures import InProcessIMAP
from test_imap_session import ALICE, Raw, msg


@pytest.fixture
def srv(tmp_path):
    s = InProcessIMAP(tmp_path)
    yield s
    s.close()


def untagged(lines, word: bytes) -> list[bytes]:
    return [x for x in lines if re.match(rb"\* (\d+ )?" + word, x)]


# --- \Recent (RFC 3501 2.3.2) ---------------------------------------------------------------------

def test_recent_survives_examine_and_status_counts_it(srv):
    r = Raw(srv)
    for i in range(2):
        assert b"OK [APPENDUID" in r.cmd(f"APPEND INBOX {{{len(msg(i))}+}}\r\n".encode() + msg(i))[1]
    lines, _ = r.cmd("STATUS INBOX (MESSAGES RECENT)")
    assert b"* STATUS INBOX (MESSAGES 2 RECENT 2)" in lines
    lines, tagged = r.cmd("EXAMINE INBOX")
    assert b"* 2 RECENT" in lines and b"[READ-ONLY]" in tagged
    lines, _ = r.cmd("FETCH 1:2 FLAGS")
    assert all(b"\\Recent" in x for x in untagged(lines, b"FETCH"))
    r.cmd("CLOSE")
    # EXAMINE took nothing: the first read-write session still gets both as recent
    lines, _ = r.cmd("STATUS INBOX (RECENT)")
    assert b"* STATUS INBOX (RECENT 2)" in lines
    lines, _ = r.cmd("SELECT INBOX")
    assert b"* 2 RECENT" in lines
    # ... and no one after it
    r2 = Raw(srv)
    lines, _ = r2.cmd("SELECT INBOX")
    assert b"* 0 RECENT" in lines
    assert b"* STATUS INBOX (RECENT 0)" in r2.cmd("STATUS INBOX (RECENT)")[0]


def test_new_message_is_recent_in_one_session_only(srv):
    a, b = Raw(srv), Raw(srv)
    a.cmd("SELECT INBOX")
    b.cmd("SELECT INBOX")
    srv.deliver(ALICE, msg(1))
    flags = []
    for c in (a, b):
        c.cmd("NOOP")
        lines, _ = c.cmd("FETCH 1 FLAGS")
        flags.append(b"\\Recent" in untagged(lines, b"FETCH")[0])
    assert sorted(flags) == [False, True]


# --- MOVE into the same mailbox (RFC 6851) -------------------------------------------------------

def test_move_into_same_mailbox(srv):
    srv.deliver(ALICE, msg(1))
    srv.deliver(ALICE, msg(2))
    r = Raw(srv)
    other = Raw(srv)
    r.cmd("SELECT INBOX")
    other.cmd("SELECT INBOX")
    lines, tagged = r.cmd("MOVE 1 INBOX")
    assert tagged.endswith(b"OK MOVE completed"), tagged
    assert any(re.match(rb"\* OK \[COPYUID \d+ 1 3\]", x) for x in lines), lines
    assert b"* 1 EXPUNGE" in lines and b"* 2 EXISTS" in lines
    lines, _ = r.cmd("UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    got = untagged(lines, b"FETCH")
    assert [re.search(rb"UID (\d+)", x).group(1) for x in got] == [b"2", b"3"]
    assert b"hello 1" in got[1]
    lines, _ = other.cmd("NOOP")
    assert b"* 1 EXPUNGE" in lines and b"* 2 EXISTS" in lines


# --- keywords: FLAGS before any FETCH shows them ---------------------------------------------------

def test_keyword_set_elsewhere_is_announced_before_fetch_shows_it(srv):
    srv.deliver(ALICE, msg(1))
    a, b = Raw(srv), Raw(srv)
    a.cmd("SELECT INBOX")
    b.cmd("SELECT INBOX")
    b.cmd("STORE 1 +FLAGS ($Important)")
    # a's own STORE returns the message's flags, which now include the keyword b set
    lines, _ = a.cmd("STORE 1 +FLAGS (\\Seen)")
    fetch_at = next(i for i, x in enumerate(lines) if b"FETCH" in x)
    assert b"$Important" in lines[fetch_at]
    flags_at = [i for i, x in enumerate(lines) if x.startswith(b"* FLAGS (") and b"$Important" in x]
    assert flags_at and flags_at[0] < fetch_at, lines
    # and with NOOP in a third session: FLAGS first, then the FETCH
    c = Raw(srv)
    c.cmd("SELECT INBOX")
    b.cmd("STORE 1 +FLAGS ($Other)")
    lines, _ = c.cmd("NOOP")
    assert [i for i, x in enumerate(lines) if x.startswith(b"* FLAGS") and b"$Other" in x][0] < \
        [i for i, x in enumerate(lines) if b"FETCH" in x][0], lines


# --- a message whose own Content-Type is message/rfc822 (RFC 3501 6.4.5) ------------------------

INNER = (b"From: inner@y.org\r\nSubject: inner\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
         b"--b\r\nContent-Type: text/plain\r\n\r\npart one\r\n--b\r\nContent-Type: text/html\r\n\r\n"
         b"<p>two</p>\r\n--b--\r\n")
OUTER_HEADER = b"From: outer@x.org\r\nSubject: outer\r\nContent-Type: message/rfc822\r\n\r\n"


def test_top_level_message_rfc822_sections(srv):
    # what Dovecot 2.3 answers for the same message, section by section
    srv.deliver(ALICE, OUTER_HEADER + INNER)
    r = Raw(srv)
    r.cmd("SELECT INBOX")
    want = {
        "1": INNER,
        "1.HEADER": INNER[:INNER.index(b"\r\n\r\n") + 4],
        "1.TEXT": INNER[INNER.index(b"\r\n\r\n") + 4:],
        "1.MIME": OUTER_HEADER,
        "1.1": b"part one",
        "1.2.MIME": b"Content-Type: text/html\r\n\r\n",
        "1.2": b"<p>two</p>",
        "1.HEADER.FIELDS (SUBJECT)": b"Subject: inner\r\n\r\n",
        "2": b"",
    }
    for section, body in want.items():
        lines, tagged = r.cmd(f"FETCH 1 (BODY.PEEK[{section}])")
        got = untagged(lines, b"FETCH")[0]
        head, _, rest = got.partition(b"}\r\n")
        assert rest[:-1] == body, (section, got)


# --- address comments / CFWS in ENVELOPE and SEARCH ------------------------------------------------

def test_address_comments_in_envelope_and_search(srv):
    srv.deliver(ALICE, b"From: user@domain (Real Name)\r\nSubject: one\r\n\r\nx\r\n")
    srv.deliver(ALICE, b"From: <user-from (comment)@ (comment) domain.org>\r\nSubject: two\r\n\r\nx\r\n")
    r = Raw(srv)
    r.cmd("SELECT INBOX")
    lines, _ = r.cmd("FETCH 1 ENVELOPE")
    assert b'(("Real Name" NIL "user" "domain"))' in lines[0]
    assert r.cmd("SEARCH FROM user-from@domain.org")[0] == [b"* SEARCH 2"]
    assert r.cmd('SEARCH FROM "Real Name"')[0] == [b"* SEARCH 1"]
    assert r.cmd("SEARCH FROM user@domain")[0] == [b"* SEARCH 1"]


# --- bad mailbox names: NO, not BAD ---------------------------------------------------------------

def test_invalid_modified_utf7_names_get_no(srv):
    r = Raw(srv)
    for command in ('SELECT "&Jjo"', 'EXAMINE "&AGEAYQ-"', 'CREATE "x&Jjo"', 'STATUS "&ab" (MESSAGES)',
                    'DELETE "&"', 'RENAME "&" "y"', 'SUBSCRIBE "&Jjo"'):
        lines, tagged = r.cmd(command)
        assert re.match(rb"t\d+ NO ", tagged), (command, tagged)
    r.n += 1
    r.send(b't%d APPEND "&-&" {3+}\r\nabc\r\n' % r.n)
    assert re.match(rb"t\d+ NO ", r.until(b"t%d" % r.n)[1])
    # a LIST pattern that is not valid modified UTF-7 matches nothing (as Dovecot answers)
    for command in ('LIST "" "&Jjo*"', 'LSUB "" "&"', 'LIST "&" "*"'):
        lines, tagged = r.cmd(command)
        assert lines == [] and b"OK" in tagged, (command, tagged)
    # the session goes on
    assert b"OK" in r.cmd("SELECT INBOX")[1]
    assert b"NO" in r.cmd('COPY 1:* "&Jjo"')[1]


# --- LSUB wildcards (RFC 3501 6.3.9) ----------------------------------------------------------------

def test_lsub_star_does_not_list_unsubscribed_parent(srv):
    r = Raw(srv)
    r.cmd("CREATE x/y")
    r.cmd("SUBSCRIBE x/y")
    r.cmd("UNSUBSCRIBE x")
    lines, _ = r.cmd('LSUB "" "x*"')
    assert lines == [b'* LSUB () "/" x/y'], lines
    lines, _ = r.cmd('LSUB "" "x%"')
    assert lines == [b'* LSUB (\\Noselect) "/" x'], lines
    lines, _ = r.cmd('LSUB "" "*"')
    assert b'* LSUB () "/" x/y' in lines and not any(x.endswith(b'"/" x') for x in lines), lines


# --- FETCH of a message another session expunged (RFC 2180 4.1.3) ------------------------------------

def test_fetch_of_message_expunged_elsewhere_answers_what_is_known(srv):
    for i in range(3):
        srv.deliver(ALICE, msg(i))
    a, b = Raw(srv), Raw(srv)
    a.cmd("SELECT INBOX")
    a.cmd("FETCH 1:3 ENVELOPE")  # parsed and cached while it existed
    b.cmd("SELECT INBOX")
    b.cmd("STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert b"* 2 EXPUNGE" in b.cmd("EXPUNGE")[0]
    # a has not been told yet: its message 2 still exists for it
    lines, tagged = a.cmd("FETCH 1:3 (UID RFC822.SIZE ENVELOPE BODY.PEEK[TEXT])")
    assert re.match(rb"t\d+ OK \[EXPUNGEISSUED\]", tagged), tagged
    got = untagged(lines, b"FETCH")
    assert len(got) == 3
    assert got[1].startswith(b"* 2 FETCH (UID 2 RFC822.SIZE ") and got[1].endswith(b"BODY[TEXT] NIL)")
    assert b'"hello 1"' in got[1]  # the envelope is still known
    assert b"body text 0" in got[0] and b"body text 2" in got[2]
    lines, _ = a.cmd("NOOP")
    assert b"* 2 EXPUNGE" in lines
