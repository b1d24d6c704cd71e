"""The SMTP client's protocol pieces, without sockets (mailstack/smtp/clientproto.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.smtp.clientproto import (MAX_REPLY_LINE, MAX_REPLY_LINES, ProtocolError, Reply, ReplyParser,
                                        check_envelope_address, dot_stuff, mail_command, needs_smtputf8,
                                        normalize_crlf, parse_ehlo, prepare, rcpt_command, size_limit)


def test_single_and_multiline_replies_in_any_split():
    stream = b"250-mx.example.test hello\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n354 go ahead\r\n"
    for cut in range(len(stream)):
        p = ReplyParser()
        replies = p.feed(stream[:cut]) + p.feed(stream[cut:])
        assert [r.code for r in replies] == [250, 354]
        assert replies[0].lines == ("mx.example.test hello", "SIZE 1000", "PIPELINING", "SMTPUTF8")
    assert p.buffered == 0


def test_reply_text_and_status():
    r = ReplyParser().feed(b"550-5.1.1 <x@y>: no such user\r\n550 5.1.1 try another\r\n")[0]
    assert r.status == "5.1.1" and r.kind == 5
    assert str(r) == "550 5.1.1 <x@y>: no such user 5.1.1 try another"
    assert ReplyParser().feed(b"250\r\n")[0] == Reply(250, ("",))
    assert ReplyParser().feed(b"421 closing\n")[0].code == 421  # bare LF tolerated from servers
    assert ReplyParser().feed(b"550 bad \x1b[31mred\x00\r\n")[0].text == "bad ?[31mred?"


@pytest.mark.parametrize("bad", [b"hello\r\n", b"25\r\n", b"650 x\r\n", b"250x\r\n", b"abc def\r\n",
                                 b"250-a\r\n251 b\r\n"])
def test_malformed_replies(bad):
    with pytest.raises(ProtocolError):
        ReplyParser().feed(bad)


def test_reply_bounds():
    with pytest.raises(ProtocolError, match="longer than"):
        ReplyParser().feed(b"250 " + b"x" * MAX_REPLY_LINE)  # no newline yet, already too long
    with pytest.raises(ProtocolError, match="lines"):
        ReplyParser().feed(b"250-x\r\n" * (MAX_REPLY_LINES + 1))


def test_buffered_counts_a_started_reply():
    p = ReplyParser()
    assert p.feed(b"220 go ahead\r\n250-injected\r\n")[0].code == 220
    assert p.buffered  # bytes after the STARTTLS reply: client.py refuses to start TLS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_fuzz_reply_parser_only_raises_protocol_error(chunks):
    p = ReplyParser()
    try:
        for c in chunks:
            for r in p.feed(c):
                assert 200 <= r.code <= 599
                assert len(r.lines) <= MAX_REPLY_LINES
    except ProtocolError:
        pass
    assert len(p._buf) <= MAX_REPLY_LINE


def test_ehlo_features():
    r = ReplyParser().feed(b"250-mx hi\r\n250-size 5000\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")[0]
    f = parse_ehlo(r)
    assert f == {"SIZE": "5000", "AUTH": "PLAIN LOGIN", "8BITMIME": ""}
    assert size_limit(f) == 5000
    assert size_limit({"SIZE": ""}) is None and size_limit({"SIZE": "0"}) is None and size_limit({}) is None


def test_commands():
    assert mail_command("a@bücher.test", 10, True, False) == b"MAIL FROM:<a@xn--bcher-kva.test> SIZE=10 BODY=8BITMIME\r\n"
    assert mail_command("", None, False, False) == b"MAIL FROM:<>\r\n"
    assert mail_command("jörg@x.test", None, False, True) == "MAIL FROM:<jörg@x.test> SMTPUTF8\r\n".encode()
    assert rcpt_command("b@Bücher.test") == b"RCPT TO:<b@xn--bcher-kva.test>\r\n"
    assert check_envelope_address("a@b.test") is None
    for bad in ("a\r\n@b", "a>@b", "x" * 300 + "@b.test", "a\0@b"):
        assert check_envelope_address(bad)


def test_smtputf8_need():
    assert not needs_smtputf8("a@bücher.test", ["b@c.test"], False)  # domains become A-labels
    assert needs_smtputf8("jörg@c.test", [], False)
    assert needs_smtputf8("a@c.test", ["ü@d.test"], False)
    assert needs_smtputf8("a@c.test", [], True)


def unstuff(wire: bytes) -> bytes:
    """What a receiving server does with DATA text (RFC 5321 4.5.2)."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def test_dot_stuffing():
    assert dot_stuff(b".x\r\n..y\r\nz\r\n") == b"..x\r\n...y\r\nz\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n"
    data = b"plain\r\ntext\r\n"
    assert dot_stuff(data) is data  # no copy when nothing changes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b".", b"..", b"a", b".a", b"\r\n", b"\n", b"x.y", b"\r"]), max_size=40))
def test_fuzz_prepared_text_roundtrips(parts):
    data = normalize_crlf(b"".join(parts))
    wire = prepare(data).body
    assert wire.endswith(b"\r\n")
    assert b"\r\n.\r\n" not in b"\r\n" + wire  # never a premature end of data
    restored = unstuff(wire)
    assert restored == (data if data.endswith(b"\r\n") else data + b"\r\n")


def test_normalize_crlf():
    assert normalize_crlf(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"
    data = b"a\r\nb\r\n"
    assert normalize_crlf(data) is data


def test_prepare_flags():
    m = prepare(b"Subject: hi\r\n\r\nbody \xc3\xa9\r\n", prefix=b"DKIM-Signature: x\r\n")
    assert m.eightbit and not m.header_utf8
    assert m.size == len(b"DKIM-Signature: x\r\n") + len(b"Subject: hi\r\n\r\nbody \xc3\xa9\r\n")
    m = prepare("Subject: Grüße\r\n\r\nbody\r\n".encode())
    assert m.eightbit and m.header_utf8
    assert not prepare(b"Subject: x\r\n\r\ny\r\n").eightbit
