"""FETCH of whole bodies (issue 16, session 4): files read with one os.read each (size from
the index), read and rendered in one worker call, batches cut by bytes, small responses
joined into big writes.  Every answer must be byte for byte what the message files hold and
what a FETCH of one message at a time answers, however the batches fall."""
from __future__ import annotations

import re

import pytest

from imap_fixtures import InProcessIMAP
from mailstack.imap import fetching
from mailstack.imap.fetching import BIG_CHUNK, _blocks, _Stream, read_whole
from test_imap_session import Raw

BIG = b"Subject: big\r\n\r\n" + b"".join(b"%06d a line of a message over BIG_CHUNK\r\n" % i for i in range(2000))
MESSAGES = [b"Subject: %d\r\n\r\n" % i + b"body line\r\n" * (i * 7 % 50) for i in range(30)] + [
    b"Subject: bare lf\n\nbody\n.dot\n",
    b"",  # an empty file
    b"no header end, no newline",
    BIG,  # a literal over BIG_CHUNK: sent apart, never copied into a block
    b"Subject: \xe9 8-bit\r\n\r\n\x00\x01 binary-ish\r\n",
]


def place(srv, datas: list[bytes], wrong: dict[int, int] | None = None) -> None:
    """Files put in new/ behind the server's back; `wrong` gives some a name whose S= is not
    the file's size (a person's mv, a broken deliverer): the read must not trust it."""
    box = srv.cfg.mail_dir / "example.test" / "alice"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(datas):
        size = (wrong or {}).get(n, len(data))
        (box / "new" / f"{1700000000 + n}.M{n}P1Q{n}.behind,S={size}").write_bytes(data)


def bodies(lines: list[bytes]) -> dict[int, bytes]:
    out = {}
    for line in lines:
        m = re.match(rb"\* (\d+) FETCH \(.*BODY\[\] \{(\d+)\}\r\n", line, re.S)
        assert m, line[:80]
        out[int(m[1])] = line[m.end():m.end() + int(m[2])]
    return out


@pytest.fixture(params=["uvloop", "asyncio"])  # what `mailstack serve` runs on, and the fallback
def srv(tmp_path, request):
    # plaintext login allowed: the write path differs on a plain TCP transport (writes_vectors)
    server = InProcessIMAP(tmp_path, loop=request.param, imap_overrides={"allow_plaintext_auth": True})
    yield server
    server.close()


@pytest.mark.parametrize("batch", [None, 1, 5000, 100_000])
def test_whole_bodies_are_exact_however_the_batches_fall(srv, monkeypatch, batch):
    if batch is not None:  # one message a batch, a few, and cuts that fall anywhere
        monkeypatch.setattr(fetching, "DATA_BATCH", batch)
    wrong = {3: 1, 7: 100_000, 31: 5}  # S= smaller and larger than the file (31: the empty one)
    place(srv, MESSAGES, wrong)
    r = Raw(srv)
    try:
        r.ok("SELECT INBOX")
        n = len(MESSAGES)
        whole = r.ok(f"FETCH 1:{n} (UID BODY.PEEK[] RFC822.SIZE)")
        assert len(whole) == n
        assert bodies(whole) == {i + 1: data for i, data in enumerate(MESSAGES)}
        one_by_one = [line for i in range(1, n + 1) for line in r.ok(f"FETCH {i} (UID BODY.PEEK[] RFC822.SIZE)")]
        assert whole == one_by_one
        # a spread-out set in another order, with other items around the literals
        seqs = [33, 2, 34, 7, 1, 31, 4, 32]
        spread = r.ok("FETCH %s (FLAGS BODY.PEEK[] BODY.PEEK[TEXT] RFC822.HEADER UID)" % ",".join(map(str, seqs)))
        singles = [line for i in sorted(seqs)
                   for line in r.ok(f"FETCH {i} (FLAGS BODY.PEEK[] BODY.PEEK[TEXT] RFC822.HEADER UID)")]
        assert spread == singles
    finally:
        r.close()


def test_a_file_gone_before_the_read_is_still_answered(srv):
    """The worker's read fails (the file was renamed): the store is asked on the loop, then
    the batch is rendered in a second call, as before the read and the render were one."""
    place(srv, MESSAGES[:5])
    r = Raw(srv)
    try:
        r.ok("SELECT INBOX")
        r.ok("FETCH 1:5 UID")
        box = srv.cfg.mail_dir / "example.test" / "alice"
        moved = sorted((box / "new").iterdir()) + sorted((box / "cur").iterdir())
        victim = [p for p in moved if ".M2P1Q2." in p.name][0]
        victim.rename(box / "cur" / (victim.name.split(":")[0] + ":2,F"))  # flagged by someone else
        assert bodies(r.ok("FETCH 1:5 BODY.PEEK[]")) == {i + 1: d for i, d in enumerate(MESSAGES[:5])}
    finally:
        r.close()


