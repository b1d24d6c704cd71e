"""FETCH rendering and SEARCH evaluation from message bytes (pure, no sockets)."""
from __future__ import annotations

import base64
import email
import email.policy
import time

import pytest
from hypothesis import given, settings, strategies as st

from mailstack.imap import fetch, search
from mailstack.imap.parser import Section, parse_command

ATTACHMENT = bytes(range(256)) * 4

NESTED = (
    b"Return-Path: <sender@example.org>\r\n"
    b"From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.org>\r\n"
    b"To: Alice <alice@example.test>, \"Bob, the builder\" <bob@example.test>\r\n"
    b"Cc: undisclosed-recipients:;\r\n"
    b"Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n"
    b"Date: Tue, 05 Mar 2024 14:30:00 +0100\r\n"
    b"Message-ID: <nested@example.org>\r\n"
    b"In-Reply-To: <parent@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed;\r\n boundary=\"outer-boundary\"\r\n"
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--outer-boundary\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe, the plain part.\r\n"
    b"Second line.\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=\"utf-8\"\r\n"
    b"\r\n"
    b"<p>Gr\xc3\xbc\xc3\x9fe, the html part.</p>\r\n"
    b"--inner--\r\n"
    b"--outer-boundary\r\n"
    b"Content-Type: application/octet-stream; name=\"data.bin\"\r\n"
    b"Content-Disposition: attachment; filename=\"data.bin\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-ID: <att1@example.org>\r\n"
    b"\r\n" + base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n") +
    b"--outer-boundary\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: inner@example.net\r\n"
    b"Subject: forwarded\r\n"
    b"Content-Type: multipart/mixed; boundary=fwd\r\n"
    b"\r\n"
    b"--fwd\r\n"
    b"\r\n"
    b"forwarded body (default text/plain)\r\n"
    b"--fwd--\r\n"
    b"\r\n"
    b"--outer-boundary--\r\n"
    b"epilogue\r\n"
)

SIMPLE = (b"From: al@x.org\r\nTo: alice@example.test\r\nSubject: plain\r\n"
          b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nline one\r\nline two\r\n")


def test_envelope_of_a_real_world_message():
    root = fetch.parse(NESTED)
    env = fetch.envelope(root)
    assert env.startswith(b'("Tue, 05 Mar 2024 14:30:00 +0100" "=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=" ')
    assert b'(("=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?=" NIL "juergen" "example.org"))' in env
    assert b'(("Alice" NIL "alice" "example.test")("Bob, the builder" NIL "bob" "example.test"))' in env
    assert b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))' in env  # group syntax
    assert env.endswith(b' NIL "<parent@example.org>" "<nested@example.org>")')


def test_bodystructure_of_nested_multipart_with_attachment_and_message():
    root = fetch.parse(NESTED)
    bs = fetch.bodystructure(NESTED, root, True)
    assert bs.startswith(b'((("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" ')
    assert b'"ALTERNATIVE" ("BOUNDARY" "inner") NIL NIL NIL)' in bs
    assert b'("APPLICATION" "OCTET-STREAM" ("NAME" "data.bin") "<att1@example.org>" NIL "BASE64" ' in bs
    assert b'("ATTACHMENT" ("FILENAME" "data.bin"))' in bs
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" ' in bs
    assert b'(NIL "forwarded" ((NIL NIL "inner" "example.net"))' in bs
    assert bs.endswith(b' "MIXED" ("BOUNDARY" "outer-boundary") NIL NIL NIL)')
    body = fetch.bodystructure(NESTED, root, False)
    assert b"BOUNDARY" not in body and b"ATTACHMENT" not in body
    # balanced parentheses outside strings: a client can parse it
    depth = 0
    in_q = False
    for ch in bs.decode("latin-1"):
        if ch == '"':
            in_q = not in_q
        elif not in_q:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            assert depth >= 0
    assert depth == 0


def _leaves(msg, prefix=()):
    if msg.is_multipart():
        for i, sub in enumerate(msg.get_payload(), 1):
            yield from _leaves(sub, prefix + (i,))
    else:
        yield prefix or (1,), msg


