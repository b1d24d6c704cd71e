"""The IMAP parser on its own: framing, grammar, bounds, modified UTF-7, serialising; fuzzed."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from mailstack.imap import mutf7, response
from mailstack.imap.parser import (CommandFramer, Continuation, Frame, FrameError, ParseError, Section,
                                   parse_command)


def frames(data: bytes, max_line=1000, max_literal=1000, max_message=100_000):
    f = CommandFramer(max_line, max_literal, max_message)
    f.feed(data)
    return f.events


def parse(line: bytes, *literals: bytes):
    parts = [line]
    for lit in literals:
        parts += [lit, b""]
    return parse_command(parts)


# --- framing ------------------------------------------------------------------------------

def test_framer_splits_pipelined_commands_and_literals():
    evs = frames(b"a1 LOGIN {5}\r\nalice {3+}\r\npw!\r\na2 NOOP\r\na3 CAPABILITY\n")
    assert isinstance(evs[0], Continuation)  # only the synchronising literal asks for "+"
    assert [type(e) for e in evs[1:]] == [Frame, Frame, Frame]
    assert parse_command(evs[1].parts).args == {"user": b"alice", "password": b"pw!"}
    assert parse_command(evs[2].parts).name == "NOOP"
    assert parse_command(evs[3].parts).name == "CAPABILITY"  # bare LF tolerated


def test_framer_byte_at_a_time_gives_the_same_result():
    data = b"a APPEND INBOX (\\Seen) {12}\r\nhello\r\nworld\r\nb NOOP\r\n"
    f = CommandFramer(1000, 1000, 1000)
    for i in range(len(data)):
        f.feed(data[i:i + 1])
    kinds = [type(e) for e in f.events]
    assert kinds == [Continuation, Frame, Frame]
    cmd = parse_command(f.events[1].parts)
    assert cmd.args["message"] == b"hello\r\nworld" and cmd.args["flags"] == ["\\Seen"]


def test_line_too_long_is_refused_and_the_stream_resynchronises():
    evs = frames(b"a1 NOOP " + b"x" * 5000 + b"\r\na2 NOOP\r\n", max_line=1024)
    assert isinstance(evs[0], FrameError) and evs[0].tag == b"a1" and not evs[0].fatal
    assert parse_command(evs[1].parts).tag == "a2"


def test_line_too_long_without_newline_does_not_buffer_unboundedly():
    f = CommandFramer(1024, 1024, 1024)
    for _ in range(100):
        f.feed(b"y" * 4096)
    assert f.buffered <= 8192
    f.feed(b"\r\nz NOOP\r\n")
    assert isinstance(f.events[0], FrameError)
    assert parse_command(f.events[1].parts).tag == "z"


def test_sync_literal_too_big_is_refused_before_the_client_sends_it():
    evs = frames(b"a1 APPEND INBOX {200001}\r\na2 NOOP\r\n", max_message=200000)
    assert isinstance(evs[0], FrameError) and evs[0].code == "TOOBIG" and not evs[0].fatal
    assert parse_command(evs[1].parts).tag == "a2"


def test_literal_outside_append_is_limited_to_the_line_limit():
    evs = frames(b"a1 LOGIN {5000}\r\n", max_literal=1024, max_message=10**6)
    assert isinstance(evs[0], FrameError)
    evs = frames(b"a1 APPEND INBOX {5000}\r\n", max_literal=1024, max_message=10**6)
    assert isinstance(evs[0], Continuation)


def test_non_sync_literal_too_big_is_fatal():
    evs = frames(b"a1 APPEND INBOX {900000+}\r\n" + b"x" * 1000, max_message=1000)
    assert isinstance(evs[0], FrameError) and evs[0].fatal


# --- grammar -------------------------------------------------------------------------------

def test_fetch_attributes_sections_and_partials():
    cmd = parse(b'a UID FETCH 1:*,3 (UID FLAGS BODY.PEEK[1.2.HEADER.FIELDS (From "To")]<0.100> '
                b'BODY[] BODY[2.MIME] RFC822.HEADER BODYSTRUCTURE)')
    assert cmd.uid and cmd.name == "FETCH"
    assert cmd.args["set"].resolve(10) == [(1, 10)]  # merged
    atts = cmd.args["atts"]
    assert atts[2].peek and atts[2].partial == (0, 100)
    assert atts[2].section == Section((1, 2), "HEADER.FIELDS", ("From", "To"))
    assert atts[2].section.spec() == b"1.2.HEADER.FIELDS (From To)"
    assert atts[3].section == Section() and not atts[3].peek
    assert atts[4].section.spec() == b"2.MIME"
    assert [a.name for a in parse(b"a FETCH 1 FULL").args["atts"]] == [
        "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]
    assert [a.name for a in parse(b"a FETCH 1 ALL").args["atts"]][-1] == "ENVELOPE"
    assert [a.name for a in parse(b"a FETCH 1 FAST").args["atts"]] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]


@pytest.mark.parametrize("line", [
    b"a FETCH 0 FLAGS", b"a FETCH 1 (FLAGS", b"a FETCH 1 BODY[MIME]", b"a FETCH 1 BODY[1.]",
    b"a FETCH 1 BODY[]<5>", b"a FETCH 1 FOO", b"a STORE 1 FLAGS \\Recent", b"a STORE 1 XFLAGS (x)",
    b"a SELECT", b"a LOGIN alice", b"a NOOP extra", b"a SEARCH FOO", b"a SEARCH SINCE 31-Feb-2020",
    b"a SEARCH CHARSET KOI8-U ALL", b"a UID NOOP", b"a APPEND INBOX", b'a LIST "" "unterminated',
    b"a STATUS INBOX (BOGUS)", b"a SELECT &-&Jjo", b"a EXAMINE &AGE-", b"+ NOOP", b"a  NOOP",
])
def test_malformed_commands_raise_parse_error(line):
    with pytest.raises(ParseError):
        parse(line)


def test_sequence_sets_merge_and_bound_work():
    seq = parse(b"a FETCH " + b",".join([b"1:9999"] * 3000) + b",20000:*,5,7:6 FLAGS").args["set"]
    assert seq.resolve(30000) == [(1, 9999), (20000, 30000)]
    assert seq.contains(9999, 30000) and not seq.contains(10000, 30000) and seq.contains(25000, 30000)
    assert parse(b"a UID FETCH 5:3,*:8 UID").args["set"].resolve(2) == [(2, 8)]


def test_search_keys():
    cmd = parse(b'a SEARCH CHARSET UTF-8 OR FROM "x" NOT (SEEN 1:3) SINCE 1-Feb-2020 HEADER X-Foo bar '
                b'UID 4:* KEYWORD $Junk LARGER 10 SENTON "2-Mar-2021"')
    key = cmd.args["key"]
    assert key[0] == "AND"
    ops = [k[0] for k in key[1]]
    assert ops == ["OR", "SINCE", "HEADER", "UID", "FLAG", "LARGER", "SENTON"]
    assert key[1][0][2] == ("NOT", ("AND", [("FLAG", "\\Seen", True), ("SEQ", key[1][0][2][1][1][1][1])]))
    assert key[1][1] == ("SINCE", (2020, 2, 1))
    assert key[1][6] == ("SENTON", (2021, 3, 2))


def test_search_utf8_literal():
    cmd = parse(b"a SEARCH CHARSET UTF-8 SUBJECT {6}", "Grüß".encode())
    assert cmd.args["key"] == ("HEADER", "SUBJECT", "Grüß")


def test_append_with_flags_and_date():
    cmd = parse(b'a APPEND "Sent Items" (\\Seen $Label) " 7-Feb-2020 10:00:00 +0100" {5+}', b"hello")
    assert cmd.args["mailbox"] == "Sent Items"
    assert cmd.args["flags"] == ["\\Seen", "$Label"]
    assert cmd.args["date"] == 1581066000
    assert cmd.args["message"] == b"hello"


def test_store_forms_and_mailbox_names():
    cmd = parse(b"a STORE 2:4 -FLAGS.SILENT \\Seen \\deleted")
    assert cmd.args == {"set": cmd.args["set"], "mode": "-", "silent": True, "flags": ["\\Seen", "\\Deleted"]}
    assert parse(b"a SELECT inbox").args["mailbox"] == "INBOX"
    assert parse(b"a SELECT Entw&APw-rfe").args["mailbox"] == "Entwürfe"
    assert parse(b'a RENAME "a b" c').args == {"old": "a b", "new": "c"}
    args = parse(b'a LIST "" *').args
    assert (args["reference"], args["pattern"], args["extended"]) == ("", "*", False)
    assert parse(b"a LSUB foo/ %").args["pattern"] == "%"


def test_authenticate_and_id_and_enable():
    assert parse(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==").args["initial"] == b"AGFsaWNlAHNlY3JldA=="
    assert parse(b"a AUTHENTICATE plain").args == {"mechanism": "PLAIN", "initial": None}
    assert parse(b'a ID ("name" "mutt" "version" NIL)').args["params"] == {"name": "mutt", "version": None}
    assert parse(b"a ID NIL").args["params"] is None
    assert parse(b"a ENABLE CONDSTORE UTF8=ACCEPT").args["capabilities"] == ["CONDSTORE", "UTF8=ACCEPT"]
    assert parse(b"a UID EXPUNGE 1:5").args["set"].resolve(9) == [(1, 5)]


# --- modified UTF-7 and serialising ----------------------------------------------------------

@pytest.mark.parametrize("name,wire", [
    ("Entwürfe", "Entw&APw-rfe"), ("&", "&-"), ("日本語", "&ZeVnLIqe-"), ("a&b ü", "a&-b &APw-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
])
def test_mutf7_known_values(name, wire):
    assert mutf7.encode(name) == wire
    assert mutf7.decode(wire) == name


@given(st.text(max_size=40))
def test_mutf7_round_trip(name):
    assert mutf7.decode(mutf7.encode(name)) == name


@pytest.mark.parametrize("bad", ["&Jjo", "&AGE-", "&U,BTFw", "a\x01b", "&Jjo!-"])
def test_mutf7_rejects_malformed(bad):
    with pytest.raises(mutf7.MUTF7Error):
        mutf7.decode(bad)


def test_response_strings():
    assert response.string(b"abc") == b'"abc"'
    assert response.string(b'a"b') == b'"a\\"b"'
    assert response.string("Grüße") == b"{7}\r\nGr\xc3\xbc\xc3\x9fe"
    assert response.string(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert response.nstring(None) == b"NIL"
    assert response.astring(b"NIL") == b'"NIL"'
    assert response.astring(b"INBOX") == b"INBOX"
    assert response.mailbox("Entwürfe") == b"Entw&APw-rfe"
    assert response.mailbox("a b") == b'"a b"'
    assert response.sequence_set([5, 1, 2, 3, 9]) == b"1:3,5,9"
    assert response.internaldate(0).startswith(b'"')


# --- fuzz -------------------------------------------------------------------------------------

_words = st.sampled_from([b"FETCH", b"UID", b"STORE", b"SEARCH", b"(", b")", b"[", b"]", b"{3}", b"{2+}",
                          b"BODY[", b"1:*", b"*", b"\\Seen", b'"', b"NIL", b"<0.1>", b"HEADER.FIELDS",
                          b"OR", b"NOT", b"LIST", b"APPEND", b"INBOX", b"&-", b"\x00", b"\xff", b" "])
_lines = st.one_of(st.binary(max_size=200),
                   st.lists(_words, max_size=25).map(lambda ws: b"a " + b" ".join(ws)))


@settings(max_examples=600, deadline=None)
@given(st.lists(_lines, min_size=1, max_size=5))
def test_fuzz_framer_and_parser_raise_only_protocol_errors(lines):
    f = CommandFramer(300, 300, 1000)
    f.feed(b"\r\n".join(lines) + b"\r\n")
    for ev in f.events:
        assert isinstance(ev, (Frame, Continuation, FrameError))
        if isinstance(ev, Frame):
            try:
                cmd = parse_command(ev.parts)
            except ParseError as e:
                assert e.tag is None or isinstance(e.tag, str)
            else:
                assert cmd.name.isupper()
    assert f.buffered < 2000


_SET_PIECES = st.sampled_from([b"0", b"1", b"7", b"42", b"00012", b"4294967295", b"4294967296", b"99999999999",
                               b"*", b":", b",", b" ", b"$", b"x"])


@given(st.lists(_SET_PIECES, min_size=1, max_size=12),
       st.sampled_from([b" FLAGS", b" (UID BODY.PEEK[])", b"", b"FLAGS"]))
@settings(max_examples=600, deadline=None)
def test_sequence_set_fast_path_parses_as_the_general_loop(pieces, tail):
    """The one-regex path for sets of plain numbers (issue 16: FETCH of a picked list) gives
    the ranges, or the error, that the character loop gives for every input."""
    from mailstack.imap import parse_cursor
    line = b"a1 FETCH " + b"".join(pieces) + tail

    def parse():
        try:
            cmd = parse_command([line])
        except ParseError as e:
            return "error", e.message
        return cmd.args["set"].ranges if hasattr(cmd.args["set"], "ranges") else "$", cmd.args["atts"]

    fast = parse()
    saved = parse_cursor._PLAIN_SET
    parse_cursor._PLAIN_SET = re.compile(rb"(?!)")  # never matches: the general loop only
    try:
        assert fast == parse(), line
    finally:
        parse_cursor._PLAIN_SET = saved


def test_sequence_set_of_a_hundred_picked_numbers():
    line = b"a1 FETCH " + b",".join(b"%d" % (1 + 100 * i) for i in range(100)) + b" BODY.PEEK[]"
    assert parse_command([line]).args["set"].ranges == [(1 + 100 * i, 1 + 100 * i) for i in range(100)]
    assert parse_command([b"a1 FETCH 5:3,9 FLAGS"]).args["set"].ranges == [(5, 3), (9, 9)]
