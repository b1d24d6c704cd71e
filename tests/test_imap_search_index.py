"""SEARCH answered from the metadata index with a compiled test (search.compile_indexed):
the same answer as matches() on the index's header texts and as a plain scan of the
message's header, for random keys of header fields, flags, UID sets, AND / OR / NOT."""
from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.imap import fetch, search

MESSAGES = [
    b"From: Al <al@x.org>\r\nTo: bob@y.org\r\nSubject: Hello World\r\nMessage-ID: <a@x>\r\n\r\nbody\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <j@x.test>\r\nSubject: =?utf-8?q?Caf=C3=A9_STRASSE?=\r\nCc: c@c.org\r\n\r\nx\r\n",
    b"Subject: re: hello\r\nList-Id: <list.x.org>\r\nReply-To: (comment) r@x.org\r\n\r\nx\r\n",
    b"To: Group: m@m.org, n@n.org;\r\nSubject:\r\n\r\nx\r\n",
    b"X-Other: hello\r\n\r\nno indexed field\r\n",
]
FLAGS = [set(), {"\\Seen"}, {"\\Deleted", "$Label1"}, {"\\Seen", "\\Flagged"}, {"$label1"}]

_names = st.sampled_from(["Subject", "SUBJECT", "from", "To", "cc", "bcc", "reply-to", "List-ID", "message-id"])
_needles = st.sampled_from(["", "hello", "HELLO", "world", "café", "strasse", "jörg", "x.org", "al <al@x.org>",
                            "m@m.org", "<a@x>", "comment", "zzz", "list"])
_leaf = st.one_of(
    st.just(("ALL",)),
    st.tuples(st.just("HEADER"), _names, _needles),
    st.tuples(st.just("FLAG"), st.sampled_from(["\\Seen", "\\Deleted", "\\Flagged", "$Label1", "$LABEL1"]),
              st.booleans()),
    st.builds(lambda s: ("INSET", frozenset(s)), st.sets(st.integers(1, 5), max_size=3)),
)
_keys = st.recursive(_leaf, lambda inner: st.one_of(
    st.builds(lambda k: ("NOT", k), inner),
    st.builds(lambda a, b: ("OR", a, b), inner, inner),
    st.builds(lambda ks: ("AND", ks), st.lists(inner, min_size=1, max_size=3))), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(_keys)
def test_compiled_index_search_equals_matches_and_the_scan(key):
    quick = search.compile_indexed(key)
    assert quick is not None
    for uid, (data, flags) in enumerate(zip(MESSAGES, FLAGS), 1):
        hs = fetch.header_entry(data)["hs"]
        m = SimpleNamespace(uid=uid, flags=flags)
        by_index = search.matches(key, search.Candidate(uid, uid, flags, len(data), 0.0, False, 5, 5, hs=hs))
        by_scan = search.matches(key, search.Candidate(uid, uid, flags, len(data), 0.0, False, 5, 5, data=data))
        assert quick(m, hs) == by_index == by_scan, (key, uid)


def test_keys_the_compiled_test_leaves_to_matches():
    for key in (("HEADER", "X-Other", "hello"), ("BODY", "x"), ("LARGER", 3), ("AND", [("ALL",), ("SEQ", None)]),
                ("NOT", ("SENTON", (2024, 1, 1)))):
        assert search.compile_indexed(key) is None
