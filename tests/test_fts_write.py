"""store/fts.py's writes: one statement per table for a batch (rows as a JSON array), the
reading of files overlapped with the writing of the previous batch; what is found equals
what is in the texts."""
from __future__ import annotations

import sqlite3

import pytest

from mailstack.imap import search
from mailstack.store import fts

TEXTS = ["plain ascii text", "non-bmp \U0001F600 smile and ü", 'quotes " and \\ backslash', "nul \x00 inside",
         "sep \uffff segments", "", "x" * 70000]


def _scan(docs, needle, body_only=True):
    return {b for b, h, t in docs if needle in t or (not body_only and needle in h)}


def test_batch_insert_matches_the_texts_and_skips_known_bases(tmp_path):
    path = tmp_path / fts.NAME
    docs = [(f"b{i}", f"head {i} {t}", t) for i, t in enumerate(TEXTS)]
    fts.add(path, docs + [docs[0]])  # a base twice in one batch: once
    fts.add(path, docs[:3] + [("late", "late head", "late body ü")])  # known bases are skipped
    bases, _ = fts.indexed(path)
    assert bases == {b for b, _, _ in docs} | {"late"}
    for needle in ("ascii", "\U0001F600 smi", '" and \\', "d \\ b", "late body", "xxxxx", "nd ü", "head 3"):
        body = fts.candidates(path, needle, True)
        assert _scan(docs + [("late", "late head", "late body ü")], needle) <= body
        assert _scan(docs, needle, False) <= fts.candidates(path, needle, False)
    assert fts.candidates(path, "head 3", True) == set()  # BODY does not see the header
    assert not fts.usable("a\x00b") and not fts.usable("ab") and fts.usable("abc")
    with sqlite3.connect(path) as db:  # the rowids of both tables are the docs' ids
        ids = {row[0] for row in db.execute("SELECT id FROM docs")}
        assert ids == set(range(1, len(docs) + 2))


def test_index_files_overlaps_reading_and_writing_and_reports_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(fts, "BATCH", 3)
    files = []
    for i in range(10):
        f = tmp_path / f"m{i}"
        f.write_bytes(b"Subject: s%d\r\n\r\nbody number %d\r\n" % (i, i))
        files.append((f"m{i}", f))
    files.append(("gone", tmp_path / "missing"))
    seen = []
    path = tmp_path / fts.NAME
    added = fts.index_files(path, files, None, lambda b, h, t: seen.append(b))
    assert added == {f"m{i}" for i in range(10)} == set(seen) == fts.indexed(path)[0]
    # rows hold words: "7" is no trigram, so every "body number" is a candidate, and the
    # check against the message leaves the one
    assert "m7" in fts.candidates(path, "body number 7", True)
    assert fts.answer(path, dict(files[:10]), [("body number 7", True)]) == ([{"m7"}], set())
    assert search.message_texts(files[7][1].read_bytes())[1] == "body number 7\r\n"

    def broken(path, docs, *worded):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(fts, "add", broken)
    with pytest.raises(sqlite3.OperationalError):  # the writer's error reaches the caller
        fts.index_files(tmp_path / "other.sqlite", files, None, None)

