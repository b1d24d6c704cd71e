"""BINARY (RFC 3516 / RFC 9051 6.4.5): FETCH BINARY[section]<partial>, BINARY.PEEK,
BINARY.SIZE with the transfer encoding undone, literal8 (~{n}) where the data holds NUL,
NO [UNKNOWN-CTE], leaf parts only, APPEND of a literal8; the literal8 framing; the decoding
module fuzzed with hypothesis (random bytes -> encoded message -> BINARY gives them back);
and the same commands side by side with a real Dovecot."""
from __future__ import annotations

import base64
import binascii
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imap_fixtures import InProcessIMAP
from mailstack.imap import binary, fetch
from mailstack.imap.framer import CommandFramer, Continuation, Frame, literal_at
from mailstack.imap.parser import ParseError, parse_command
from test_imap_session import Raw

B64 = base64.encodebytes(bytes(range(256))).replace(b"\n", b"\r\n")
MIXED = (b"From: a@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=XX\r\n\r\npreamble\r\n"
         b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
         b"h=C3=A9llo=\r\n wo  \r\n"
         b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + B64 +
         b"--XX\r\nContent-Type: application/x-stuff\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n"
         b"--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         b"aGVsbG8=\r\n--XX--\r\nepilogue\r\n")
NO_UNKNOWN = MIXED.replace(b"x-uuencode", b"8bit")


def single(cte: bytes, body: bytes, ctype: bytes = b"application/octet-stream") -> bytes:
    return (b"Subject: one\r\nMIME-Version: 1.0\r\nContent-Type: " + ctype + b"\r\n"
            b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + body)


def qp(data: bytes) -> bytes:
    """Quoted-printable of arbitrary bytes: CR and LF encoded too (a line break in QP text
    stands for CRLF, RFC 2045 6.7), soft line breaks as "=CRLF"."""
    return binascii.b2a_qp(data, istext=False).replace(b"=\n", b"=\r\n")


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


# --- the pure module ---------------------------------------------------------------------------

def test_decode_each_transfer_encoding():
    assert binary.decode("base64", b"aGVs\r\nbG8=\r\n") == b"hello"
    assert binary.decode("base64", b"aGVsbG8") == b"hello"  # missing padding: decoded anyway
    assert binary.decode("base64", b"aGVs!bG8=\r\n") == b"hello"  # stray byte skipped
    # soft line break, encoded octets, and whitespace added in transport dropped (RFC 2045 6.7)
    assert binary.decode("quoted-printable", b"h=C3=A9llo=\r\n wo  \r\nx=20 \r\n") == "héllo wo\r\nx \r\n".encode()
    for identity in ("7bit", "8bit", "binary"):
        assert binary.decode(identity, b"a\0b\r\n") == b"a\0b\r\n"
    with pytest.raises(binary.UnknownCTE):
        binary.decode("x-uuencode", b"begin")


def test_sections_of_a_multipart_message():
    root = fetch.parse(MIXED)
    assert binary.section(MIXED, root, (1,)) == "héllo wo".encode()
    assert binary.section(MIXED, root, (2,)) == bytes(range(256))
    assert binary.section(MIXED, root, (4, 1)) == b"hello"  # the enclosed message's body
    assert binary.section(MIXED, root, (9,)) == b""  # no such part: empty, as BODY[9]
    with pytest.raises(binary.UnknownCTE):
        binary.section(MIXED, root, (3,))
    with pytest.raises(binary.NotLeaf):  # message/rfc822: not a leaf (RFC 9051 6.4.5)
        binary.section(MIXED, root, (4,))
    with pytest.raises(binary.UnknownCTE):  # BINARY[] decodes every leaf
        binary.whole_message(MIXED, root)


def test_whole_message_decodes_every_leaf_and_says_binary():
    root = fetch.parse(NO_UNKNOWN)
    whole = binary.whole_message(NO_UNKNOWN, root)
    assert whole.startswith(NO_UNKNOWN[:NO_UNKNOWN.index(b"--XX")])  # header and preamble as stored
    assert bytes(range(256)) in whole and "héllo wo".encode() in whole
    assert whole.count(b"Content-Transfer-Encoding: binary") == 3  # QP, base64 and the inner base64
    assert whole.endswith(b"--XX--\r\nepilogue\r\n")
    assert binary.fetch_size(NO_UNKNOWN, root, ()) == len(whole)
    again = fetch.parse(whole)  # still a MIME message with the same parts
    assert binary.section(whole, again, (2,)) == bytes(range(256))
    plain = b"Subject: x\r\n\r\nno encoding\r\n"
    assert binary.whole_message(plain, fetch.parse(plain)) == plain


def test_make_storable_encodes_parts_with_nul_and_loses_nothing():
    raw = bytes(range(256)) * 3
    m = single(b"binary", raw)
    stored = binary.make_storable(m)
    assert b"\0" not in stored and b"Content-Transfer-Encoding: base64" in stored
    root = fetch.parse(stored)
    assert binary.section(stored, root, (1,)) == raw
    # a part without a Content-Transfer-Encoding header gets one
    multi = (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: application/x\r\n\r\n"
             b"a\0b\r\n--B\r\n\r\ntext\r\n--B--\r\n")
    stored = binary.make_storable(multi)
    root = fetch.parse(stored)
    assert [c.type for c in root.children] == ["application", "text"]
    assert binary.section(stored, root, (1,)) == b"a\0b" and binary.section(stored, root, (2,)) == b"text"
    assert binary.make_storable(b"Subject: x\r\n\r\nplain") == b"Subject: x\r\n\r\nplain"
    with pytest.raises(binary.NotStorable):
        binary.make_storable(b"Subject: a\0b\r\n\r\nbody")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from(["base64", "quoted-printable", "binary"]),
       st.booleans())