def test_part_bodies_agree_with_the_standard_library():
    root = fetch.parse(NESTED)
    std = email.message_from_bytes(NESTED, policy=email.policy.compat32)
    checked = 0
    for number, part in _leaves(std):
        if part.get_content_type() == "message/rfc822":
            continue
        got = fetch.section_bytes(NESTED, root, Section(number))
        assert got == part.get_payload(decode=False).encode("latin-1", "surrogateescape") or \
            got.rstrip(b"\r\n") == part.as_bytes().split(b"\n\n", 1)[-1].rstrip(b"\r\n").replace(b"\n", b"\r\n") \
            or got == part.get_payload(decode=False).encode("utf-8", "surrogateescape")
        checked += 1
    assert checked >= 3
    att = fetch.section_bytes(NESTED, root, Section((2,)))
    assert base64.b64decode(att) == ATTACHMENT


def test_sections_header_text_mime_and_enclosed_message():
    root = fetch.parse(NESTED)
    assert fetch.section_bytes(NESTED, root, Section((1, 1))).startswith(b"Gr=C3=BC=C3=9Fe")
    assert fetch.section_bytes(NESTED, root, Section((1, 2))) == b"<p>Gr\xc3\xbc\xc3\x9fe, the html part.</p>"
    assert fetch.section_bytes(NESTED, root, Section((3,), "HEADER")) == \
        b"From: inner@example.net\r\nSubject: forwarded\r\nContent-Type: multipart/mixed; boundary=fwd\r\n\r\n"
    assert fetch.section_bytes(NESTED, root, Section((3, 1))) == b"forwarded body (default text/plain)"
    assert fetch.section_bytes(NESTED, root, Section((2,), "MIME")).startswith(
        b"Content-Type: application/octet-stream")
    assert fetch.section_bytes(NESTED, root, Section((), "HEADER.FIELDS", ("subject", "DATE"))) == \
        b"Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\nDate: Tue, 05 Mar 2024 14:30:00 +0100\r\n\r\n"
    hdr = fetch.section_bytes(NESTED, root, Section((), "HEADER.FIELDS.NOT", ("Content-Type",)))
    assert b"Content-Type" not in hdr and b"boundary" not in hdr and b"Subject:" in hdr
    assert fetch.section_bytes(NESTED, root, Section((9,))) == b""
    whole = fetch.section_bytes(NESTED, root, Section())
    assert whole == NESTED
    header = fetch.section_bytes(NESTED, root, Section((), "HEADER"))
    text = fetch.section_bytes(NESTED, root, Section((), "TEXT"))
    assert header + text == NESTED


def test_single_part_message():
    root = fetch.parse(SIMPLE)
    assert fetch.section_bytes(SIMPLE, root, Section((1,))) == b"line one\r\nline two\r\n"
    bs = fetch.bodystructure(SIMPLE, root, True)
    assert bs == b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 20 2 NIL NIL NIL NIL)'


def test_raw_utf8_headers_are_sent_as_literals():
    msg = "From: Jürgen <j@example.org>\r\nSubject: Grüße\r\n\r\nx\r\n".encode()
    env = fetch.envelope(fetch.parse(msg))
    assert b'{7}\r\nGr\xc3\xbc\xc3\x9fe' in env


def test_cache_entry_round_trips_through_json():
    import json
    e = json.loads(json.dumps(fetch.cache_entry(NESTED)))
    root = fetch.parse(NESTED)
    assert fetch.cached(e, "env") == fetch.envelope(root)
    assert fetch.cached(e, "bs") == fetch.bodystructure(NESTED, root, True)
    assert e["sent"] == 20240305
    raw8 = fetch.cache_entry(b"Subject: \xff\xfe\r\n\r\n")
    assert fetch.cached(json.loads(json.dumps(raw8)), "env").startswith(b"(NIL {2}\r\n\xff\xfe")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([b"", b"Content-Type: multipart/mixed; boundary=b\r\n\r\n",
                                                  b"Content-Type: message/rfc822\r\n\r\n"]))
