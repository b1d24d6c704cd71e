"""The fast paths of the metadata index (issue 16): entries kept as their JSON lines and
read lazily (store/index.py), ENVELOPE taken off the front of a line (fetch.cached_envelope),
the metadata-only FETCH renderer, header reads and the header parse shortcuts.

Every path must answer byte for byte what the plain path answers, and the index must stay
"rebuilt or repaired, never wrong": cold (files put in behind the server's back), warm,
after a restart, with the index file cut short or damaged anywhere, of another
UIDVALIDITY, after kill -9 in the middle of writing it, and after files are moved in and
out with mv."""
from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given, settings, strategies as st

from imap_fixtures import InProcessIMAP, make_store
from mailstack.imap import fetch
from mailstack.imap.fetching import HEADER_PEEK, read_header
from mailstack.store import index as idxmod
from mailstack.store.maildir import MaildirStore
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from test_imap_session import ALICE, Raw

LIST = "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"


def messages() -> list[bytes]:
    """Headers that take every branch: folded, encoded, 8-bit, groups, odd and missing
    dates, bare LF, no body, headers longer than the first read and than HEADER_PEEK."""
    out = []
    for i in range(24):
        date = ["Tue, 1 Apr 2025 10:00:00 +0200", "1 Apr 2025 10:00:00 -0000", "Mon, 31 Mar 2025 23:59:59 +0000",
                "Sat, 29 Feb 2025 10:00:00 +0100", "Wed, 02 Apr 25 10:00 GMT", "garbage", None,
                "Thu,  3 Apr 2025 10:00:00 +9999"][i % 8]
        h = [f"From: =?utf-8?q?J=C3=BCrgen_{i}?= <j{i}@example.org>",
             "To: alice@example.test, Bob <bob@example.test>" if i % 3 else "To: undisclosed-recipients:;",
             f"Subject: message {i}\r\n\tfolded \"quoted\" \\ part" if i % 4 == 0 else f"Subject: Grüße {i}",
             f"Message-ID: <m{i}@example.org>"]
        if date is not None:
            h.append(f"Date: {date}")
        if i % 5 == 0:
            h.append("Cc: Group: a@b.test, (comment) c@d.test;")
        if i % 6 == 0:
            h.append("Reply-To: r@example.org")
        raw = "\r\n".join(h).encode("utf-8")
        if i == 7:
            raw = raw.replace(b"\r\n", b"\n") + b"\n\nbare LF body\n"
        elif i == 9:
            raw += b"\r\n"  # a header and no body, no blank line
        elif i == 10:
            raw += b"\r\nReferences: " + b" ".join(b"<r%d@x.test>" % k for k in range(400)) + b"\r\n\r\nbody\r\n"
        elif i == 11:
            raw += b"\r\nX-Long: " + b"y" * (HEADER_PEEK + 500) + b"\r\n\r\nbody after a long header\r\n"
        else:
            raw += b"\r\n\r\nbody %d\r\n" % i
        out.append(raw)
    return out


def maildir(srv) -> Path:
    return Path(srv.cfg.mail_dir) / "example.test" / "alice"


def place(box: Path, datas: list[bytes], start: int = 0) -> None:
    """Files put in new/ behind the server's back (as the bench does, and a person with mv)."""
    for n, data in enumerate(datas, start):
        (box / "new" / f"{1700000000 + n}.M{n}P1Q{n}.behind,S={len(data)}").write_bytes(data)


def restart(srv) -> None:
    """A new store on the same files: what a restart of the process leaves."""
    srv.services.store = make_store(srv.store_kind, srv.cfg, srv.events)


def _no_recent(line: bytes) -> bytes:
    """\\Recent goes to the first session that sees a message (RFC 3501 2.3.2): not compared."""
    return re.sub(rb"FLAGS \(([^)]*)\)", lambda m: b"FLAGS (" + b" ".join(
        f for f in m[1].split() if f != b"\\Recent") + b")", line, count=1)