def test_fuzz_encoded_bytes_come_back_decoded(data, cte, multipart):
    body = {"base64": b64, "quoted-printable": qp, "binary": lambda d: d}[cte](data)
    part = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body
    if multipart:
        boundary = b"=_b0und4ry_" + binascii.hexlify(bytes(data[:4]))
        msg = (b"Subject: f\r\nContent-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n--" + boundary +
               b"\r\n\r\nfirst\r\n--" + boundary + b"\r\n" + part + b"\r\n--" + boundary + b"--\r\n")
        numbers = (2,)
        if b"--" + boundary in data:  # the random data happens to hold the boundary: not MIME
            return
    else:
        msg = b"Subject: f\r\n" + part
        numbers = (1,)
    root = fetch.parse(msg)
    assert binary.section(msg, root, numbers) == data
    assert binary.fetch_size(msg, root, numbers) == len(data)
    stored = binary.make_storable(msg)
    assert b"\0" not in stored
    assert binary.section(stored, fetch.parse(stored), numbers) == data


# --- grammar and framing ----------------------------------------------------------------------

def test_binary_fetch_attributes_parse():
    atts = parse_command([b"a FETCH 1 (BINARY[1.2]<0.100> BINARY.PEEK[] BINARY.SIZE[3])"]).args["atts"]
    assert [(a.name, a.section.part, a.peek, a.partial) for a in atts] == [
        ("BINARY[]", (1, 2), False, (0, 100)), ("BINARY[]", (), True, None), ("BINARY.SIZE", (3,), False, None)]
    for bad in (b"BINARY[1.MIME]", b"BINARY[TEXT]", b"BINARY.SIZE[1]<0.5>", b"BINARY[0]", b"BINARY[1.]",
                b"BINARY", b"BINARY[1"):
        with pytest.raises(ParseError):
            parse_command([b"a FETCH 1 " + bad])


