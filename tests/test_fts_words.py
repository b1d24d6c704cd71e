"""store/fts.py's rows hold each distinct word of a text once (words()), and a query asks
only for the trigrams inside the needle's words: every message holding a string is still
a candidate, and the first search's answer, read off those rows, is exactly the scan's."""
from __future__ import annotations

import sqlite3
import sys

import pytest

from hypothesis import given, settings, strategies as st

from mailstack.imap import search
from mailstack.store import fts

# white space of several kinds, a segment separator, characters casefold changes
# (ß -> ss, K Kelvin -> k, ﬁ -> fi, Σ -> σ), CJK, an astral character
ALPHABET = st.sampled_from(list("ab abc\t\r\n\u00a0\u3000\x1c\x85" + "ßSsKK\ufb01fiΣσς東京\U0001F600" + fts.SEP + "-.="))
TEXT = st.text(ALPHABET, max_size=60)


def _trigrams(text: str) -> set[str]:
    return {text[i:i + 3] for i in range(len(text) - 2)}


def test_casefold_keeps_white_space_and_makes_none():
    """What _texts relies on to fold only a text's distinct words: folding them is taking
    the distinct words of the folded text."""
    for i in range(sys.maxunicode + 1):
        c = chr(i)
        f = c.casefold()
        if c.isspace():
            assert f == c, hex(i)
        else:
            assert f and not any(x.isspace() for x in f), hex(i)


@settings(max_examples=600, deadline=None)
@given(TEXT, TEXT, st.integers(0, 60), st.integers(0, 60))
def test_words_keep_what_a_query_asks_and_answer_exactly(raw, other, i, j):
    folded = raw.casefold()
    row = fts.words(raw).casefold()
    assert set(row.split()) == set(folded.split())
    for needle in (folded[min(i, j):max(i, j)], other.casefold()):
        if needle in folded and fts.usable(needle):  # a candidate whatever the needle
            assert fts._grams(needle) and fts._grams(needle) <= _trigrams(row)
        if not any(c.isspace() for c in needle) and fts.SEP not in needle:
            # the first search answers strings without white space from the words alone
            assert (needle in row) == (needle in folded), (needle, row, folded)