def test_read_whole_does_not_trust_the_size_it_is_given(tmp_path):
    for data in (b"", b"x", b"0123456789" * 1000, bytes(range(256)) * 5000):
        p = tmp_path / "m"
        p.write_bytes(data)
        for hint in {0, 1, len(data) - 1, len(data), len(data) + 1, 3 * len(data) + 10}:
            if hint >= 0:
                assert read_whole(str(p), hint) == data, (len(data), hint)


def test_blocks_keep_every_byte_in_order():
    small = [b"* %d FETCH (UID %d)\r\n" % (i, i) for i in range(20000)]  # over BLOCK in all
    big = b"b" * BIG_CHUNK
    stream = _Stream(b"BODY[]", 7, 10)
    rendered = small[:5] + [[b"* 6 FETCH (BODY[] {%d}\r\n" % len(big), big, b")\r\n"]] + \
        [[b"* 7 FETCH (BODY[] {10}\r\n", stream, b")\r\n"]] + small[5:]
    out, gone = _blocks(rendered, True)
    assert gone is True
    assert any(x is big for x in out) and any(x is stream for x in out)  # not copied
    assert all(isinstance(x, _Stream) or x is big or len(x) < 2 * fetching.BLOCK for x in out)
    flat = [x for item in rendered for x in ([item] if isinstance(item, bytes) else item)]
    assert [x for x in out if isinstance(x, _Stream)] == [stream]
    assert b"".join(x for x in out if not isinstance(x, _Stream)) == \
        b"".join(x for x in flat if not isinstance(x, _Stream))
    i = out.index(stream)
    assert b"".join(out[:i]).endswith(b"* 7 FETCH (BODY[] {10}\r\n")
    assert len(out) < 10  # 20,000 responses in a handful of writes


@pytest.mark.parametrize("tls", [False, True])
def test_many_small_bodies_go_out_as_unjoined_vectors_on_uvloop_and_exact(srv, monkeypatch, tls):
    """Session 6: on uvloop's plain TCP transport a batch's pieces go to writelines (one
    writev) as _Vectors, not joined; on asyncio and under TLS they are joined in the worker
    as before.  Either way the bytes are the files', in order, and what single FETCHes say."""
    datas = [b"Subject: %d\r\n\r\n" % i + b"".join(b".%d dotted and plain line %d\r\n" % (j, i) for j in range(60))
             for i in range(120)]  # ~3 KB each, ~400 KB in all: several BLOCKs of small literals
    place(srv, datas)
    seen: list = []
    real_blocks = fetching._blocks

    def spy(rendered, gone, vectors=False):
        out = real_blocks(rendered, gone, vectors)
        seen.append((vectors, [type(x).__name__ for x in out[0]]))
        return out
    monkeypatch.setattr(fetching, "_blocks", spy)
    r = Raw(srv, tls=tls)
    try:
        r.ok("SELECT INBOX")
        whole = r.ok(f"FETCH 1:{len(datas)} (UID BODY.PEEK[])")
        assert bodies(whole) == {i + 1: d for i, d in enumerate(datas)}
        assert whole == [line for i in range(1, len(datas) + 1) for line in r.ok(f"FETCH {i} (UID BODY.PEEK[])")]
    finally:
        r.close()
    vectors, kinds = seen[0]
    assert vectors is (type(srv.loop).__module__ == "uvloop" and not tls)
    assert ("_Vector" in kinds) is vectors and kinds.count("_Vector") >= (1 if vectors else 0)


def test_writes_vectors_only_for_a_plain_stream_writer():
    class FakeTransport:
        pass
    class W:
        transport = FakeTransport()
    assert not fetching.writes_vectors(W())  # COMPRESS's DeflateWriter is not a StreamWriter


@pytest.mark.parametrize("command", ["FETCH 1:* BODY.PEEK[]", "UID FETCH 1:* BODY.PEEK[]", "FETCH 1:* RFC822",
                                     "FETCH 1:* (BODY.PEEK[] UID)", "FETCH 1:* BODY.PEEK[]<5.20>",
                                     "UID FETCH 1:* (BODY.PEEK[] BODY.PEEK[])"])
def test_the_one_format_for_whole_bodies_says_what_the_general_loop_says(srv, monkeypatch, command):
    """_whole_body_head's responses (BODY[] / RFC822 alone, with UID first) byte for byte
    those of the item-by-item loop, which answers the same command with the format off."""
    place(srv, MESSAGES)
    r = Raw(srv)
    try:
        r.ok("SELECT INBOX")
        if "RFC822" in command:  # sets \Seen: both answers must start from the same flags
            r.ok("EXAMINE INBOX")
        fast = r.ok(command)
        monkeypatch.setattr(fetching, "_whole_body_head", lambda atts: None)
        general = r.ok(command)
    finally:
        r.close()
    assert fast == general and len(fast) == len(MESSAGES)