def test_framer_reads_literal8_sync_and_non_sync():
    f = CommandFramer(1000, 100, 10_000)
    f.feed(b"a APPEND INBOX ~{5}\r\n")
    assert isinstance(f.events.pop(0), Continuation)
    f.feed(b"a\0b\0c ~{3+}\r\n\0\0\0\r\n")
    ev = f.events.pop(0)
    assert isinstance(ev, Frame) and ev.parts == [b"a APPEND INBOX ~{5}", b"a\0b\0c", b" ~{3+}", b"\0\0\0", b""]
    assert literal_at(b" ~{3+}", 1) == (3, True) and literal_at(b" {3}", 1) == (3, False)
    assert literal_at(b" ~{3}", 1, allow_literal8=False) is None and literal_at(b" x{3}", 1) is None
    cmd = parse_command(ev.parts)
    assert [m.parts for m in cmd.args["messages"]] == [[("text", b"a\0b\0c")], [("text", b"\0\0\0")]]
    assert cmd.args["messages"][0].binary
    with pytest.raises(ParseError):  # literal8 only where the grammar has it
        parse_command([b"a LOGIN ~{1}", b"x", b" y"])


# --- over the wire ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = InProcessIMAP(tmp_path_factory.mktemp("binary"))
    yield s
    s.close()


def _box(r: Raw, name: str, *messages: bytes) -> None:
    r.ok(f"CREATE {name}")
    for m in messages:
        r.ok(b"APPEND %s {%d+}\r\n%s" % (name.encode(), len(m), m))
    r.ok(f"SELECT {name}")


def _literal(lines: list[bytes], label: bytes) -> tuple[bytes, bytes]:
    """(marker "{n}" or "~{n}", data) of the FETCH item `label` in the joined response."""
    text = b"\r\n".join(lines)
    m = re.search(re.escape(label) + rb" (~?\{(\d+)\})\r\n", text)
    assert m, (label, text[:300])
    return m.group(1), text[m.end():m.end() + int(m.group(2))]


def test_fetch_binary_sections_sizes_and_literal8(srv):
    r = Raw(srv)
    _box(r, "Bin1", NO_UNKNOWN)
    lines = r.ok("FETCH 1 (BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[1] BINARY.SIZE[2] BINARY.PEEK[2]<250.100>)")
    marker, data = _literal(lines, b"BINARY[1]")
    assert (marker, data) == (b"{9}", "héllo wo".encode())  # no NUL: an ordinary literal
    marker, data = _literal(lines, b"BINARY[2]")
    assert (marker, data) == (b"~{256}", bytes(range(256)))  # NUL inside: literal8
    assert b"BINARY.SIZE[1] 9" in lines[0] and b"BINARY.SIZE[2] 256" in b"\r\n".join(lines)
    assert _literal(lines, b"BINARY[2]<250>") == (b"{6}", bytes(range(250, 256)))  # no NUL in this piece
    # PEEK left \Seen alone; BINARY[...] sets it, as BODY[...] does
    assert b"\\Seen" not in b"".join(r.ok("FETCH 1 FLAGS"))
    lines = r.ok("FETCH 1 BINARY[1]")
    assert b"\\Seen" in b"".join(lines)
    # BINARY.SIZE alone sends no data
    lines = r.ok("UID FETCH 1 BINARY.SIZE[2]")
    assert lines == [b"* 1 FETCH (UID 1 BINARY.SIZE[2] 256)"]
    # the whole message, every leaf decoded
    lines = r.ok("FETCH 1 (BINARY.SIZE[] BINARY.PEEK[])")
    marker, whole = _literal(lines, b"BINARY[]")
    assert marker == b"~{%d}" % len(whole) and b"BINARY.SIZE[] %d" % len(whole) in lines[0]
    assert whole == binary.whole_message(NO_UNKNOWN, fetch.parse(NO_UNKNOWN))
    r.close()


