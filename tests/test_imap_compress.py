"""COMPRESS=DEFLATE (RFC 4978) over real sockets: a raw client doing its own zlib (an
implementation independent of the server's), Debian's mbsync (which speaks COMPRESS),
over implicit TLS and over a plain connection."""
from __future__ import annotations

import asyncio
import gc
import logging
import os

import socket
import threading
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings, strategies as st

import sync_clients
from harness import wait_for
from imap_fixtures import InProcessIMAP
from test_imap_session import Raw

ALICE, PW = "alice@example.test", "secret"


def msg(n: int, body: bytes = b"") -> bytes:
    return (b"From: Al Sender <al@x.org>\r\nTo: Alice <alice@example.test>\r\nSubject: hello number %d\r\n"
            b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m%d@x.org>\r\n\r\nbody text %d\r\n"
            % (n, n, n)) + body


@pytest.fixture
def srv(tmp_path):
    s = InProcessIMAP(tmp_path, imap_overrides={"allow_plaintext_auth": True})
    yield s
    s.close()


class ZRaw(Raw):
    """The line-level IMAP client of test_imap_session, able to switch on COMPRESS=DEFLATE
    (zlib, wbits=-15)."""

    def __init__(self, srv, tls: bool = True, login: bool = True) -> None:
        self.deflate = self.inflate = None
        self.wire_in = 0  # bytes received from the socket since compression began (or ever)
        super().__init__(srv, tls=tls, login=login, timeout=15)

    def compress(self) -> None:
        lines, tagged = self.cmd("COMPRESS DEFLATE")
        assert b" OK " in tagged and not self.buf, (lines, tagged)
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        self.wire_in = 0

    def recv(self) -> bytes:
        data = self.sock.recv(65536)
        self.wire_in += len(data)
        if not data:
            raise EOFError(self.buf)
        return self.inflate.decompress(data) if self.inflate else data

    def send(self, data: bytes) -> None:
        if self.deflate:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        out = self.buf
        try:
            while True:
                out += self.recv()
        except (EOFError, ConnectionError):
            return out


def test_offered_after_login_only_and_refused_twice(srv):
    c = ZRaw(srv, login=False)
    assert b"COMPRESS=DEFLATE" not in c.greeting
    _, tagged = c.cmd("COMPRESS DEFLATE")
    assert b"BAD" in tagged  # as Dovecot: after authentication
    c.ok(f"LOGIN {ALICE} {PW}")
    caps = c.ok("CAPABILITY")[0]
    assert b" COMPRESS=DEFLATE" in caps
    _, tagged = c.cmd("COMPRESS GZIP")
    assert tagged.startswith(b"t") and b" NO " in tagged
    lines, tagged = c.cmd("COMPRESS DEFLATE")
    assert tagged.endswith(b"OK DEFLATE active") and not c.buf
    c.deflate, c.inflate = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    assert c.ok("NOOP") == []
    # the second COMPRESS is answered, compressed, with NO [COMPRESSIONACTIVE]; the session goes on
    _, tagged = c.cmd("COMPRESS DEFLATE")
    assert b"NO [COMPRESSIONACTIVE]" in tagged
    c.ok("SELECT INBOX")
    c.send(b"z LOGOUT\r\n")
    assert c.until(b"z")[1] == b"z OK LOGOUT completed"
    c.close()


def test_plain_connection_and_no_starttls_after_compress(srv, caplog):
    """Independent of TLS: on port 143 (where login is allowed); STARTTLS after COMPRESS is refused."""
    caplog.set_level(logging.INFO, logger="mailstack.imap")
    srv.deliver(ALICE, msg(1))
    c = ZRaw(srv, tls=False)
    c.compress()
    _, tagged = c.cmd("STARTTLS")
    assert b" BAD " in tagged
    lines = c.ok("SELECT INBOX")
    assert b"* 1 EXISTS" in lines
    lines = c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: hello number 1" in lines[0]
    c.close()
    assert any(r.getMessage() == "IMAP COMPRESS=DEFLATE on" for r in caplog.records)


def test_pipelined_data_after_compress_is_refused(srv):
    c = ZRaw(srv)
    c.sock.sendall(b"a COMPRESS DEFLATE\r\n" + zlib.compress(b"b NOOP\r\n")[:-4])
    out = c.rest()
    assert b"a BAD Pipelined data after COMPRESS" in out and b"a OK" not in out


