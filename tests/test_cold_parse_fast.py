"""The shortcuts of a mailbox's first parse (issue 16, session 5) give what the long ways gave.

* `fetch._params`: a quoted value without a quoted-pair is taken as a slice;
* `fetch._date_keys`: the SENT* day and the SORT seconds of a usual Date: by arithmetic;
* `response.internaldate`: the zone offset once per UTC day, the date part once per local day;
* `fts._read`: one read of fstat's size + 1;
* a lone BODY search answered by the index is matched without a Candidate per message;
* index compaction takes the lines made already.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from mailstack.imap import fetch, sort
from mailstack.store import fts, index


def _params_before(value: bytes, pos: int) -> list[tuple[str, str]]:
    """fetch._params as it was before the slice shortcut (the reference)."""
    out: list[tuple[str, str]] = []
    n = len(value)
    while pos < n and len(out) < 64:
        semi = value.find(b";", pos)
        if semi < 0:
            break
        pos = semi + 1
        while pos < n and value[pos] in b" \t\r\n":
            pos += 1
        m = fetch._TOKEN.match(value, pos)
        if not m:
            continue
        name = m.group().decode("ascii", "replace")
        pos = m.end()
        while pos < n and value[pos] in b" \t":
            pos += 1
        if pos >= n or value[pos] != 0x3D:
            continue
        pos += 1
        while pos < n and value[pos] in b" \t":
            pos += 1
        if pos < n and value[pos] == 0x22:
            pos += 1
            buf = bytearray()
            while pos < n and value[pos] != 0x22:
                if value[pos] == 0x5C and pos + 1 < n:
                    pos += 1
                buf.append(value[pos])
                pos += 1
            pos += 1
            val = bytes(buf)
        else:
            m = fetch._TOKEN.match(value, pos)
            val = m.group() if m else b""
            pos = m.end() if m else pos
        out.append((name, val.decode("utf-8", "surrogateescape")))
    return out


_PARAM_PIECES = st.sampled_from([b";", b" ", b"\t", b"\r\n ", b"=", b'"', b"\\", b'\\"', b"boundary",
                                 b"name", b"charset", b"utf-8", b"alt-3", b"a b", b"\xc3\xa9", b"\xff",
                                 b"=?utf-8?b?w6k=?=", b"x*0*", b"''", b"(", b")", b"/"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PARAM_PIECES, max_size=24), st.binary(max_size=12))
def test_params_with_the_slice_shortcut_are_the_byte_loop(pieces, tail):
    """Quoted values with and without quoted-pairs, unclosed quotes, 8-bit bytes, folding:
    the same pairs as the byte-by-byte loop."""
    value = b"text/plain" + b"".join(pieces) + tail
    for pos in (0, 10):
        assert fetch._params(value, pos) == _params_before(value, pos), value


@pytest.mark.parametrize("value, want", [
    (b'multipart/mixed; boundary="mix-1"', [("boundary", "mix-1")]),
    (b'multipart/mixed; boundary="a\\"b"; x=y', [("boundary", 'a"b'), ("x", "y")]),
    (b'text/plain; name="unclosed', [("name", "unclosed")]),
    (b'text/plain; name=""; charset="utf-8"', [("name", ""), ("charset", "utf-8")]),
    (b'text/plain; name="Gr\xc3\xbc\xc3\x9fe \xff.pdf"', [("name", "Grüße \udcff.pdf")]),
    (b'text/plain;\r\n boundary="x\\\\y"', [("boundary", "x\\y")]),
])
def test_params_examples(value, want):
    assert fetch._params(value, 10) == want == _params_before(value, 10)


def _keys_the_long_way(value: bytes | None) -> tuple:
    root = fetch.Part(0, 0, 0, [] if value is None else [(b"date", value)])
    dt = fetch._date(root)
    return fetch._ymd(dt), sort.seconds(dt)


def test_date_keys_are_the_datetime_ones_on_every_edge():
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    seen = 0
    for year in (1000, 1600, 1899, 1900, 1969, 1970, 1996, 2000, 2038, 2100, 2400, 9999):
        for mon in months:
            for day in (1, 28, 29, 30, 31, 32):
                for clock in ("00:00:00", "23:59:59", "12:30:07"):
                    for zone in ("+0000", "-0000", "+1400", "-1259", "+0530", "-0930"):
                        value = f"Tue, {day} {mon} {year} {clock} {zone}".encode()
                        root = fetch.Part(0, 0, 0, [(b"date", value)])
                        assert fetch._date_keys(root) == _keys_the_long_way(value), value
                        seen += 1
    assert seen > 10000


@pytest.mark.parametrize("value", [
    None, b"", b"garbage", b"Tue, 1 Apr 2025 10:00:00 +0200", b"1 Apr 2025 10:00:00 +0200",
    b"Tue,  1 Apr 2025 10:00:00 +0200 ", b"Tue, 1 Apr 2025 10:00 +0200", b"Tue, 1 Apr 2025 10:00:00 GMT",
    b"Tue, 1 Apr 25 10:00:00 +0200", b"Tue, 1 Apr 2025 24:00:00 +0200", b"Tue, 31 Apr 2025 10:00:00 +0200",
    b"Tue, 1 Apr 2025\r\n 10:00:00 +0200", b"Tue, 1 Apr 2025 10:00:00 +2400", b"Tue, 1 Abc 2025 10:00:00 +0200",
    b"Tue, 1 Apr 0999 10:00:00 +0200", b"Tue, 1 Apr 2025 10:00:00 +0200 (CEST)", b"\xff\xfe 1 Apr 2025",
])
def test_date_keys_of_odd_dates_are_the_long_way(value):
    root = fetch.Part(0, 0, 0, [] if value is None else [(b"date", value)])
    assert fetch._date_keys(root) == _keys_the_long_way(value)


@settings(max_examples=500, deadline=None)
@given(st.integers(1000, 9999), st.integers(1, 12), st.integers(1, 31), st.integers(0, 23),
       st.integers(0, 59), st.integers(0, 59), st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59))
def test_date_keys_fuzz(year, month, day, hour, minute, second, sign, zh, zm):
    mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][month - 1]
    value = f"{day} {mon} {year} {hour:02d}:{minute:02d}:{second:02d} {sign}{zh:02d}{zm:02d}".encode()
    root = fetch.Part(0, 0, 0, [(b"date", value)])
    assert fetch._date_keys(root) == _keys_the_long_way(value)


def test_header_entry_keeps_the_date_keys_of_a_full_parse():
    header = (b"From: a@b.test\r\nDate: Sat, 31 Dec 2022 23:59:59 -0130\r\nSubject: x\r\n\r\n")
    entry = fetch.header_entry(header)
    dt = fetch._date(fetch.parse(header))
    assert entry["sent"] == fetch._ymd(dt) == 20221231
    assert entry["sl"][2] == sort.seconds(dt)


_INTERNALDATE_CHECK = textwrap.dedent("""
    import random, sys
    from mailstack.imap import response
    rng = random.Random(int(sys.argv[1]))
    stamps = [rng.uniform(-2.5e9, 4.2e9) for _ in range(20000)]
    stamps += [rng.randrange(-10 ** 9, 2 * 10 ** 9) for _ in range(20000)]
    # every quarter of an hour through 2011-2012 (Samoa skipped a day) and 2024-2025 (DST)
    for start in (1293840000, 1704067200):
        stamps += [start + 900 * i + d for i in range(0, 2 * 35040, 3) for d in (0, -0.25, 0.5, 899.75)]
    bad = [t for t in stamps if response.internaldate(t) != response._internaldate(t)]
    assert response._day_offsets, "the memo was not used"
    print(len(stamps), len(bad), bad[:3])