def listing(srv) -> list[bytes]:
    r = Raw(srv)
    try:
        r.cmd("SELECT INBOX")
        lines, tagged = r.cmd("FETCH 1:* " + LIST)
        assert b"OK" in tagged
        return [_no_recent(x) for x in lines]
    finally:
        r.sock.close()


def reference(srv) -> list[bytes]:
    """The same items from the generic renderer, the envelopes checked against a full
    parse of each message's bytes."""
    r = Raw(srv)
    try:
        r.cmd("SELECT INBOX")
        lines, _ = r.cmd("FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODY.PEEK[])")
    finally:
        r.sock.close()
    out = []
    for line in lines:
        m = re.match(rb"(.*) BODY\[\] \{(\d+)\}\r\n", line, re.S)
        assert m, line[:80]
        data = line[m.end():m.end() + int(m[2])]
        assert fetch.envelope(fetch.parse(data)) in m[1], (m[1][:60], data[:60])
        out.append(_no_recent(m[1] + line[m.end() + int(m[2]):]))
    return out


def test_listing_byte_identical_cold_warm_restarted_damaged_and_moved(tmp_path):
    srv = InProcessIMAP(tmp_path)
    try:
        box = maildir(srv)
        datas = messages()
        place(box, datas)
        want = reference(srv)
        (box / idxmod.NAME).unlink(missing_ok=True)  # the reference's FETCH wrote entries
        restart(srv)
        assert len(want) == len(datas)
        assert listing(srv) == want  # cold: every entry built from the files
        assert listing(srv) == want  # warm: from memory
        restart(srv)
        assert listing(srv) == want  # from the index file's lines, unparsed
        index = (box / idxmod.NAME).read_bytes()
        assert index.count(b"\n") == len(datas) + 1
        # cut short anywhere (kill -9 in an append, a full disk), damaged, of another UIDVALIDITY
        rng = random.Random(5)
        cuts = [rng.randrange(1, len(index)) for _ in range(6)] + [len(index) - 1, index.index(b"\n") + 3]
        damaged = []
        for cut in cuts:
            damaged.append(index[:cut])
        first = index.index(b"\n") + 1
        line_end = index.index(b"\n", first)
        damaged.append(index[:first + 20] + b"\x00garbage\xff" + index[first + 31:])  # inside an envelope
        damaged.append(index[:line_end - 5] + b"###" + index[line_end:])  # the tail of a line
        damaged.append(index[:first] + b"1 {\"v\":" + index[first:])  # a line glued onto a fragment
        damaged.append(b"V1\n" + index[first:])  # another UIDVALIDITY's file
        damaged.append(b"\xff" * 100)
        for bad in damaged:
            (box / idxmod.NAME).write_bytes(bad)
            restart(srv)
            assert listing(srv) == want, bad[:60]
            restart(srv)  # repaired: the missing entries were put back and read again
            assert listing(srv) == want
        # mv: one message out, one in (no size in its name), another UID dropped in cur/
        gone = next(p for sub in ("new", "cur") for p in (box / sub).iterdir() if p.read_bytes() == datas[3])
        os.rename(gone, tmp_path / "elsewhere")
        extra = b"From: late@example.org\r\nSubject: moved in\r\nDate: Fri, 4 Apr 2025 08:00:00 +0000\r\n\r\nx\r\n"
        (box / "cur" / "1700009999.foreign.host:2,S").write_bytes(extra)
        time.sleep(0.1)  # past the store's settle time for fine timestamps
        want2 = reference(srv)
        assert len(want2) == len(datas) and b'"moved in"' in want2[-1]
        assert listing(srv) == want2
        restart(srv)
        assert listing(srv) == want2
    finally:
        srv.close()


_KILLED_INDEXER = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.imap import fetch
from mailstack.store.maildir import MaildirStore
async def main():
    store = MaildirStore(Path({root!r}), EventBus(), GroupSync())
    box = await store.open("alice@example.test", "INBOX")
    entries = {{}}
    for m in box.messages:
        entries[m.uid] = fetch.header_entry(await box.read(m.uid))
    uids = sorted(entries)
    print("ready", flush=True)
    while True:  # appends, and every few rounds a compaction (an atomic rewrite)
        for i in range(0, len(uids), 7):
            await box.cache_put({{u: entries[u] for u in uids[i:i + 7]}})