def test_idle_push_arrives_through_compression(srv):
    c = ZRaw(srv)
    c.compress()
    c.ok("SELECT INBOX")
    c.send(b"i IDLE\r\n")
    assert c.line() == b"+ idling"
    srv.deliver(ALICE, msg(1))
    assert c.line() == b"* 1 EXISTS"  # the socket timeout (15 s) bounds the wait
    assert c.line() == b"* 1 RECENT"
    c.send(b"DONE\r\n")
    assert c.until(b"i")[1] == b"i OK IDLE terminated"
    c.close()


def test_big_fetch_streamed_and_big_append_through_compression(srv):
    rnd = os.urandom(1 << 20).hex().encode()  # 2 MiB of hex text: compressible, not trivially
    body = b"".join(rnd[i:i + 76] + b"\r\n" for i in range(0, len(rnd), 76))
    big = msg(1, body + body + body[: (5 << 20) - 2 * len(body)])
    assert len(big) > 5_000_000
    srv.deliver(ALICE, big)
    c = ZRaw(srv)
    c.compress()
    c.ok("SELECT INBOX")
    lines = c.ok("FETCH 1 BODY[]")
    assert lines[0].startswith(b"* 1 FETCH (BODY[] {%d}\r\n" % len(big))
    assert lines[0].endswith(big + b" FLAGS (\\Seen \\Recent))")
    assert c.wire_in < len(big) * 0.7  # hex compresses to about half
    # APPEND of a big literal (synchronising: "+" comes back compressed)
    up = msg(2, body)
    c.n += 1
    c.send(b"t%d APPEND INBOX {%d}\r\n" % (c.n, len(up)))
    assert c.line().startswith(b"+ ")
    c.send(up + b"\r\n")
    assert b"OK [APPENDUID" in c.until(b"t%d" % c.n)[1]
    lines = c.ok("FETCH 2 BODY.PEEK[]")
    assert lines[-1].endswith(up + b")")
    c.close()