def test_unknown_encoding_and_non_leaf_parts_are_refused(srv):
    r = Raw(srv)
    _box(r, "Bin2", MIXED)
    _, tagged = r.cmd("FETCH 1 BINARY.PEEK[3]")
    assert tagged.split(b" ", 1)[1].startswith(b"NO [UNKNOWN-CTE]")
    _, tagged = r.cmd("FETCH 1 BINARY.SIZE[3]")
    assert b"NO [UNKNOWN-CTE]" in tagged
    for leafless in ("BINARY.PEEK[4]", "BINARY.SIZE[4]"):  # message/rfc822 is not a leaf
        _, tagged = r.cmd(f"FETCH 1 {leafless}")
        assert b"NO [CANNOT]" in tagged
    lines = r.ok("FETCH 1 (BINARY.PEEK[4.1] BINARY.PEEK[9])")
    assert _literal(lines, b"BINARY[4.1]") == (b"{5}", b"hello")
    assert _literal(lines, b"BINARY[9]") == (b"{0}", b"")
    _, tagged = r.cmd("FETCH 1 BINARY[1.MIME]")
    assert b" BAD " in tagged
    r.ok("NOOP")
    r.close()


def test_append_literal8_stores_base64_and_binary_gives_it_back(srv):
    r = Raw(srv)
    raw = bytes(range(256)) + b"\r\n\0\0end"
    m = single(b"binary", raw)
    r.ok("CREATE Bin3")
    r.send(b"s APPEND Bin3 (\\Seen) ~{%d}\r\n" % len(m))
    assert r.line().startswith(b"+ ")
    r.send(m + b"\r\n")
    _, tagged = r.until(b"s")
    assert tagged.startswith(b"s OK [APPENDUID ")
    r.ok(b"APPEND Bin3 ~{%d+}\r\n%s" % (len(m), m))  # non-synchronising literal8
    r.ok("SELECT Bin3")
    lines = r.ok("FETCH 1:2 (BODY.PEEK[] BODYSTRUCTURE BINARY.PEEK[1] BINARY.SIZE[1])")
    text = b"\r\n".join(lines)
    assert b'"BASE64"' in text  # stored with a transfer encoding IMAP can carry
    _, body = _literal(lines, b"BODY[]")
    assert b"\0" not in body and b"Content-Transfer-Encoding: base64" in body
    assert _literal(lines, b"BINARY[1]") == (b"~{%d}" % len(raw), raw)
    assert text.count(b"BINARY.SIZE[1] %d" % len(raw)) == 2
    # NUL in the header cannot be stored without loss
    bad = b"Subject: a\0b\r\n\r\nx"
    _, tagged = r.cmd(b"APPEND Bin3 ~{%d+}\r\n%s" % (len(bad), bad))
    assert b"NO [UNKNOWN-CTE]" in tagged
    r.close()


def test_big_part_is_decoded_whole(srv):
    """A 3 MiB base64 attachment: decoded in a worker thread, size and bytes exact."""
    import os
    blob = os.urandom(3 << 20)
    m = (b"Subject: big\r\nContent-Type: multipart/mixed; boundary=Q\r\n\r\n--Q\r\n\r\nsee\r\n--Q\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(blob) + b"--Q--\r\n")
    r = Raw(srv)
    _box(r, "Bin4", m)
    t = time.monotonic()
    lines = r.ok("FETCH 1 (BINARY.SIZE[2] BINARY.PEEK[2])")
    assert b"BINARY.SIZE[2] %d" % len(blob) in lines[0]
    assert _literal(lines, b"BINARY[2]") == (b"~{%d}" % len(blob), blob)
    assert time.monotonic() - t < 30
    r.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=2000), cte=st.sampled_from([b"base64", b"quoted-printable"]))
def test_fuzz_over_the_wire_binary_gives_the_bytes_back(srv, data, cte):
    m = single(cte, b64(data) if cte == b"base64" else qp(data))
    r = Raw(srv)
    try:
        _, tagged = r.cmd(b"APPEND INBOX {%d+}\r\n%s" % (len(m), m))
        uid = int(re.search(rb"APPENDUID \d+ (\d+)", tagged).group(1))
        r.ok("EXAMINE INBOX")
        lines = r.ok(f"UID FETCH {uid} (BINARY.SIZE[1] BINARY.PEEK[1])")
        marker, got = _literal(lines, b"BINARY[1]")
        assert got == data and marker.startswith(b"~" if b"\0" in data else b"{")
        assert b"BINARY.SIZE[1] %d" % len(data) in lines[0]
    finally:
        r.close()


# --- side by side with Dovecot ----------------------------------------------------------------

