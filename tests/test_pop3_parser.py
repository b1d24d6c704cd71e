"""The POP3 wire format without sockets: line buffering, command parsing, message encoding."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.pop3.parser import (LINE_TOO_LONG, CommandError, LineBuffer, MessageEncoder,
                                   decode_sasl_plain, encode_message, encoded_size, err,
                                   multiline, ok,
                                   parse_command, parse_number, top_extent, uidl_for_key)


# --- LineBuffer ------------------------------------------------------------------------

def drain(buf: LineBuffer) -> list:
    out = []
    while (line := buf.next_line()) is not None:
        out.append(line)
    return out


def test_lines_split_across_feeds_and_crlf_or_lf():
    buf = LineBuffer(100)
    buf.feed(b"US")
    assert buf.next_line() is None
    buf.feed(b"ER bob\r\nPASS x y\nST")
    assert drain(buf) == [b"USER bob", b"PASS x y"]
    buf.feed(b"AT\r\n")
    assert drain(buf) == [b"STAT"]


def test_overlong_line_is_reported_once_and_next_line_is_clean():
    buf = LineBuffer(16)
    buf.feed(b"NOOP\r\n" + b"X" * 10)
    assert buf.next_line() == b"NOOP"
    buf.feed(b"Y" * 1000)  # no end yet: memory must not grow with it
    assert buf.next_line() is None
    assert len(buf) == 0
    buf.feed(b"Z" * 5000)
    assert buf.next_line() is None and len(buf) == 0
    buf.feed(b"tail\r\nSTAT\r\n")
    assert drain(buf) == [LINE_TOO_LONG, b"STAT"]


def test_overlong_complete_line_in_one_feed():
    buf = LineBuffer(16)
    buf.feed(b"A" * 40 + b"\r\nQUIT\r\n")
    assert drain(buf) == [LINE_TOO_LONG, b"QUIT"]


def test_line_of_exactly_the_limit_is_accepted():
    buf = LineBuffer(16)
    buf.feed(b"A" * 14 + b"\r\n")
    assert drain(buf) == [b"A" * 14]
    buf.feed(b"A" * 15 + b"\r\n")
    assert drain(buf) == [LINE_TOO_LONG]


def test_clear_drops_pipelined_plaintext():
    buf = LineBuffer(100)
    buf.feed(b"USER evil\r\nPASS x\r\n")
    assert buf.clear() == len(b"USER evil\r\nPASS x\r\n")
    assert buf.next_line() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=20), st.integers(min_value=8, max_value=40))
def test_linebuffer_never_holds_more_than_needed(chunks, limit):
    buf = LineBuffer(limit)
    for chunk in chunks:
        buf.feed(chunk)
        while (line := buf.next_line()) is not None:
            if line is not LINE_TOO_LONG:
                assert len(line) < limit and b"\n" not in line
        # Without a complete line, only a partial line of at most `limit` bytes is held.
        assert len(buf) <= limit


# --- commands ----------------------------------------------------------------------------

def test_parse_command_keyword_and_args():
    cmd = parse_command(b"retr 12")
    assert cmd.name == "RETR" and cmd.args == ("12",)
    cmd = parse_command(b"PASS secret with spaces")
    assert cmd.rest == "secret with spaces"
    assert parse_command(b"STAT").args == ()
    assert parse_command(b"LIST 1 ").args == ("1",)  # trailing space tolerated


@pytest.mark.parametrize("line", [b"", b"\x00STAT", b"ST\x01AT", b"TOOLONGCMD", b"X1", b"\xff\xfe",
                                  b"RE TR", b"12", b"STAT\tfoo"])
def test_parse_command_rejects_malformed(line):
    with pytest.raises(CommandError):
        parse_command(line)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_parse_command_fuzz_only_command_errors(line):
    try:
        cmd = parse_command(line)
    except CommandError:
        return
    assert cmd.name.isupper() and 3 <= len(cmd.name) <= 4
    assert all(arg and " " not in arg for arg in cmd.args)


def test_parse_number():
    assert parse_number("7") == 7
    for bad in ("", "-1", "1.5", "x", "99999999999", "\u0661"):  # \u0661: Arabic-Indic digit one
        with pytest.raises(CommandError):
            parse_number(bad)


def test_sasl_plain():
    b64 = base64.b64encode(b"\0alice@example.test\0pw with space").decode()
    assert decode_sasl_plain(b64) == ("", "alice@example.test", "pw with space")
    for bad in ("not base64!", base64.b64encode(b"nonuls").decode(), "=",
                base64.b64encode(b"\0\0pw").decode(), base64.b64encode(b"\0a\0\xff").decode()):
        with pytest.raises(CommandError):
            decode_sasl_plain(bad)


def test_responses():
    assert ok() == b"+OK\r\n"
    assert err("locked", "IN-USE") == b"-ERR [IN-USE] locked\r\n"
    assert multiline("x", ["TOP", ".hidden"]) == b"+OK x\r\nTOP\r\n..hidden\r\n.\r\n"


# --- message encoding ----------------------------------------------------------------------

@pytest.mark.parametrize("stored, sent", [
    (b"", b""),
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n"),
    (b".start\n..two\nmid.dle\n.\n", b"..start\r\n...two\r\nmid.dle\r\n..\r\n"),
    (b"x\r\n.\r\n", b"x\r\n..\r\n"),
    (b"bare\rcr\n", b"bare\rcr\r\n"),
    (b"end with cr\r", b"end with cr\r\r\n"),
    (b"mixed\r\nlf\n.dot\r\n", b"mixed\r\nlf\r\n..dot\r\n"),
])
def test_encode_message(stored, sent):
    assert encode_message(stored) == sent
    assert encoded_size(stored) == len(sent)


_message_bytes = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"xy", b"\n."]),
                          max_size=60).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_message_bytes, st.lists(st.integers(min_value=0, max_value=70), max_size=8))
def test_chunked_encoding_equals_whole_and_size_matches(data, cuts):
    whole = encode_message(data)
    assert encoded_size(data) == len(whole)
    enc = MessageEncoder()
    out = b""
    prev = 0
    for cut in sorted(min(c, len(data)) for c in cuts):
        out += enc.feed(data[prev:cut])
        prev = cut
    out += enc.feed(data[prev:]) + enc.end()
    assert out == whole
    # What goes on the wire is a valid multi-line body: CRLF lines, no bare "." line, ends with CRLF.
    if whole:
        assert whole.endswith(b"\r\n")
        assert b"\r\n.\r\n" not in b"\r\n" + whole
        for line in whole.split(b"\r\n")[:-1]:
            assert not (line.startswith(b".") and not line.startswith(b".."))
            assert b"\n" not in line


_crlf_message_bytes = st.lists(st.sampled_from([b"a", b".", b"\r", b"\r\n", b"xy", b"\r\n.", b"..", b"\n"]),
                               max_size=60).map(b"".join)


def _reference_encoding(data: bytes) -> bytes:
    """The plain definition: LF line ends, stuff, CRLF, a last line end if missing."""
    text = data.replace(b"\r\n", b"\n")
    text = (b"." if text.startswith(b".") else b"") + text.replace(b"\n.", b"\n..")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


@settings(max_examples=500, deadline=None)
@given(_crlf_message_bytes, st.lists(st.integers(min_value=0, max_value=70), max_size=8))
def test_encoder_fast_path_for_crlf_chunks_equals_the_definition(data, cuts):
    """Chunks without a bare LF take the one-replace path; mixed with chunks that have one
    (and CRs split from their LF at a cut) the output is still the plain definition's."""
    enc = MessageEncoder()
    out = b""
    prev = 0
    for cut in sorted(min(c, len(data)) for c in cuts):
        out += enc.feed(data[prev:cut])
        prev = cut
    out += enc.feed(data[prev:]) + enc.end()
    assert out == _reference_encoding(data) == encode_message(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_encoding_any_bytes_roundtrips_via_unstuffing(data):
    sent = encode_message(data)
    assert encoded_size(data) == len(sent)
    # A client unstuffs and joins with LF: it gets the message back with LF line ends.
    lines = [line[1:] if line.startswith(b".") else line for line in sent.split(b"\r\n")[:-1]]
    expected = data.replace(b"\r\n", b"\n")
    if expected and not expected.endswith(b"\n"):
        expected += b"\n"
    assert b"".join(line + b"\n" for line in lines) == expected


def test_top_extent():
    msg = b"Subject: a\r\nFrom: b\r\n\r\nline1\r\nline2\r\nline3\r\n"
    head = len(b"Subject: a\r\nFrom: b\r\n\r\n")
    assert top_extent(msg, 0, True) == head
    assert top_extent(msg, 2, True) == head + len(b"line1\r\nline2\r\n")
    assert top_extent(msg, 99, True) == len(msg)
    assert top_extent(msg[:10], 0, False) is None  # header not complete: read more
    assert top_extent(msg[:head + 3], 1, False) is None
    assert top_extent(b"Subject: only header\n", 5, True) == len(b"Subject: only header\n")
    assert top_extent(b"A: b\n\nbody\n", 1, True) == len(b"A: b\n\nbody\n")
    assert top_extent(b"\r\nbody\r\n", 0, True) == 2


def test_uidl_for_key():
    assert uidl_for_key("1700000000.M1P2Q3.host,S=123") == "1700000000.M1P2Q3.host,S=123"
    long = uidl_for_key("x" * 100)
    odd = uidl_for_key("with space")
    for value in (long, odd):
        assert 1 <= len(value) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in value)
    assert uidl_for_key("x" * 100) == long  # a function of the key alone: stable
    assert uidl_for_key("with space") != uidl_for_key("with  space")


