"""Header SEARCH from the mailbox's header texts kept in memory (search.HeaderTexts, handed
over by the first listing, issue 16): the same UIDs as a plain scan of the messages'
decoded headers, after new mail, after an expunge, in a second session, after the
UIDVALIDITY changed under the server, and for needles a joined column could mis-answer."""
from __future__ import annotations

import email.header
import re
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from imap_fixtures import InProcessIMAP
from mailstack.imap import fetch, search
from mailstack.store import uidlist
from test_imap_search_index import MESSAGES
from test_imap_session import ALICE, Raw
from test_index_fast import maildir, place

LIST = "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"
SUBJECTS = ["Quarterly report", "=?utf-8?q?Q=C3=9CARTERLY_=C3=9Cberblick?=", "=?utf-8?b?0J7RgtGH0ZHRgiBRdWFydGVybHk=?=",
            "Lunch", "=?utf-8?q?quart=C3=A9rly?=", "Re: QUARTERLY numbers", "=?iso-8859-1?q?Gr=FC=DFe?="]


def message(n: int, subject: str | None = None) -> bytes:
    subject = SUBJECTS[n % len(SUBJECTS)] if subject is None else subject
    who = "=?utf-8?q?J=C3=BCrgen?= <j@x.test>" if n % 3 else "Bob <bob@y.test>"
    return (f"From: {who}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nMessage-ID: <m{n}@x.test>\r\n\r\n"
            f"body {n}\r\n").encode("ascii")


def uids(r: Raw, criteria: str) -> list[int]:
    lines = r.ok(f"UID SEARCH {criteria}")
    return [int(x) for line in lines if line.startswith(b"* SEARCH") for x in line.split()[2:]]


def scan(r: Raw, field: str, needle: str) -> list[int]:
    """The UIDs whose `field` holds `needle` (RFC 3501: case-insensitive substring of the
    decoded value), from the messages' headers fetched and decoded here."""
    lines = r.ok(f"UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS ({field})])")
    out = []
    for line in lines:
        uid = int(re.search(rb"UID (\d+)", line)[1])
        value = line.split(b"}\r\n", 1)[1].split(b":", 1)[1] if b":" in line.split(b"}\r\n", 1)[1] else b""
        text = str(email.header.make_header(email.header.decode_header(value.decode().strip())))
        if needle.casefold() in text.casefold():
            out.append(uid)
    return sorted(out)


def check(r: Raw) -> None:
    for field, needle in (("SUBJECT", "quarterly"), ("SUBJECT", "ÜBERBLICK"), ("FROM", "jürgen"), ("SUBJECT", "xyz")):
        want = scan(r, field, needle)
        assert uids(r, f'CHARSET UTF-8 {field} "{needle}"') == want, (field, needle)
    # the compiled path over the same memo: OR, NOT, flags
    quarterly, jurgen = scan(r, "SUBJECT", "quarterly"), scan(r, "FROM", "jürgen")
    assert uids(r, 'CHARSET UTF-8 OR SUBJECT quarterly FROM "jürgen"') == sorted(set(quarterly) | set(jurgen))
    assert uids(r, "NOT SUBJECT quarterly") == sorted(set(uids(r, "ALL")) - set(quarterly))


def test_header_search_after_listing_new_mail_expunge_and_new_uidvalidity(tmp_path):
    srv = InProcessIMAP(tmp_path)
    try:
        box = maildir(srv)
        place(box, [message(n) for n in range(30)])
        r = Raw(srv)
        validity = [x for x in r.ok("SELECT INBOX") if b"UIDVALIDITY" in x]
        r.ok("FETCH 1:* " + LIST)  # the listing hands the header texts over
        check(r)
        before = uids(r, "SUBJECT quarterly")
        assert len(before) > 5

        # new mail: found by the next search of the same session and of another
        for n in (100, 101, 102):
            srv.deliver(ALICE, message(n, "Quarterly new" if n != 101 else "other"))
        r.ok("NOOP")
        after = uids(r, "SUBJECT quarterly")
        assert len(after) == len(before) + 2 and after[:len(before)] == before
        check(r)

        # expunged: gone from the answers (the memo may keep them, the view does not)
        gone = after[::2]
        r.ok(f"UID STORE {','.join(map(str, gone))} +FLAGS.SILENT (\\Deleted)")
        r.ok("EXPUNGE")
        assert uids(r, "SUBJECT quarterly") == [u for u in after if u not in gone]
        check(r)

        r2 = Raw(srv)  # a second session: no listing, the memo of the mailbox
        r2.ok("SELECT INBOX")
        assert uids(r2, "SUBJECT quarterly") == [u for u in after if u not in gone]
        check(r2)
        r2.ok("LOGOUT")
        r.ok("LOGOUT")

        # the uidlist lost: a new UIDVALIDITY, UIDs given again in another order (the
        # files renamed so that they sort the other way round): texts kept under the old
        # UIDs would answer for other messages
        (box / uidlist.NAME).unlink()
        names = sorted(p.name for p in (box / "cur").iterdir()) + sorted(p.name for p in (box / "new").iterdir())
        for i, name in enumerate(names):
            sub = "cur" if (box / "cur" / name).exists() else "new"
            (box / sub / name).rename(box / sub / f"{2000000000 - i}.R{i}.renamed{name[name.find(':'):] if ':' in name else ''}")
        r = Raw(srv)
        lines = r.ok("SELECT INBOX")
        assert validity and [x for x in lines if b"UIDVALIDITY" in x] not in ([], validity)
        check(r)
        r.ok("LOGOUT")
    finally:
        srv.close()


_needles = st.sampled_from(["", "hello", "HELLO", "world", "café", "strasse", "jörg", "x.org", "al <al@x.org>",
                            "m@m.org", "<a@x>", "comment", "zzz", "list", "org" + search.JOIN + "al",
                            "m.org" + search.JOIN, search.JOIN, "y.org" + search.JOIN + "al"])
_names = st.sampled_from(["Subject", "from", "To", "cc", "reply-to", "List-ID", "message-id", "X-Other"])


@settings(max_examples=200, deadline=None)
@given(_names, _needles)
def test_column_answers_what_the_compiled_test_answers(name, needle):
    """A lone HEADER key from a joined column: the same as testing each text, and keys
    whose needle holds the joining character (or is empty) are left to the compiled test."""
    memo = search.HeaderTexts()
    entries = {uid: fetch.header_entry(data) for uid, data in enumerate(MESSAGES, 1)}
    memo.note(entries)
    key = ("HEADER", name, needle)
    lone = search.lone_header(key)
    quick = search.compile_indexed(key)
    if name == "X-Other":
        assert lone is None and quick is None
        return
    if not needle or search.JOIN in needle:
        assert lone is None
        return
    column = memo.column(lone[0])
    assert set(column) == set(entries)
    for uid, e in entries.items():
        assert (lone[1] in column[uid]) == quick(SimpleNamespace(uid=uid, flags=set()), e["hs"]), (key, uid)


def test_forget_keeps_the_columns_in_step():
    memo = search.HeaderTexts()
    memo.note({uid: fetch.header_entry(data) for uid, data in enumerate(MESSAGES, 1)})
    memo.column("from")
    memo.forget({2, 4})
    assert set(memo.hs) == {2, 4} and all(set(c) == {2, 4} for c in memo.columns.values())
    memo.note({7: fetch.header_entry(MESSAGES[0])})
    assert set(memo.column("from")) == set(memo.column("subject")) == {2, 4, 7}
    assert "al@x.org" in memo.column("from")[7]
