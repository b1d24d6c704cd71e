"""The DATA reader and the command line splitter, without sockets (data.py, lines.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.smtp.data import DataReader
from mailstack.smtp.lines import LineBuffer


def read_all(data: bytes, cuts=(), bare="reject", max_size=10**6, max_line=1000):
    """Feed `data` split at `cuts`; return (reader, leftover)."""
    reader = DataReader(max_size, max_line, bare)
    pieces, pos = [], 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            pieces.append(data[pos:cut])
            pos = cut
    pieces.append(data[pos:])
    rest = b""
    for piece in pieces:
        rest += reader.feed(piece)
    return reader, rest


def text(reader) -> bytes:
    return b"".join(reader.chunks)


def test_plain_message_and_leftover():
    r, rest = read_all(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert r.done and r.error is None
    assert text(r) == b"Subject: x\r\n\r\nhello\r\n"
    assert rest == b"QUIT\r\n"


def test_empty_message():
    r, rest = read_all(b".\r\nNOOP\r\n")
    assert r.done and text(r) == b"" and rest == b"NOOP\r\n"


def test_dot_unstuffing_including_first_line():
    r, _ = read_all(b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n")
    assert text(r) == b".first\r\nmid\r\n.\r\n..x\r\n"


def test_single_chunk_kept_without_copy():
    data = b"a\r\nb\r\n"
    r = DataReader(1000, 1000)
    r.feed(data)
    assert r.chunks[0] is data


# Every way of writing a "dot line" that is not <CR><LF>.<CR><LF> (SMTP smuggling).
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r", b"\r\n.\r\r\n"]


@pytest.mark.parametrize("bare", ["reject", "normalize"])
@pytest.mark.parametrize("form", SMUGGLING, ids=repr)
def test_smuggling_forms_never_end_data(form, bare):
    data = b"Subject: a\r\n\r\nbody" + form + b"MAIL FROM:<evil@x>\r\n.\r\n"
    r, rest = read_all(data, bare=bare)
    assert r.done and rest == b""  # only the real CRLF.CRLF ended it
    if bare == "reject":
        assert r.error == "bare" and r.chunks == []
    else:
        assert r.error is None
        out = text(r)
        assert b"MAIL FROM:<evil@x>\r\n" in out
        # normalised consistently: no bare CR or LF left
        assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")


def test_normalize_turns_bare_line_ends_into_crlf():
    r, _ = read_all(b"a\nb\rc\r\n.d\n\r\n.\r\n", bare="normalize")
    assert text(r) == b"a\r\nb\r\nc\r\nd\r\n\r\n"


@pytest.mark.parametrize("bare", ["reject", "normalize"])
def test_crlf_split_across_chunks_is_not_bare(bare):
    data = b"line one\r\nline two\r\n.\r\n"
    for cut in range(1, len(data)):
        r, rest = read_all(data, cuts=[cut], bare=bare)
        assert r.done and r.error is None, cut
        assert text(r) == b"line one\r\nline two\r\n"


def test_size_limit_reads_to_end_and_keeps_nothing():
    body = b"x" * 100 + b"\r\n"
    r, rest = read_all(body * 50 + b".\r\nQUIT\r\n", cuts=range(0, 5000, 333), max_size=1024)
    assert r.done and r.error == "size" and r.chunks == [] and rest == b"QUIT\r\n"
    assert r.received == len(body) * 50


def test_line_length_limit():
    ok = b"y" * 998 + b"\r\n"  # 1000 bytes with CRLF: the limit
    r, _ = read_all(ok + b".\r\n", max_line=1000)
    assert r.error is None
    r, _ = read_all(b"." + ok + b".\r\n", max_line=1000)  # plus a transparency dot: still fine
    assert r.error is None and text(r) == ok
    long = b"y" * 1000 + b"\r\n"
    for cuts in ([], [500], [1001], range(0, 1010, 7)):
        r, rest = read_all(b"a\r\n" + long + b"b\r\n.\r\nNOOP\r\n", cuts=cuts, max_line=1000)
        assert r.error == "line" and r.done and rest == b"NOOP\r\n", cuts


def test_endless_line_is_bounded():
    r = DataReader(10**9, 1000)
    for _ in range(100):
        r.feed(b"z" * 10000)
    assert r.error == "line" and r.chunks == [] and not r.done
    assert r.feed(b"\r\n.\r\n") == b"" and r.done


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                      max_size=30),
       cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=8))
def test_any_chunking_gives_the_same_message(lines, cuts):
    """Dot-stuffed text as a client sends it, cut anywhere: the message comes back exactly."""
    message = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    r, rest = read_all(wire + b".\r\nNEXT", cuts=cuts)
    assert r.done and r.error is None and rest == b"NEXT"
    assert text(r) == message


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=6),
       bare=st.sampled_from(["reject", "normalize"]))
def test_end_is_the_first_crlf_dot_crlf_whatever_the_input(data, cuts, bare):
    stream = data + b"\r\n.\r\nTAIL"
    r, rest = read_all(stream, cuts=cuts, bare=bare)
    first = (b"\r\n" + stream).find(b"\r\n.\r\n")
    assert r.done and rest == stream[first + 3:]
    if r.error is None:
        out = text(r)
        assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")


# --- command lines -----------------------------------------------------------------------
def lines_of(data: bytes, bare="reject", limit=100):
    buf = LineBuffer(bare)
    buf.feed(data)
    out = []
    while (event := buf.next_line(limit)) is not None:
        out.append(event)
    return out, bytes(buf.buf)


def test_command_lines():
    assert lines_of(b"EHLO x\r\nNOOP\r\nMAIL") == ([("line", b"EHLO x"), ("line", b"NOOP")], b"MAIL")


def test_bare_lf_and_cr_in_commands_reject():
    events, _ = lines_of(b"NOOP\nRSET\r\nNO\rOP\r\n")
    assert events == [("bare", b"NOOP"), ("line", b"RSET"), ("bare", b"NO\rOP")]


def test_bare_lf_and_cr_in_commands_normalize():
    events, rest = lines_of(b"NOOP\nRSET\r\nNO\rOP\r\nX\r", bare="normalize")
    assert events == [("line", b"NOOP"), ("line", b"RSET"), ("line", b"NO"), ("line", b"OP")]
    assert rest == b"X\r"  # a final CR waits for its LF


def test_long_command_line_is_dropped_as_it_arrives():
    buf = LineBuffer()
    for _ in range(50):
        buf.feed(b"A" * 1000)
        assert buf.next_line(2048) is None
        assert len(buf.buf) <= 3048
    buf.feed(b"AAA\r\nNOOP\r\n")
    assert buf.next_line(2048) == ("too_long", b"")
    assert buf.next_line(2048) == ("line", b"NOOP")


# --- envelope addresses ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["<a@b.c>", "<a.b+c@x-y.example>", "<A!#$%&'*+/=?^_`{|}~-@B1> SIZE=10 BODY=8BITMIME",
                                  "<u@[1.2.3.4]>", '<"q"@b>', "<@r:a@b>", "<a(c)@b>", "<ü@b>", "<a..b@c>",
                                  "<a@b.>", "<a@-b>", "<a@b>x", "<a@b@c>", "<.a@b>"])
def test_simple_path_agrees_with_the_general_parser(text):
    from aiosmtpd.smtp import SMTP

    from mailstack.smtp.address import simple_path

    class P:
        local_part_limit = 0

    fast = simple_path(text)
    if fast is not None:
        general = SMTP._getaddr(P(), text)
        assert fast == (general[0], general[1].strip())
