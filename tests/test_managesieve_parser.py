"""ManageSieve command parser: strings, literals, bounds; fuzzed."""
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.managesieve.parser import Command, CommandError, CommandReader, quote


def feed_all(data: bytes, **kw):
    r = CommandReader(**kw)
    r.feed(data)
    out = []
    while True:
        item = r.next()
        if item is None:
            return out
        out.append(item)


def test_quoted_literal_and_pipelined():
    got = feed_all(b'PUTSCRIPT "my \\"s\\"" {6+}\r\nkeep;\n\r\nRENAMESCRIPT {1}\r\na "b"\r\nnoop\r\n')
    assert got == [Command("PUTSCRIPT", ['my "s"', "keep;\n"], "PUTSCRIPT"),
                   Command("RENAMESCRIPT", ["a", "b"], "RENAMESCRIPT"), Command("NOOP", [], "noop")]


def test_partial_input_waits():
    r = CommandReader()
    r.feed(b'PUTSCRIPT "a" {10+}\r\nkeep')
    assert r.next() is None
    r.feed(b";stop;\r\n")
    assert r.next() == Command("PUTSCRIPT", ["a", "keep;stop;"], "PUTSCRIPT")


def test_bounds():
    got = feed_all(b'PUTSCRIPT "a" {100+}\r\n' + b"x" * 100 + b"\r\nNOOP\r\n", max_literal=10)
    assert isinstance(got[0], CommandError) and got[1].name == "NOOP"
    got = feed_all(b"X" * 100 + b"\r\nNOOP\r\n", max_line=50)
    assert isinstance(got[0], CommandError) and got[1].name == "NOOP"
    assert isinstance(feed_all(b'NOOP "unterminated\r\n')[0], CommandError)


def test_quote():
    assert quote('a"b') == b'"a\\"b"'
    assert quote("two\r\nlines") == b"{10}\r\ntwo\r\nlines"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"PUTSCRIPT", b" ", b'"', b"\\", b"{", b"}", b"+", b"5", b"\r\n", b"\n", b"a",
                                 b"\x00", b"\xff", b"{3+}\r\n", b"NOOP"]), max_size=40).map(b"".join))
def test_fuzz(data):
    try:
        for item in feed_all(data, max_line=64, max_literal=16):
            assert isinstance(item, (Command, CommandError))
    except CommandError:
        pass  # an unterminated over-long line: the session closes