@pytest.mark.parametrize("chunks, sent", [
    ([b"a\r\nb\r\n"], b"a\r\nb\r\n"),
    ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n"),  # a chunk that starts a line with "."
    ([b"ab", b".c\r\n"], b"ab.c\r\n"),  # a "." inside a line, at a chunk's start
    ([b"ab", b"\ncd\r\n"], b"ab\r\ncd\r\n"),  # a bare LF at a chunk's start
    ([b"ab\r", b"\n.x\r\n"], b"ab\r\n..x\r\n"),  # CRLF cut in two, then a dot line
    ([b"\r\r\n\r\n.\r\n"], b"\r\r\n\r\n..\r\n"),
    ([b"x\r\ny\n"], b"x\r\ny\r\n"),  # the last LF bare
    ([b"x\r\n", b"."], b"x\r\n..\r\n"),  # a last line of one "." without its end
])
def test_encoder_wire_ready_path_and_its_edges(chunks, sent):
    enc = MessageEncoder()
    assert b"".join(enc.feed(c) for c in chunks) + enc.end() == sent == _reference_encoding(b"".join(chunks))


def test_wire_ready_message_is_sent_as_it_is_without_a_copy():
    data = b"From: a@b.example\r\nSubject: x\r\n\r\nline one.\r\n\r\n  .indented\r\nend" * 50
    enc = MessageEncoder()
    assert enc.feed(data) is data
    assert enc.end() == b"\r\n"


def test_encoder_keeps_no_state_per_line_of_a_big_piece():
    """The regex passes must not keep backtracking state per line: with an atomic group per
    line they held ~1.1 bytes per byte of a 512 KiB piece, and five clients RETRieving an
    8 MiB message at once grew the server by 137 MiB."""
    import tracemalloc
    dotted = b"".join(b"%sline %d of the piece\r\n" % (b"." if i % 5 == 1 else b"", i) for i in range(20000))
    clean = dotted.replace(b"\r\n.", b"\r\nx")
    assert len(dotted) > 400_000 and not dotted.startswith(b".")
    for data in (clean, dotted):
        tracemalloc.start()
        try:
            out = MessageEncoder().feed(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        made = 0 if out is data else len(out)  # the clean piece is sent as it is
        assert peak < made + 32 * 1024, (len(data), peak, made)
        assert out == _reference_encoding(data)[:len(out)]