def test_fuzz_mime_parser_never_raises(body, prefix):
    data = prefix + body.replace(b"X", b"\r\n--b\r\n")
    root = fetch.parse(data)
    fetch.envelope(root)
    fetch.bodystructure(data, root)
    for sec in (Section((1,)), Section((1, 2)), Section((2,), "MIME"), Section((1,), "TEXT")):
        fetch.section_bytes(data, root, sec)
    fetch.cache_entry(data)


# --- SEARCH -------------------------------------------------------------------------------------

def cand(data: bytes, seq=1, uid=10, flags=(), size=None, date=None, recent=False):
    e = fetch.cache_entry(data)
    return search.Candidate(seq, uid, set(flags), size or len(data), date or time.time(), recent, 5, 50,
                            sent=e["sent"], data=data)


def key(text: str):
    return parse_command([b"a SEARCH " + text.encode()]).args["key"]


@pytest.mark.parametrize("expr,expected", [
    ("ALL", True), ("SEEN", True), ("UNSEEN", False), ("FLAGGED", False), ("NOT FLAGGED", True),
    ("KEYWORD $Work", True), ("UNKEYWORD $Work", False), ('SUBJECT "grüße"', True),
    ("SUBJECT plain", False), ('FROM "juergen@example"', True), ('FROM "jürgen"', True),
    ("TO bob", True), ("CC undisclosed", True), ("HEADER Message-ID nested@", True), ("HEADER X-Missing \"\"", False),
    ("HEADER In-Reply-To \"\"", True), ("BODY builder", False), ("BODY \"the plain part\"", True),
    ("BODY \"html part\"", True), ("TEXT forwarded", True), ("TEXT juergen", True), ("BODY juergen", False),
    ("LARGER 100", True), ("SMALLER 100", False), ("SENTON 5-Mar-2024", True), ("SENTBEFORE 5-Mar-2024", False),
    ("SENTSINCE 5-Mar-2024", True), ("OR FLAGGED SEEN", True), ("1", True), ("2:*", False), ("UID 10", True),
    ("UID 11:*", False), ("NEW", False), ("OLD", True), ("RECENT", False), ("(SEEN TO alice)", True),
    ("NOT (SEEN TO alice)", False), ("BEFORE 1-Jan-1990", False), ("SINCE 1-Jan-1990", True),
])
def test_search_keys_against_a_real_message(expr, expected):
    c = cand(NESTED, flags={"\\Seen", "$Work"})
    assert search.matches(key(expr), c) is expected