def _bomb(size: int) -> bytes:
    """`size` bytes of one endless command line: a block of 1 MiB of "A" compressed with a
    full flush (no back-references across it) is repeated, so building it costs nothing."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = z.compress(b"t1 NOOP ") + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(b"A" * (1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)
    return head + block * (size >> 20)


def test_decompression_bomb_is_answered_with_bye_in_bounded_memory(srv):
    bomb = _bomb(1 << 30)  # 1 GiB of one command line in about 1 MB
    assert len(bomb) < 1_100_000
    c = ZRaw(srv, tls=False)  # plain: this test sends and reads at once from two threads
    c.compress()
    gc.collect()
    tracemalloc.start()
    try:
        def send():
            try:
                c.sock.sendall(bomb)
            except OSError:  # the server hangs up long before the end
                pass
        sender = threading.Thread(target=send)
        sender.start()
        out = c.rest()
        sender.join(15)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert b"* BYE [TOOBIG] Compressed command line too long" in out
    assert peak < 4 << 20, peak  # the whole process (server and this client): far below 1 GiB
    wait_for(lambda: srv.session_count() == 0, what="session closed")


def test_corrupt_stream_is_answered_with_bye(srv):
    c = ZRaw(srv)
    c.compress()
    c.sock.sendall(b"\xff" * 64)
    assert b"* BYE [PARSE] Corrupt compressed data" in c.rest()


def test_shutdown_bye_is_compressed(tmp_path):
    s = InProcessIMAP(tmp_path)
    c = ZRaw(s)
    c.compress()
    c.ok("NOOP")
    s.close()
    assert b"* BYE Server shutting down" in c.rest()


def test_many_sessions_memory_and_envelope_bytes_on_the_wire(srv):
    """The zlib state of real compressed sessions in the server (tracemalloc attributes
    zlib's allocations to the line of compress.py that made them), and what COMPRESS saves
    on FETCH 1:* ENVELOPE."""
    for i in range(200):
        srv.deliver(ALICE, msg(i))
    plain = ZRaw(srv)
    plain.ok("SELECT INBOX")
    plain.wire_in = 0
    lines = plain.ok("FETCH 1:* ENVELOPE")
    assert len(lines) == 200
    plain_bytes = plain.wire_in
    plain.close()
    n = 50
    sessions = [ZRaw(srv) for _ in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        for c in sessions:
            c.compress()
            c.ok("SELECT INBOX")  # both directions used: deflate allocates its window on first use
        z = sessions[0]
        z.wire_in = 0
        assert z.ok("FETCH 1:* ENVELOPE") == lines
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    server_zlib = sum(t.size for t in snapshot.filter_traces(
        [tracemalloc.Filter(True, "*/mailstack/imap/compress.py")]).traces)
    per_session = server_zlib / n
    print(f"\nFETCH 1:* ENVELOPE of 200 messages: {plain_bytes} bytes plain, {z.wire_in} compressed "
          f"({plain_bytes / z.wire_in:.1f}x); server zlib state {per_session / 1024:.0f} KiB/session ({n} sessions)")
    assert z.wire_in * 4 < plain_bytes
    assert 32 * 1024 < per_session < 160 * 1024  # zlib's defaults (Dovecot's) take ~300 KiB
    for c in sessions:
        c.close()
    wait_for(lambda: srv.session_count() == 0, what="sessions closed")


def test_mbsync_uses_compress(srv, tmp_path, caplog):
    """Debian's mbsync (isync 1.4) sends COMPRESS DEFLATE when offered: a real client's zlib."""
    caplog.set_level(logging.INFO, logger="mailstack.imap")
    for i in range(30):
        srv.deliver(ALICE, msg(i, b"line of body text\r\n" * 200))
    local, mbsync = sync_clients.mbsync(tmp_path, port=srv.ports["imaps"], user=ALICE, password=PW, cert=srv.cert,
                                        two_way=False, debug=True)
    output = mbsync()
    assert "COMPRESS DEFLATE" in output
    assert len(sync_clients.maildir_files(local / "INBOX")) == 30
    assert any(r.getMessage() == "IMAP COMPRESS=DEFLATE on" for r in caplog.records)


def _answers(c: ZRaw) -> list[bytes]:
    """The status word of each reply along one session (texts differ between servers)."""
    def status(text: str) -> bytes:
        tagged = c.cmd(text)[1].split(b" ")
        return b" ".join(tagged[1:3] if tagged[2].startswith(b"[") else tagged[1:2])
    out = [status("COMPRESS DEFLATE")]  # before login
    c.ok(f"LOGIN {ALICE} secret")
    out.append(status("COMPRESS GZIP"))
    c.compress()
    out += [status("NOOP"), status("COMPRESS DEFLATE"), status("STARTTLS")]
    lines = c.ok("LIST \"\" INBOX")
    assert lines[0].startswith(b"* LIST (") and lines[0].endswith(b" INBOX")
    c.sock.sendall(b"\xff" * 64)
    c.rest()
    return out


def test_same_answers_as_dovecot(srv):
    """Dovecot 2.3 with imap_zlib, the same raw client: the same answers (and the test's own
    zlib client proven against a second implementation)."""
    from dovecot_fixture import Dovecot  # noqa: PLC0415
    dc = Dovecot(extra="protocol imap {\n  mail_plugins = $mail_plugins imap_zlib\n}\n").start()
    try:
        dc.add_user(ALICE, "secret")
        c = ZRaw.__new__(ZRaw)
        c.sock = socket.create_connection(("127.0.0.1", dc.imap_port), timeout=15)
        c.buf, c.n, c.deflate, c.inflate, c.wire_in = b"", 0, None, None, 0
        c.greeting = c.line()
        theirs = _answers(c)
    finally:
        dc.cleanup()
    ours = _answers(ZRaw(srv, tls=False, login=False))
    assert ours == theirs == [b"BAD", b"NO", b"OK", b"NO [COMPRESSIONACTIVE]", b"BAD"]



@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=64), st.integers(1, 150_000)), min_size=1, max_size=4),
       st.lists(st.integers(1, 20_000), min_size=1, max_size=8), st.integers(512, 65536))
def test_inflate_reader_gives_back_the_stream_in_bounded_pieces(pieces, cuts, n):
    """Whatever the expansion and however the compressed bytes are cut: reads of at most n
    bytes that join up to exactly what was compressed."""
    from mailstack.imap.compress import InflateReader  # noqa: PLC0415
    plain = b"".join(p * (count // len(p) + 1) for p, count in pieces)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    wire = z.compress(plain) + z.flush(zlib.Z_SYNC_FLUSH)

    async def run() -> bytes:
        raw = asyncio.StreamReader()
        at = 0
        for cut in cuts:
            raw.feed_data(wire[at:at + cut])
            at += cut
        raw.feed_data(wire[at:])
        raw.feed_eof()
        reader = InflateReader(raw, None, lambda: False)
        out = bytearray()
        while chunk := await reader.read(n):
            assert len(chunk) <= n
            out += chunk
        return bytes(out)
    assert asyncio.run(run()) == plain
