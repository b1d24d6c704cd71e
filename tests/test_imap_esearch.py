"""ESEARCH (RFC 4731), SEARCHRES (RFC 5182), PARTIAL (RFC 5267/9394) and WITHIN (RFC 5032):
command by command against a real Dovecot holding the same messages, then the rules of
the saved result "$" that Dovecot does not show (or answers differently) with raw commands.
No common client library speaks ESEARCH, so these are raw (imapclient for plain SEARCH)."""
from __future__ import annotations

import imaplib
import time

import pytest
from imapclient import IMAPClient

from imap_compare import ALICE, ALICE_PW, Pair, Raw, normalise

NOW = time.time()


def msg(i: int) -> bytes:
    return (f"From: s{i}@x.org\r\nTo: alice@example.test\r\nSubject: note {i % 4}\r\n"
            f"Date: Mon, {1 + i} Jan 2024 10:00:00 +0000\r\nMessage-ID: <e{i}@x>\r\n\r\nbody {i}\r\n").encode()


N = 12
MESSAGES = [msg(i) for i in range(N)]
# internal dates: the first half days old, the second half minutes old (WITHIN)
DATES = [NOW - 5 * 86400 + i * 60 if i < N // 2 else NOW - 600 + i for i in range(N)]
FLAGS = ["\\Seen" if i % 3 == 0 else ("\\Flagged" if i % 3 == 1 else "") for i in range(N)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("pair"))
    p.load(MESSAGES, DATES, FLAGS)
    yield p
    p.close()


# One script, run in one session on each server; every answer must be the same.
SCRIPT = [
    "SELECT INBOX",
    "SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN",
    "UID SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN",
    "SEARCH RETURN () ALL", "UID SEARCH RETURN () FLAGGED",
    "SEARCH RETURN (COUNT) SUBJECT nothing-has-this",
    "SEARCH RETURN (MIN MAX ALL) SUBJECT nothing-has-this",
    "SEARCH RETURN (MAX) SUBJECT note", "SEARCH RETURN (ALL) OR SEEN FLAGGED",
    "SEARCH SUBJECT note",  # no RETURN: the old answer
    # SEARCHRES: save, then use "$" in every command that takes a set
    "SEARCH RETURN (SAVE) SEEN",
    "FETCH $ (UID FLAGS)", "UID FETCH $ (FLAGS)", "SEARCH $", "UID SEARCH UID $", "SEARCH NOT $",
    "SEARCH RETURN (SAVE MIN) UNSEEN", "SEARCH $",
    "SEARCH RETURN (SAVE MAX) UNSEEN", "SEARCH $",
    "SEARCH RETURN (SAVE MIN MAX) UNSEEN", "SEARCH $",
    "SEARCH RETURN (SAVE COUNT) SEEN", "SEARCH $",
    "UID SEARCH RETURN (SAVE ALL) FLAGGED", "UID SEARCH RETURN (ALL) $",
    "SEARCH RETURN (SAVE) CHARSET KOI9-X ALL", "SEARCH $",  # a failed SEARCH ... SAVE empties "$"
    "SEARCH RETURN (SAVE) 2:4", "STORE $ +FLAGS (\\Answered)", "COPY $ INBOX",
    "SEARCH RETURN (SAVE) ANSWERED", "SEARCH $",
    "SEARCH RETURN (SAVE) 1", "STORE $ +FLAGS.SILENT (\\Deleted)", "UID EXPUNGE $", "SEARCH $", "FETCH $ UID",
    "SEARCH RETURN (SAVE) 1:2", "MOVE $ INBOX", "SEARCH RETURN (ALL) ALL",
    # PARTIAL (RFC 5267 CONTEXT=SEARCH form)
    "SEARCH RETURN (PARTIAL 1:3) ALL", "UID SEARCH RETURN (PARTIAL 2:100 COUNT) ALL",
    "SEARCH RETURN (PARTIAL 1:3) SUBJECT nothing-has-this",
    # WITHIN
    "SEARCH YOUNGER 3600", "SEARCH OLDER 3600", "UID SEARCH OLDER 86400 UNSEEN",
    "SEARCH RETURN (COUNT) YOUNGER 86400",
    # "$" is per mailbox: SELECT empties it
    "SEARCH RETURN (SAVE) ALL", "SELECT INBOX", "SEARCH $", "FETCH $ UID",
    "SEARCH RETURN (SAVE) ALL", "UNSELECT", "SELECT INBOX", "SEARCH $",
    # errors
    "SEARCH RETURN (BOGUS) ALL", "SEARCH RETURN (MIN ALL",
]


def test_same_answers_as_dovecot(pair):
    ours, theirs = pair.clients()
    for command in SCRIPT:
        a, b = ours.cmd(command), theirs.cmd(command)
        if command == "SELECT INBOX":  # UIDVALIDITY and texts differ; the counts must not
            a = ([x for x in a[0] if b"EXISTS" in x or b"RECENT" in x], a[1][:2])
            b = ([x for x in b[0] if b"EXISTS" in x or b"RECENT" in x], b[1][:2])
        if command.startswith(("COPY", "MOVE")):  # COPYUID carries the UIDVALIDITY
            a, b = (a[0], a[1][:2]), (b[0], b[1][:2])
        # \Recent bookkeeping after an EXPUNGE differs (Dovecot repeats RECENT): not this test's
        a, b = ([x for x in a[0] if not x.endswith(b" RECENT")], a[1]), ([x for x in b[0] if not x.endswith(b" RECENT")], b[1])
        assert normalise(a) == normalise(b), command


@pytest.fixture
def session(pair):
    ours, _ = pair.clients()
    ours.cmd("SELECT INBOX")
    return ours


def test_failed_search_with_save_empties_the_saved_result_also_on_bad(session):
    # RFC 5182 2.1 (and RFC 9051 6.4.4.3): a SEARCH ... SAVE that fails leaves "$" empty.
    # Dovecot keeps the old result when the failure is a syntax error; we follow the RFC.
    assert session.cmd("SEARCH RETURN (SAVE) ALL")[1].startswith(b"OK")
    assert session.cmd("SEARCH $")[0] != [b"* SEARCH"]
    assert session.cmd("SEARCH RETURN (SAVE) NOSUCHKEY")[1].startswith(b"BAD")
    assert session.cmd("SEARCH $")[0] == [b"* SEARCH"]
    assert session.cmd("SEARCH RETURN (SAVE) ALL")[1].startswith(b"OK")
    assert session.cmd("SEARCH RETURN (MIN) NOSUCHKEY")[1].startswith(b"BAD")  # no SAVE: kept
    assert session.cmd("SEARCH $")[0] != [b"* SEARCH"]
    assert session.cmd("SORT RETURN (SAVE) (NOSUCHKEY) UTF-8 ALL")[1].startswith(b"BAD")  # SORT too
    assert session.cmd("SEARCH $")[0] == [b"* SEARCH"]


def test_sort_return_save_and_esearch_tags(session):
    lines, tagged = session.cmd("SORT RETURN (SAVE MIN) (REVERSE DATE) UTF-8 ALL")
    assert tagged.startswith(b"OK") and len(lines) == 1 and b"MIN" in lines[0]
    newest = lines[0].rsplit(b" ", 1)[1]
    assert session.cmd("SEARCH $")[0] == [b"* SEARCH " + newest]  # the first in sort order
    assert session.cmd("SEARCH RETURN (SAVE) ALL")[0] == []  # SAVE alone answers nothing
    lines, _ = session.cmd("SEARCH RETURN (PARTIAL -1:-2) ALL")  # RFC 9394: from the end
    count = int(session.cmd("SEARCH RETURN (COUNT) ALL")[0][0].rsplit(b" ", 1)[1])
    assert lines == [b'* ESEARCH (TAG "T%d") PARTIAL (-1:-2 %d:%d)' % (session.n - 1, count - 1, count)]


def test_within_follows_the_clock(pair):
    # a message arriving now is YOUNGER than a minute and not OLDER than one
    ours, _ = pair.clients()
    ours.cmd("SELECT INBOX")
    uid = int(ours.cmd("UID SEARCH RETURN (MAX) ALL")[0][0].rsplit(b" ", 1)[1])
    pair.ours.deliver(ALICE, msg(99))
    ours.cmd("NOOP")
    young = ours.cmd("UID SEARCH YOUNGER 60")[0]
    assert young == [b"* SEARCH %d" % (uid + 1)]
    assert b" %d" % (uid + 1) not in ours.cmd("UID SEARCH OLDER 60")[0][0]
    assert ours.cmd("SEARCH YOUNGER 0")[1].startswith(b"BAD")
    assert b"WITHIN" in ours.cmd("CAPABILITY")[0][0].split()


def test_imapclient_plain_search_still_works_with_saved_result(pair):
    with IMAPClient("127.0.0.1", pair.ours.ports["imap"], ssl=False) as c:
        c.login(ALICE, ALICE_PW)
        c.select_folder("INBOX")
        assert c.search(["SEEN"]) == c.search("SEEN")
        caps = c.capabilities()
        for cap in (b"ESEARCH", b"SEARCHRES", b"WITHIN", b"ESORT"):
            assert cap in caps
    # imaplib passes "$" and RETURN through: the saved result from a stock library
    c = imaplib.IMAP4("127.0.0.1", pair.ours.ports["imap"])
    try:
        c.login(ALICE, ALICE_PW)
        c.select("INBOX")
        assert c.search(None, "RETURN", "(SAVE)", "FLAGGED") == ("OK", [None])
        typ, data = c.fetch("$", "(UID)")
        flagged = c.search(None, "FLAGGED")[1][0].split()
        assert typ == "OK" and [x.split()[0] for x in data] == flagged and flagged
    finally:
        c.logout()


def test_raw_client_sees_no_expunge_during_non_uid_search(pair):
    # SEARCH with sequence numbers must not announce EXPUNGE (RFC 3501 7.4.1), ESEARCH neither
    a = Raw(pair.ours.ports["imap"], ALICE, ALICE_PW)
    b = Raw(pair.ours.ports["imap"], ALICE, ALICE_PW)
    try:
        a.cmd("SELECT INBOX")
        b.cmd("SELECT INBOX")
        b.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
        b.cmd("EXPUNGE")
        lines, _ = a.cmd("SEARCH RETURN (COUNT) ALL")
        assert not any(b"EXPUNGE" in x for x in lines)
        lines, _ = a.cmd("UID SEARCH RETURN (COUNT) ALL")
        assert any(b"EXPUNGE" in x for x in lines)
    finally:
        a.close()
        b.close()