def test_search_utf8_subject_and_base64_body():
    msg = (b"Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes("Käsekuchen".encode()))
    k = parse_command([b"a SEARCH CHARSET UTF-8 SUBJECT {6}", "grüß".encode(), b""]).args["key"]
    assert search.matches(k, cand(msg))
    k = parse_command([b"a SEARCH CHARSET UTF-8 BODY {5}", "käse".encode(), b""]).args["key"]
    assert search.matches(k, cand(msg))


def test_search_needs():
    assert search.needs(key("SEEN UID 1:5")) == "none"
    assert search.needs(key("SENTON 1-Jan-2020")) == "sent"
    assert search.needs(key("OR SEEN SUBJECT x")) == "index"  # from the metadata index
    assert search.needs(key("OR SUBJECT x HEADER X-Spam y")) == "header"
    assert search.needs(key("NOT TEXT x")) == "full"


def test_a_real_client_parser_reads_our_structures():
    from imapclient.response_parser import parse_fetch_response
    root = fetch.parse(NESTED)
    line = b"1 (BODYSTRUCTURE " + fetch.bodystructure(NESTED, root) + b" ENVELOPE " + fetch.envelope(root) + b")"
    parsed = parse_fetch_response([line])[1]
    bs = parsed[b"BODYSTRUCTURE"]
    assert bs.is_multipart and [p[:2] for p in bs[0][1:]] == [(b"APPLICATION", b"OCTET-STREAM"),
                                                               (b"MESSAGE", b"RFC822")]
    assert bs[0][0].is_multipart and bs[0][0][1] == b"ALTERNATIVE"
    env = parsed[b"ENVELOPE"]
    assert [a.mailbox for a in env.to] == [b"alice", b"bob"]
    assert env.message_id == b"<nested@example.org>"


@pytest.mark.parametrize("message", [NESTED, SIMPLE, b"Subject: no body", b"\r\nonly a body\r\n",
                                     b"From: =?utf-8?q?J=C3=B6rg?= <j@x.test>\nDate: Tue, 1 Apr 2025 10:00:00 +0200\n\nlf\n"])
def test_header_entry_agrees_with_the_full_entry(message):
    """A first listing parses headers only; what it caches must be what a full parse gives."""
    full = fetch.cache_entry(message)
    head = fetch.header_entry(message)
    refs = head.pop("refs")  # the raw References, for SORT / THREAD from the envelope
    assert isinstance(refs, str) and (refs != "") == (b"\nreferences:" in b"\n" + message.lower())
    from mailstack.imap import sort  # SORT's SUBJECT and DATE keys, also kept by a listing
    assert head.pop("sl") == [sort.SORT_VERSION, full["sort"]["s"], full["sort"]["d"], full["sort"].get("rf", 0)]
    assert head == {k: full[k] for k in ("v", "env", "sent", "hsize", "hs")}
    assert "bs" not in head


# --- the remembered Content-Type (fetch.part_type) ------------------------------------------

def _typed_plain(value: bytes):
    """What _parse_part did before the memo: content_type, then a text part's default charset."""
    t, s, params = fetch.content_type(value)
    if t == "text" and not any(k.lower() == "charset" for k, _ in params):
        params.insert(0, ("charset", "us-ascii"))
    return t, s, params


_CT_PIECES = st.sampled_from([b"text", b"TEXT", b"/", b"plain", b"html", b"multipart", b"mixed",
                              b"message", b"rfc822", b";", b" ", b"\t", b"\r\n ", b"=", b"\"",
                              b"\\", b"charset", b"Charset", b"utf-8", b"boundary", b"name",
                              b"x*0", b"(", b"\xc3\xa9", b"\xff", b"a", b"\x00"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_CT_PIECES, max_size=20), st.binary(max_size=12), st.integers(0, 300))
def test_the_remembered_content_type_is_the_parsed_one(pieces, tail, pad):
    """The memo (and the path past its size cap) gives what a fresh parse gives, twice."""
    value = b"".join(pieces) + tail
    for v in (value, value + b"; x-pad=" + b"p" * pad):
        t, s, params = fetch.part_type(v)
        assert (t, s, list(params)) == _typed_plain(v)
        assert fetch.part_type(v) == (t, s, params)  # the second, remembered answer


def test_a_remembered_content_type_cannot_be_changed_by_its_user():
    """Each Part gets its own params list: changing one part's changes no later parse."""
    msg = b"Content-Type: text/plain; format=flowed\r\n\r\nhi\r\n"
    first = fetch.parse(msg)
    assert first.params == [("charset", "us-ascii"), ("format", "flowed")]
    first.params.append(("x", "y"))
    first.params[0] = ("charset", "koi8-r")
    assert fetch.parse(msg).params == [("charset", "us-ascii"), ("format", "flowed")]
    got = fetch.content_type(b"text/html; charset=utf-8")
    got[2].clear()
    assert fetch.content_type(b"text/html; charset=utf-8")[2] == [("charset", "utf-8")]
    assert isinstance(fetch.part_type(b"text/html; charset=utf-8")[2], tuple)


@pytest.mark.parametrize("ctype", [b"text/\x80", b"\xc3\xa9/plain; charset=utf-8", b"multipart/mix\xffed; boundary=b"])
def test_an_8bit_content_type_is_the_default_not_a_crash(ctype):
    """An 8-bit byte in the type or subtype raised UnicodeDecodeError in every parse (FETCH,
    SEARCH, indexing); RFC 2045 5.2: an invalid Content-Type is taken as text/plain."""
    msg = b"Subject: x\r\nContent-Type: " + ctype + b"\r\n\r\n--b\r\nbody\r\n"
    root = fetch.parse(msg)
    assert (root.type, root.subtype, root.params) == ("text", "plain", [("charset", "us-ascii")])
    assert fetch.bodystructure(msg, root).startswith(b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT"')
    assert search.head_and_pieces(msg)[1] == [(b"--b\r\nbody\r\n", "ascii")]