def _message(body: str) -> bytes:
    return ("Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()


@settings(max_examples=150, deadline=None)
@given(st.lists(TEXT, min_size=1, max_size=6), TEXT, st.booleans())
def test_first_search_and_index_give_the_scan(tmp_path_factory, bodies, needle, body_only):
    tmp = tmp_path_factory.mktemp("fts")
    files = {}
    for n, body in enumerate(bodies):
        f = tmp / f"m{n}"
        f.write_bytes(_message(body))
        files[f"m{n}"] = f
    needle = needle.casefold()
    if not fts.usable(needle):
        return
    want = set()
    for base, f in files.items():
        head, body = search.message_texts(f.read_bytes())
        if needle in body or (not body_only and needle in head):
            want.add(base)
    path = tmp / fts.NAME
    first = fts.answer(path, files, [(needle, body_only)], list(files.items()))
    assert first is not None and first[0] == [want]  # read and indexed on the way
    again = fts.answer(path, files, [(needle, body_only)])
    assert again is not None and again[0] == [want]  # from the rows
    fts.drop(path)


OLD_SCHEMA = ("CREATE TABLE docs(id INTEGER PRIMARY KEY, base TEXT UNIQUE NOT NULL);"
              "CREATE VIRTUAL TABLE body USING fts5(t, content='', detail=none, tokenize='trigram case_sensitive 1');"
              "CREATE VIRTUAL TABLE head USING fts5(t, content='', detail=none, tokenize='trigram case_sensitive 1');")


def test_a_file_from_before_is_taken_over_and_a_program_from_before_rebuilds_ours(tmp_path):
    """A file written before words(): its rows hold whole texts, so every trigram a query
    asks for now, and it is used as it is (the column renamed).  A program from before
    fails on a file written now (and so drops and rebuilds it) instead of asking it for
    trigrams across words its rows lack."""
    path = tmp_path / fts.NAME
    texts = {"a": "the lazy dog\uffffsleeps all day", "b": "lazy cats", "c": "a dog, lazily"}
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        for i, (base, text) in enumerate(texts.items(), 1):
            db.execute("INSERT INTO docs(id, base) VALUES (?, ?)", (i, base))
            db.execute("INSERT INTO body(rowid, t) VALUES (?, ?)", (i, text))
            db.execute("INSERT INTO head(rowid, t) VALUES (?, ?)", (i, "subject\uffffhello there"))
    files = {}
    for base, text in texts.items():
        files[base] = tmp_path / base
        files[base].write_bytes(b"Subject: hello there\r\n\r\n" + text.replace("\uffff", "\n").encode())
    assert fts.indexed(path)[0] == set(texts)
    for needle in ("lazy dog", "dog", "lazy", "cats", "dog, lazily", "all day", "hello"):
        for body_only in (True, False):
            cands = fts.candidates(path, needle, body_only)
            assert {b for b, t in texts.items() if needle in t or not body_only and needle == "hello"} <= cands
    assert fts.answer(path, files, [("lazy dog", True), ("hello", False)]) == ([{"a"}, set(texts)], set())
    fts.add(path, [("d", "subject", "lazy dogs bark")])
    with sqlite3.connect(path) as db:
        with pytest.raises(sqlite3.OperationalError):
            db.execute("SELECT base FROM docs")  # what the program from before asks first
    assert not fts.usable("to be") and fts.usable("to bee") and not fts.usable("ab")


# bytes a UTF-8 or ASCII part may hold: valid and broken UTF-8, ASCII and Unicode white space
# (NBSP, ideographic space), casefold changes (ß, K Kelvin)
CHUNKS = st.sampled_from([b"ab", b"abc", b" ", b"\t", b"\r\n", b"\xc2\xa0", b"\xe3\x80\x80", b"\xc3\x9f",
                          b"\xe2\x84\xaa", b"\xe2\x82", b"\xff", b"\x80", b"\xef\xbf\xbf", b"-", b"=", b"S"])
RAW = st.lists(CHUNKS, max_size=25).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(TEXT, st.tuples(RAW, st.sampled_from(["utf-8", "ascii"]))), max_size=4),
       TEXT, st.integers(0, 80), st.integers(0, 80))
def test_words_from_undecoded_parts_answer_as_the_decoded_text(pieces, other, i, j):
    """_piece_words (UTF-8 / ASCII parts split as bytes, then decoded) against the text the
    scan compares: every trigram a query asks is in the row, and a string without white
    space is in the row iff it is in the text."""
    folded = fts.SEP.join(p if isinstance(p, str) else p[0].decode(p[1], "replace") for p in pieces).casefold()
    row = fts._piece_words(pieces).casefold()
    for needle in (folded[min(i, j):max(i, j)], other.casefold()):
        if needle in folded and fts.usable(needle):
            assert fts._grams(needle) <= _trigrams(row), (needle, row)
        if not any(c.isspace() for c in needle) and fts.SEP not in needle:
            assert (needle in row) == (needle in folded), (needle, row, folded)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(RAW, st.sampled_from(["utf-8", "UTF8", "us-ascii", "iso-8859-1", "x-unknown"]),
                          st.sampled_from(["7bit", "quoted-printable", "base64"])), min_size=1, max_size=3))
def test_body_pieces_are_the_body_texts(parts):
    """head_and_pieces decodes to what head_and_body (the scan's texts) gives."""
    import base64
    import quopri
    out = [b"Subject: s\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"]
    for raw, charset, cte in parts:
        body = {"7bit": raw, "quoted-printable": quopri.encodestring(raw),
                "base64": base64.encodebytes(raw)}[cte]
        out.append(b"--BB\r\nContent-Type: text/plain; charset=%s\r\nContent-Transfer-Encoding: %s\r\n\r\n%s\r\n"
                   % (charset.encode(), cte.encode(), body))
    data = b"".join(out) + b"--BB--\r\n"
    head, body = search.head_and_body(data)
    head2, pieces = search.head_and_pieces(data)
    assert head2 == head
    assert fts.SEP.join(p if isinstance(p, str) else p[0].decode(p[1], "replace") for p in pieces) == body