asyncio.run(main())
"""


def test_kill_9_while_the_index_is_written(tmp_path):
    srv = InProcessIMAP(tmp_path)
    try:
        box = maildir(srv)
        datas = messages() * 4
        place(box, datas)
        want = reference(srv)
        (box / idxmod.NAME).unlink()
        script = _KILLED_INDEXER.format(tests=os.path.dirname(__file__), root=str(srv.cfg.mail_dir))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        for _ in range(3):
            proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE)
            try:
                assert proc.stdout.readline() == b"ready\n"
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # somewhere in the middle of its writing
                    if (box / idxmod.NAME).exists() and (box / idxmod.NAME).stat().st_size > 20000:
                        break
                    time.sleep(0.01)
                time.sleep(random.random() * 0.2)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            restart(srv)
            assert listing(srv) == want
    finally:
        srv.close()


def test_index_load_is_lazy_and_merges_delivered_lines(tmp_path):
    async def go():
        store = MaildirStore(tmp_path / "mail", EventBus(), GroupSync())
        datas = messages()[:6]
        for i, d in enumerate(datas):
            await store.deliver("alice@example.test", d, f"D{i}")
        await store.group_writer.settled()
        box = await store.open("alice@example.test", "INBOX")
        await box.cache_put({1: {**(await box.cache_get(1)), "pop3": {"size": 1}}})  # a UID line after its = line
        await box.close()
        fresh = MaildirStore(tmp_path / "mail", EventBus(), GroupSync())
        box = await fresh.open("alice@example.test", "INBOX")
        raw = await box.cache_get_many([m.uid for m in box.messages], raw=True)
        assert all(isinstance(v, bytes) for v in raw.values()) and len(raw) == 6  # nothing parsed yet
        for m, d in zip(box.messages, datas):
            assert fetch.cached_envelope(raw[m.uid]) == b"ENVELOPE " + fetch.envelope(fetch.parse(d))
            entry = await box.cache_get(m.uid)
            assert entry["env"] == fetch.cache_entry(d)["env"]
        assert (await box.cache_get(1))["pop3"] == {"size": 1}
        await box.close()
    asyncio.run(go())


# --- the shortcuts against what they replace -----------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"a", b" ", b":"]), max_size=40).map(b"".join),
       st.integers(0, 12), st.integers(0, 45))
def test_blank_line_finder_is_the_regex(data, start, end):
    m = fetch._BLANK.search(data, start, end)
    assert fetch._blank(data, start, end) == (None if m is None else (m.start(), m.end()))


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"B", b" ", b"\t", b":", b"\x0b", b"\xc3\xa9",
                                 b"Subject", b"\r\n\t"]), max_size=60).map(b"".join))
def test_header_split_without_folding_is_the_regex_split(block):
    assert fetch.parse_headers(block) == fetch._parse_headers(block)


def test_header_split_keeps_at_most_the_fields_the_regex_split_keeps():
    for block in (b"a:\n" * 9999 + b"a:", b"a:\n" * 10000 + b"a:", b"a:\n" * 12000):
        assert fetch.parse_headers(block) == fetch._parse_headers(block)


def _slow_sent(value: bytes) -> int | None:
    try:
        dt = email.utils.parsedate_to_datetime(fetch.unfold(value).decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return dt.year * 10000 + dt.month * 100 + dt.day


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["", "Tue, ", "tue,", "Mon,  ", " "]), st.integers(0, 35),
       st.sampled_from(["Jan", "feb", "MAR", "Dec", "Xyz"]), st.integers(900, 10000), st.integers(0, 30),
       st.integers(0, 70), st.integers(0, 70), st.sampled_from("+-"), st.integers(0, 30), st.integers(0, 70),
       st.sampled_from(["", " ", "\t"]))
def test_plain_date_shortcut_is_the_email_package(dow, d, mon, y, hh, mm, ss, sign, th, tm, tail):
    value = f"{dow}{d} {mon} {y} {hh:02d}:{mm:02d}:{ss:02d} {sign}{th:02d}{tm:02d}{tail}".encode()
    assert fetch._sent_date(fetch.Part(0, 0, 0, [(b"date", value)])) == _slow_sent(value)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3 * HEADER_PEEK), st.booleans(), st.integers(0, 5000))
def test_header_read_holds_what_the_whole_read_held(tmp_path_factory, head, blank, body):
    data = b"X: " + b"h" * head + (b"\r\n\r\n" if blank else b"\r\n") + b"b" * body
    path = tmp_path_factory.mktemp("h") / "m"
    path.write_bytes(data)
    got = read_header(str(path))
    hend, bstart = fetch.split_header(data)
    assert data.startswith(got) and fetch.split_header(got)[0] == hend
    if bstart == len(data):  # no header end: the whole file, as before
        assert got == data


def test_envelope_from_a_line_equals_the_parsed_entry():
    for d in messages():
        entry = fetch.header_entry(d)
        for value in (entry, {"pop3": {"size": 3}, **entry}):  # whatever the order of the keys
            line = idxmod.serialize({1: value})[1]
            assert line.startswith(b'{"v":%d,"env":"' % fetch.CACHE_VERSION)
            assert fetch.cached_envelope(line) == fetch.cached_envelope(entry) == b"ENVELOPE " + \
                fetch.envelope(fetch.parse(d))
    assert fetch.cached_envelope(b'{"v":1,"env":"(old)"}') is None  # another version: recomputed
    assert fetch.cached_envelope(b'{"v":5,"env":"(cut') is None


def test_sessions_share_a_view_and_each_still_sees_its_own_changes(tmp_path):
    """A second session at the same state shares the first one's MessageInfos (no 100,000
    new objects per SELECT); a flag change replaces an object, never changes a shared one,
    so each session is told of it exactly once and only at its own sync."""
    srv = InProcessIMAP(tmp_path)
    try:
        for i in range(5):
            srv.deliver(ALICE, b"From: a@b.test\r\nSubject: s%d\r\n\r\nx\r\n" % i)
        a, b = Raw(srv), Raw(srv)
        a.cmd("SELECT INBOX")
        b.cmd("SELECT INBOX")  # shares a's view of the state
        store = srv.services.store
        assert [m.flags for m in srv.call(_messages(store))] == [frozenset()] * 5
        lines, _ = a.cmd("STORE 2 +FLAGS (\\Flagged)")
        assert [_no_recent(x) for x in lines] == [b"* 2 FETCH (FLAGS (\\Flagged))"]
        lines, _ = b.cmd("NOOP")
        assert b"* 2 FETCH (FLAGS (\\Flagged))" in [_no_recent(x) for x in lines]
        lines, _ = b.cmd("NOOP")
        assert not any(b"FETCH" in x for x in lines)  # told once
        lines, _ = a.cmd("NOOP")
        assert not any(b"FETCH" in x for x in lines)  # a did it itself: not told again
        c = Raw(srv)
        c.cmd("SELECT INBOX")
        lines, _ = c.cmd("FETCH 1:* (FLAGS)")
        assert [_no_recent(x).split(b"FLAGS ")[1] for x in lines] == [b"())", b"(\\Flagged))", b"())", b"())",
                                                                     b"())"]
        for r in (a, b, c):
            lines, _ = r.cmd("FETCH 2 (FLAGS)")
            assert [_no_recent(x) for x in lines] == [b"* 2 FETCH (FLAGS (\\Flagged))"]
        lines, _ = c.cmd("STORE 1:5 +FLAGS (\\Seen)")
        assert len(lines) == 5
        lines, _ = a.cmd("NOOP")
        assert sum(1 for x in lines if b"\\Seen" in x) == 5
        for r in (a, b, c):
            r.sock.close()
    finally:
        srv.close()


async def _messages(store):
    box = await store.open("alice@example.test", "INBOX")
    try:
        return list(box.messages)
    finally:
        await box.close()