def _dovecot_raw(dc):
    """A Raw-like client for Dovecot's plain listener."""
    import socket

    class DRaw(Raw):
        def __init__(self):  # noqa: D401 - same protocol helpers, another server
            self.sock = socket.create_connection(("127.0.0.1", dc.imap_port), timeout=10)
            self.buf, self.n = b"", 0
            self.greeting = self.line()
            self.ok("LOGIN u@example.test pw")
    return DRaw()


def _dovecot_user(dc) -> None:
    """Give Dovecot the test user (u@example.test / pw) and wait until it can log in."""
    from harness import wait_for

    dc.add_user("u@example.test", "pw")

    def login_ok():
        try:
            _dovecot_raw(dc).close()
            return True
        except (AssertionError, OSError, EOFError):
            return False
    wait_for(login_ok, 15, 0.2, "dovecot to accept the new user")


def test_same_answers_as_dovecot(srv):
    """The decoded bytes and sizes Dovecot gives for the leaf parts are ours too; both refuse
    an unknown encoding with NO [UNKNOWN-CTE] and both answer BINARY[] of a message whose
    leaves all decode.  (Dovecot also answers BINARY of a message/rfc822 part, which RFC
    9051 6.4.5 does not allow: there we differ on purpose.)"""
    from dovecot_fixture import Dovecot
    dc = Dovecot().start()
    try:
        _dovecot_user(dc)
        plain = single(b"base64", b64(b"x\0y" * 50))
        answers = []
        for client in (_dovecot_raw(dc), Raw(srv)):
            name = "Side%d" % len(answers)
            client.ok(f"CREATE {name}")
            for m in (NO_UNKNOWN, MIXED, plain):
                client.ok(b"APPEND %s {%d+}\r\n%s" % (name.encode(), len(m), m))
            client.ok(f"SELECT {name}")
            got = {}
            for part in (b"1", b"2", b"4.1"):
                lines = client.ok(b"FETCH 1 (BINARY.PEEK[%s])" % part)
                got[part] = _literal(lines, b"BINARY[%s]" % part)[1]
                lines = client.ok(b"FETCH 1 (BINARY.SIZE[%s])" % part)
                got[b"size " + part] = re.search(rb"BINARY.SIZE\[[\d.]+\] (\d+)", lines[0]).group(1)
            _, tagged = client.cmd("FETCH 2 BINARY.PEEK[3]")
            got["unknown"] = b"NO [UNKNOWN-CTE]" in tagged
            got["whole"] = _literal(client.ok("FETCH 3 BINARY.PEEK[]"), b"BINARY[]")[1]
            got["plain"] = _literal(client.ok("FETCH 3 BINARY.PEEK[1]"), b"BINARY[1]")[1]
            answers.append(got)
            client.close()
        dovecot, ours = answers
        for key in (b"1", b"2", b"4.1", b"size 1", b"size 2", b"size 4.1", "unknown", "whole", "plain"):
            assert ours[key] == dovecot[key], key
    finally:
        dc.cleanup()


def test_imapclient_fetches_decoded_parts(srv):
    """imapclient has no BINARY support of its own, but passes the items through: decoded
    text and sizes come back parsed.  (Its reader does not know literal8 "~{n}", so data
    holding NUL is for BINARY-aware clients only.)"""
    from imapclient import IMAPClient
    ctx = srv.client_tls()
    ctx.check_hostname = False
    c = IMAPClient("127.0.0.1", srv.ports["imaps"], ssl_context=ctx)
    try:
        c.login("alice@example.test", "secret")
        c.create_folder("BinClient")
        c.append("BinClient", NO_UNKNOWN)
        c.select_folder("BinClient", readonly=True)
        got = c.fetch([1], ["BINARY.PEEK[1]", "BINARY.SIZE[2]", "BINARY.PEEK[4.1]"])[1]
        assert got[b"BINARY[1]"] == "héllo wo".encode() and got[b"BINARY.SIZE[2]"] == 256
        assert got[b"BINARY[4.1]"] == b"hello"
    finally:
        c.logout()
