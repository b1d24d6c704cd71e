"""The pure parts of mailstack/migrate and the POP3 UIDL formatter: parsers fuzzed with hypothesis."""
from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.migrate import dovecot, export, folders, imap
from mailstack.migrate.progress import Progress
from mailstack.pop3.parser import format_uidl


def test_parse_dovecot_uidlist_v3_and_v1():
    ul = dovecot.parse_uidlist(b"3 V1796082324 N7 G702a\n1 :a.host,S=1\n3 W12 P0123abc :b.host\n"
                               b"5 G00 :c\nbroken\n")
    assert (ul.uidvalidity, ul.nextuid) == (1796082324, 7)
    assert ul.uids == {"a.host,S=1": 1, "b.host": 3, "c": 5}
    assert ul.pop3 == {3: "0123abc"}
    v1 = dovecot.parse_uidlist(b"1 1234 10\n3 base1\n12 base2\n")
    assert (v1.uidvalidity, v1.nextuid, v1.uids) == (1234, 13, {"base1": 3, "base2": 12})
    assert dovecot.parse_uidlist(b"") is None
    assert dovecot.parse_uidlist(b"3 N5\n") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_uidlist_parser_never_crashes(data):
    ul = dovecot.parse_uidlist(data)
    if ul is not None:
        assert ul.uidvalidity > 0 and all(u < ul.nextuid for u in ul.uids.values())


def test_keywords_and_subscriptions():
    assert dovecot.parse_keywords(b"0 $Label1\n1 Work\nx bad\n30 far\n") == {0: "$Label1", 1: "Work"}
    assert dovecot.parse_subscriptions(b"V\t2\n\nSent\nArchive\t2023\tQ1\nEntw&APw-rfe\n") == \
        [["Sent"], ["Archive", "2023", "Q1"], ["Entw&APw-rfe"]]
    assert dovecot.parse_subscriptions(b"INBOX\nArchive.2023\n") == [["INBOX"], ["Archive", "2023"]]
    assert dovecot.folder_levels(".Entw&APw-rfe.Gr&APYA3w-e &JgM-") == ["Entwürfe", "Größe ☃"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_crlf_conversion_is_chunking_independent(data, chunk):
    whole, _ = dovecot.to_crlf(data, False)
    out, carry = [], False
    for i in range(0, len(data), chunk):
        piece, carry = dovecot.to_crlf(data[i:i + chunk], carry)
        out.append(piece)
    assert b"".join(out) == whole
    assert b"\n" not in whole.replace(b"\r\n", b"")  # no bare LF left


def test_parse_fetch_with_literals_and_items_in_any_order():
    lines = [b'1 FETCH (UID 7 FLAGS (\\Seen $Work) INTERNALDATE "04-Mar-2023 05:06:07 +0000" RFC822.SIZE 12 '
             b'BODY[HEADER.FIELDS (MESSAGE-ID)] {24}', bytearray(b"Message-ID: <a@b>\r\n\r\n\r\n\r\n"), b')',
             b'2 FETCH (BODY[] {5}', bytearray(b"hello"), b' UID 9 FLAGS ())', b'Fetch completed.']
    metas = imap.parse_fetch(lines)
    assert [(m.uid, m.flags, m.size, m.message_id) for m in metas] == \
        [(7, {"\\Seen", "$Work"}, 12, "<a@b>"), (9, set(), 0, None)]
    assert metas[0].internaldate == 1677906367.0
    assert metas[1].body == b"hello"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=60), st.binary(max_size=30).map(bytearray)), max_size=8))
def test_fetch_and_list_parsers_never_crash(lines):
    imap.parse_fetch(lines)
    imap.parse_list(lines)


def test_parse_list_quoted_literal_and_nil_delimiter():
    got = imap.parse_list([b'(\\HasNoChildren \\Sent) "/" "Sent Items"', b'(\\Noselect) "." INBOX',
                           b'() NIL {5}', bytearray(b"Odd\"x"), b'List completed.'])
    assert got == [("Sent Items", "/", {"\\HasNoChildren", "\\Sent"}), ("INBOX", ".", {"\\Noselect"}),
                   ('Odd"x', None, set())]


def test_uid_set():
    assert imap.uid_set([5, 1, 2, 3, 9, 10, 7]) == "1:3,5,7,9:10"


def test_folder_names_and_special_use():
    ln = folders.local_name
    assert ln(["[Gmail]", "Sent Mail"], {"\\Sent", "\\HasNoChildren"}) == "Sent"
    assert ln(["[Gmail]", "Sent Mail"]) == "Sent"
    assert ln(["INBOX", "Sent"]) == "Sent"
    assert ln(["Sent Items"]) == "Sent"
    assert ln(["Deleted Messages"]) == "Trash"
    assert ln(["inbox"]) == "INBOX"
    assert ln(["Archive", "2023", "Q1"]) == "Archive/2023/Q1"
    assert ln(["a/b", "c"]) == "a-b/c"
    assert folders.is_virtual({"\\All"}) and not folders.is_virtual({"\\Sent"})
    assert folders.matches("Archive/2023", ["Archive"]) and not folders.matches("Archived", ["Archive"])
    assert folders.matches("INBOX", ["inbox"]) and folders.matches("a/b/c", ["a/%/c"])


def test_pop3_uidl_formats_as_dovecot():
    assert format_uidl("%08Xu%08Xv", 1, 0x6B0E0BBC) == "000000016b0e0bbc"
    assert format_uidl("%u.%v", 12, 34) == "12.34"
    assert format_uidl("u%%%u", 3, 4) == "u%3"
    for bad in ("%m", "%08Xg", "%"):
        try:
            format_uidl(bad, 1, 1)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_mbox_entry_quotes_and_carries_flags():
    msg = b"Subject: x\r\nStatus: RO\r\n\r\nFrom here\r\n>From there\r\nend"
    out = export.mbox_entry(msg, {"\\Seen", "\\Answered", "\\Flagged", "Work"}, 0)
    assert out.startswith(b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n")
    assert b"Status: RO\nX-Status: AF\nX-Keywords: Work\n\n>From here\n>>From there\nend\n\n" in out
    assert out.count(b"Status: RO") == 1 and b"\r" not in out


def test_progress_bar_on_a_terminal_and_lines_otherwise():
    tty, plain = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (plain, False)):
        p = Progress("imported", stream, tty=is_tty)
        p.plan(2)
        p.add_work(4, 4000)
        p.begin_folder("INBOX")
        p.copied(1000)
        p.skipped(1, 1000)
        p.end_folder()
        p.summary()
    assert "\r\x1b[K[##########----------] folders 1/2  messages 2/4  2.0 KiB" in tty.getvalue()
    assert "\r" not in plain.getvalue() and plain.getvalue().startswith("folder INBOX\n")
    assert plain.getvalue().endswith("imported: 1 messages (1000 B) in 1 folders, 1 already there, 0 failed, "
                                     "0 warnings, in 0s\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sets(st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Draft", "kw"])))
def test_mbox_entry_has_one_from_line_and_round_trips_the_body(message, flags):
    out = export.mbox_entry(message, flags, 1_700_000_000)
    lines = out.split(b"\n")
    assert lines[0].startswith(b"From MAILER-DAEMON ")
    assert not any(line.startswith(b"From ") for line in lines[1:])  # every other one is quoted
    assert out.endswith(b"\n\n") and b"\r\n" not in out


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_message_id_parser_never_crashes(header):
    imap.message_id_of(header)