""")


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/St_Johns", "Australia/Lord_Howe",
                                  "Asia/Kolkata", "Pacific/Chatham", "Pacific/Apia", "America/Sao_Paulo"])
def test_internaldate_memo_is_localtime_in_every_zone(zone):
    """In a process of its own (the zone is read at start): the remembered offsets and
    dates give localtime's answer, around DST changes, half-hour and 45-minute zones, and
    the day Samoa skipped."""
    assert Path("/usr/share/zoneinfo", zone).exists(), f"no zoneinfo for {zone}: tests/run.sh installs tzdata"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TZ": zone, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", _INTERNALDATE_CHECK, "7"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    total, bad, _ = out.stdout.split(" ", 2)
    assert int(total) > 90000 and bad == "0", out.stdout


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 12_345, (1 << 20) - 1, 1 << 20, (1 << 20) + 7, 3 << 20])
def test_fts_read_gives_the_whole_file(tmp_path, size):
    data = os.urandom(size)
    f = tmp_path / "m"
    f.write_bytes(data)
    assert fts._read(f) == data


def test_fts_read_of_a_file_longer_than_its_fstat(tmp_path):
    """/proc files say size 0 and hold bytes: the read goes on to the end."""
    got = fts._read(Path("/proc/self/status"))
    assert got.startswith(b"Name:") and got.endswith(b"\n")


def test_compaction_writes_the_lines_made_and_they_load_back(tmp_path):
    path = tmp_path / index.NAME
    idx = index.MetadataIndex.load(path, 7, {})
    entries = {uid: index.Plain({"v": 5, "env": f"(\"é {uid}\")", "hs": {"subject": [f"s{uid}"]}})
               for uid in range(1, 40)}
    raws = index.serialize(entries)
    rewrite, data = idx.plan_put_raw(raws, None, entries)
    assert rewrite  # a fresh index compacts at its first put
    assert data == b"V7\n" + b"".join(b"%d %s\n" % (uid, raws[uid]) for uid in entries)
    idx.write(rewrite, data)
    again = index.MetadataIndex.load(path, 7, {})
    assert {uid: again.get(uid, None) for uid in entries} == entries


def test_a_lone_body_search_answered_by_the_index_gives_sequence_numbers_after_expunges(tmp_path):
    """SEARCH BODY answered by the index becomes a set of UIDs, matched without a
    Candidate per message: its sequence numbers must still be the view's after EXPUNGEs,
    and the same as the Candidate path gives when the key has more than the set."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from imap_fixtures import InProcessIMAP
    from test_imap_session import ALICE, Raw
    srv = InProcessIMAP(tmp_path)
    try:
        for i in range(1, 9):  # UIDs 1..8; the needle in the odd ones
            body = "the needlework of %d\r\n" % i if i % 2 else "nothing here %d\r\n" % i
            srv.deliver(ALICE, (f"From: s{i}@example.org\r\nSubject: m{i}\r\n"
                                f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode())
        r = Raw(srv)
        r.cmd("SELECT INBOX")
        r.cmd("STORE 2:3 +FLAGS (\\Deleted)")
        lines, _ = r.cmd("EXPUNGE")
        assert sum(x.endswith(b" EXPUNGE") for x in lines) == 2  # UIDs 1 4 5 6 7 8 at sequence numbers 1..6
        assert r.cmd("SEARCH BODY needlework")[0] == [b"* SEARCH 1 3 5"]
        assert r.cmd("UID SEARCH BODY needlework")[0] == [b"* SEARCH 1 5 7"]
        assert r.cmd("SEARCH BODY needlework UNDELETED")[0] == [b"* SEARCH 1 3 5"]  # the Candidate path
        assert r.cmd("SEARCH NOT BODY needlework")[0] == [b"* SEARCH 2 4 6"]
        assert r.cmd("SEARCH BODY absentword")[0] == [b"* SEARCH"]
    finally:
        srv.close()


def _fake_session(recent: set[int]):
    from types import SimpleNamespace
    from mailstack.imap.fetching import FetchCommands
    from mailstack.imap.selected import SelectedCommands
    fake = SimpleNamespace(recent=recent, imap4rev2=False)
    fake.flags_of = lambda m: SelectedCommands.flags_of(fake, m)
    fake._render_plain_items = lambda *a: FetchCommands._render_plain_items(fake, *a)
    fake._render_plain_formatted = lambda *a: FetchCommands._render_plain_formatted(fake, *a)
    fake._flags_item = lambda *a: FetchCommands._flags_item(fake, *a)
    return fake, FetchCommands


@pytest.mark.parametrize("names", [
    ["UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", "ENVELOPE"], ["ENVELOPE"], ["INTERNALDATE"],
    ["RFC822.SIZE", "UID"], ["FLAGS", "MODSEQ", "UID"], ["UID", "UID", "ENVELOPE", "FLAGS"],
    ["MODSEQ", "ENVELOPE", "INTERNALDATE", "RFC822.SIZE", "FLAGS", "UID"], ["UID", "FLAGS", "MODSEQ"],
])
def test_formatted_listing_responses_are_the_item_by_item_ones(names):
    """One %-format per message gives the bytes the item-by-item rendering gives, in the
    order asked, with shared and unshared flag sets, \\Recent, keywords, a message whose
    envelope is missing (expunged meanwhile: said without it) and odd dates."""
    from mailstack.store.base import MessageInfo
    fake, cls = _fake_session({2, 5})
    shared = frozenset({"\\Seen"})
    msgs = [MessageInfo(uid, shared if uid % 3 else {"\\Flagged", "$Label1"}, 1000 + uid,
                        [0.0, -1.5, 1704067200.75, 2 ** 31 + 0.25, 951782400.0][uid % 5], f"k{uid}", modseq=uid * 7)
            for uid in range(1, 12)]
    batch = list(zip(range(1, 12), msgs))
    entries = {m.uid: b'ENVELOPE ("d%d" NIL NIL NIL NIL NIL NIL NIL NIL NIL)' % m.uid for m in msgs if m.uid != 4}
    want = cls._render_plain_items(fake, batch, names, {}, entries)
    got = cls._render_plain_formatted(fake, batch, names, {}, entries)
    assert got == want
    assert got[1] == ("ENVELOPE" in names)
    assert cls._render_plain(fake, batch, [SimpleAtt(n) for n in names], {}, entries) == want


class SimpleAtt:
    def __init__(self, name: str) -> None:
        self.name = name


def _head_text_before(root) -> str:
    """search._head_text as it was (a nested generator over _decode_words): the reference."""
    from mailstack.imap import search
    return search._fold(search.TEXT_SEP.join(seg for k, v in root.headers
                                             for seg in (k.decode("ascii", "replace"), search._decode_words(v))))


_HEADER_PIECES = st.sampled_from([b"Subject: ", b"From: ", b"X-\xff\xfe: ", b"=?utf-8?b?w6k=?=", b"=?iso-8859-1?q?caf=E9?=",
                                  b"=?utf-8?b?broken", b"=?x-unknown?q?abc?=", b"Gr\xc3\xbc\xc3\x9fe", b"\xe9t\xe9",
                                  b"\r\n", b"\n", b"\r\n\t", b"\n ", b"plain words", b":", b"\xff", b"\xc3", b"SS \xc3\x9f"])


@settings(max_examples=600, deadline=None)
@given(st.lists(_HEADER_PIECES, max_size=30), st.sampled_from([b"\r\n\r\nbody\r\n", b"\n\nbody\n", b"", b"\r\n"]))
def test_head_text_is_the_generator_one(pieces, tail):
    """The head text of the full-text index from 8-bit names and values, RFC 2047 words
    (good, broken, unknown charset), folded lines, LF or CRLF, no blank line."""
    from mailstack.imap import search
    root = fetch.parse(b"".join(pieces) + tail)
    assert search._head_text(root) == _head_text_before(root)


BROKEN_WORDS = b"=?utf-8?b?broken=?utf-8?b?w6k=?="  # email.header raised HeaderParseError on it


def test_a_broken_encoded_word_that_email_header_refuses_is_kept_as_written():
    """decode_header raised email.errors.HeaderParseError (not a ValueError) on this Subject:
    the first listing's entry, the full-text index texts and the SORT key all raised."""
    from mailstack.imap import search
    header = b"Subject: " + BROKEN_WORDS + b"\r\nFrom: =?utf-8?b?x=?utf-8?b?=?= <a@b.test>\r\n\r\n"
    entry = fetch.header_entry(header)
    assert entry["hs"]["subject"] == [BROKEN_WORDS.decode().casefold()]
    head, body = search.message_texts(header + b"text\r\n")
    assert BROKEN_WORDS.decode().casefold() in head and body == "text\r\n"
    assert sort.subject_and_reply(BROKEN_WORDS)[0] == BROKEN_WORDS.decode().upper()


def test_a_mailbox_with_a_refused_encoded_word_lists_searches_and_sorts(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from imap_fixtures import InProcessIMAP
    from test_imap_session import ALICE, Raw
    srv = InProcessIMAP(tmp_path)
    try:
        srv.deliver(ALICE, b"From: a@b.test\r\nSubject: fine\r\n\r\nfirst needle\r\n")
        maildir = Path(srv.cfg.mail_dir) / "example.test" / "alice"
        (maildir / "new" / "1700000000.behind.host").write_bytes(
            b"From: c@d.test\r\nSubject: " + BROKEN_WORDS + b"\r\n\r\nsecond needle\r\n")
        r = Raw(srv)
        r.cmd("SELECT INBOX")
        lines, tagged = r.cmd("FETCH 1:* (UID ENVELOPE)")
        assert b"OK" in tagged and len(lines) == 2 and BROKEN_WORDS in lines[1]
        assert r.cmd("UID SEARCH SUBJECT w6k")[0] == [b"* SEARCH 2"]
        assert r.cmd("UID SEARCH BODY needle")[0] == [b"* SEARCH 1 2"]
        assert r.cmd("UID SEARCH TEXT w6k")[0] == [b"* SEARCH 2"]
        assert r.cmd("UID SORT (SUBJECT) UTF-8 ALL")[0] == [b"* SORT 2 1"]
    finally:
        srv.close()
