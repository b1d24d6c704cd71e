"""RFC 5322 address lists for ENVELOPE and SEARCH (mailstack/imap/addresses.py): comments,
CFWS, obsolete forms, groups; expected values are what Dovecot 2.3 answers, except where
it gives up on an obsolete form RFC 5322 defines (noted)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.imap import addresses
from mailstack.imap.fetch import address_list

CASES = [
    (b"user@domain (Real Name)", b'(("Real Name" NIL "user" "domain"))'),
    (b"<user-from (comment)@ (comment) domain.org>", b'((NIL NIL "user-from" "domain.org"))'),
    (b'"Quoted \\"X\\" Name" <a.b@c.d>, plain@e.f (c1) (c2)',
     b'(("Quoted \\"X\\" Name" NIL "a.b" "c.d")("c2" NIL "plain" "e.f"))'),
    (b'Group: g1@h, "x" <g2@h>;, (only comment) <z@y>',
     b'((NIL NIL "Group" NIL)(NIL NIL "g1" "h")("x" NIL "g2" "h")(NIL NIL NIL NIL)(NIL NIL "z" "y"))'),
    (b"<@route1,@route2:user@host>, undisclosed-recipients:;, bare",
     b'((NIL "@route1,@route2" "user" "host")(NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)'
     b'(NIL NIL "bare" "MISSING_DOMAIN"))'),
    (b"Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>", b'(("Pete" NIL "pete" "silly.test"))'),
    # obs-local-part / obs-domain with CFWS around the dots (Dovecot gives up here; RFC 5322 4.4)
    (b"first . last @ host . example (Comment (nested))",
     b'(("Comment (nested)" NIL "first.last" "host.example"))'),
    (b"John Q. Public <jqp@ex.org>", b'(("John Q. Public" NIL "jqp" "ex.org"))'),
    (b"Al <al@x.org>", b'(("Al" NIL "al" "x.org"))'),
    (b"a@b,,c@d", b'((NIL NIL "a" "b")(NIL NIL "c" "d"))'),
    (b"x@[127.0.0.1]", b'((NIL NIL "x" "[127.0.0.1]"))'),
    (b"  ", b"NIL"),
]


def test_envelope_addresses():
    for raw, want in CASES:
        assert address_list(raw) == want, raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_takes_any_bytes(data):
    for a in addresses.parse_list(data):
        assert a.mailbox is None or isinstance(a.mailbox, bytes)
    assert address_list(data).startswith((b"(", b"NIL"))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='ab.@<>(),:;" \\\t\r\n', max_size=80))
def test_parser_takes_any_punctuation(text):
    addresses.parse_list(text.encode())
    address_list(text.encode())
