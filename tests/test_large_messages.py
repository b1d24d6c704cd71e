"""Big messages are streamed, never held whole: IMAP FETCH (whole, partial, TEXT, HEADER),
POP3 RETR/TOP and the outbound SMTP client, against the real server process.

Memory is the server's peak RSS (VmHWM, reset through /proc/PID/clear_refs before each
workload) minus its RSS before: five clients fetching an 8 MB message at once would cost
at least 5 x 8 MB if each were read whole. Content is checked byte for byte (sha256).
The chunk-boundary cases of the streaming encoders are fuzzed with hypothesis.
"""
from __future__ import annotations

import hashlib
import random
import re
import smtplib
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.directory import Directory
from mailstack.pop3.parser import MessageEncoder, TopCutter, top_extent
from mailstack.smtp.clientproto import DataEncoder, dot_stuff, normalize_crlf, prepare, prepare_file
from tests.harness import MailServer, wait_for
from tests.smtpsink import Sink, free_port_on

USER, PASSWORD = "big@example.test", "big-pw"
POP_USERS = [f"pop{i}@example.test" for i in range(5)]  # a POP3 session locks its maildrop
SIZE = 8 * 1024 * 1024
CLIENTS = 5
RSS_GROWTH_MAX_MIB = 24  # reading whole would need >= 40 MiB (5 x 8 MiB) before any copy
MX = "127.0.0.2"


def big_message(size: int, seed: int = 7) -> bytes:
    """CRLF text of about `size` bytes with many lines that start with a dot (dot-stuffing
    at every kind of chunk boundary) and an 8-bit byte or two."""
    rnd = random.Random(seed)
    head = (b"From: Big <big@example.test>\r\nTo: big@example.test\r\nSubject: a big one\r\n"
            b"Message-ID: <big@example.test>\r\n\r\n")
    lines = [head]
    total = len(head)
    alphabet = bytes(b"abcdefgh .\xe9"[i % 11] for i in range(256))  # byte -> one of 11 characters
    while total < size:
        n = rnd.randrange(0, 120)
        line = (b"." if rnd.random() < 0.2 else b"") + rnd.randbytes(n).translate(alphabet) + b"\r\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Peak:
    """Server RSS before a workload and its peak during it (VmHWM after a reset)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> "Peak":
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.before = status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.growth_mib = (status_kib(self.pid, "VmHWM") - self.before) / 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("large")
    port = free_port_on(MX)
    sink = Sink(MX, port, size_limit=64 << 20).start()
    srv = MailServer(tmp, overrides={
        "delivery": {"relayhost": f"[{MX}]:{port}", "connect_timeout": 3.0, "command_timeout": 20.0},
        "smtp": {"trusted_networks": ["127.0.0.1/32"]},
        "senderauth": {"enabled": False},
        "imap": {"allow_plaintext_auth": True},
        "pop3": {"allow_plaintext_auth": True},
    }, listeners=("smtp", "imap", "pop3"))
    # The accounts through the library, not six `mailstack user add` processes (seconds each
    # on a busy machine).
    srv.data_dir.mkdir(parents=True, exist_ok=True)
    directory = Directory(srv.data_dir)
    directory.add_domain("example.test")
    message = big_message(SIZE)
    for i, user in enumerate([USER, *POP_USERS]):
        directory.add_user(user, PASSWORD)
        cur = srv.maildir(user) / "cur"
        cur.mkdir(parents=True, exist_ok=True)
        if i == 0:
            first = cur / "1700000000.M1P1.big:2,"
            first.write_bytes(message)
        else:
            (cur / first.name).hardlink_to(first)
    directory.save()
    srv.start()
    # The first login of each account verifies its argon2 hash (64 MiB of argon2 memory,
    # returned at once) and loads modules: not what is measured here.
    imap_fetch(srv.ports["imap"], "UID")
    for user in POP_USERS:
        pop3(srv.ports["pop3"], "STAT", user)
    yield srv, sink, message
    srv.stop()
    sink.stop()


# --- minimal raw clients: hash literals as they arrive, keep nothing ----------------------
class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def literal(self, n: int) -> str:
        h = hashlib.sha256()
        while n:
            if not self.buf:
                self._fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            h.update(piece)
            n -= len(piece)
        return h.hexdigest()

    def until_terminator(self) -> str:
        """A POP3 multi-line answer's body (still dot-stuffed), hashed; the ".CRLF" eaten."""
        h = hashlib.sha256()
        while True:
            i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                h.update(self.buf[:i + 2])
                self.buf = self.buf[i + 5:]
                return h.hexdigest()
            keep = 4  # the terminator may straddle two reads
            h.update(self.buf[:-keep] if len(self.buf) > keep else b"")
            self.buf = self.buf[-keep:] if len(self.buf) > keep else self.buf
            self._fill()

    def close(self) -> None:
        self.sock.close()


def imap_fetch(port: int, items: str) -> dict[str, str]:
    """{item label: sha256 of its literal} of `FETCH 1 (items)`."""
    c = Raw(port)
    try:
        c.line()
        c.sock.sendall(f'a LOGIN "{USER}" "{PASSWORD}"\r\nb EXAMINE INBOX\r\nc FETCH 1 ({items})\r\n'.encode())
        got: dict[str, str] = {}
        while True:
            line = c.line()
            while True:
                m = re.search(rb"(\S+) \{(\d+)\}\r\n$", line)
                if not m:
                    break
                label = m.group(1).lstrip(b"(").decode()
                got[label] = c.literal(int(m.group(2)))
                line = c.line()
            if line.startswith(b"c "):
                assert line.startswith(b"c OK"), line
                return got
            assert not line.startswith((b"a NO", b"a BAD", b"b NO", b"b BAD")), line
    finally:
        c.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def in_threads(n: int, fn) -> list:
    results: list = [None] * n
    errors: list = []

    def run(i):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_imap_fetch_whole_by_five_clients_at_once_is_bounded_and_exact(world):
    srv, _, message = world
    with Peak(srv.proc.pid) as peak:
        got = in_threads(CLIENTS, lambda: imap_fetch(srv.ports["imap"], "BODY.PEEK[]"))
    assert all(g == {"BODY[]": sha(message)} for g in got)
    assert peak.growth_mib < RSS_GROWTH_MAX_MIB, f"server RSS grew {peak.growth_mib:.1f} MiB"


def test_imap_partial_text_header_and_rfc822_of_a_big_message(world):
    srv, _, message = world
    bstart = message.index(b"\r\n\r\n") + 4
    off, length = 1000, 5_000_003
    with Peak(srv.proc.pid) as peak:
        got = imap_fetch(srv.ports["imap"], f"BODY.PEEK[]<{off}.{length}> BODY.PEEK[TEXT] "
                                            f"BODY.PEEK[TEXT]<{SIZE}.10> BODY.PEEK[HEADER] RFC822.TEXT")
        got |= imap_fetch(srv.ports["imap"], "RFC822 BODY.PEEK[HEADER.FIELDS (Subject)]")
    assert got[f"BODY[]<{off}>"] == sha(message[off:off + length])
    assert got["BODY[TEXT]"] == got["RFC822.TEXT"] == sha(message[bstart:])
    assert got[f"BODY[TEXT]<{SIZE}>"] == sha(message[bstart + SIZE:bstart + SIZE + 10])
    assert got["BODY[HEADER]"] == sha(message[:bstart])
    assert got["RFC822"] == sha(message)
    assert got["Subject)]"] == sha(b"Subject: a big one\r\n\r\n")
    assert peak.growth_mib < RSS_GROWTH_MAX_MIB, f"server RSS grew {peak.growth_mib:.1f} MiB"


def pop3(port: int, command: str, user: str = POP_USERS[0]) -> str:
    c = Raw(port)
    try:
        c.line()
        c.sock.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\n{command}\r\n".encode())
        for _ in range(2):
            assert c.line().startswith(b"+OK")
        assert c.line().startswith(b"+OK")
        digest = "" if command == "STAT" else c.until_terminator()
        c.sock.sendall(b"QUIT\r\n")
        return digest
    finally:
        c.close()


def stuffed(text: bytes) -> bytes:
    """RFC 1939 byte-stuffing of CRLF text, done whole (the reference)."""
    return (b"." if text.startswith(b".") else b"") + text.replace(b"\r\n.", b"\r\n..")


def test_pop3_retr_by_five_clients_at_once_is_bounded_and_exact(world):
    srv, _, message = world
    with Peak(srv.proc.pid) as peak:
        users = iter(POP_USERS)
        got = in_threads(CLIENTS, lambda: pop3(srv.ports["pop3"], "RETR 1", next(users)))
    assert got == [sha(stuffed(message))] * CLIENTS
    assert peak.growth_mib < RSS_GROWTH_MAX_MIB, f"server RSS grew {peak.growth_mib:.1f} MiB"


def test_pop3_top_of_a_big_message_streams(world):
    srv, _, message = world
    with Peak(srv.proc.pid) as peak:
        all_lines = pop3(srv.ports["pop3"], "TOP 1 10000000")
        some = pop3(srv.ports["pop3"], "TOP 1 40000")
    assert all_lines == sha(stuffed(message))
    assert some == sha(stuffed(message[:top_extent(message, 40000, True)]))
    assert peak.growth_mib < RSS_GROWTH_MAX_MIB / 2, f"server RSS grew {peak.growth_mib:.1f} MiB"


def test_outbound_big_message_arrives_byte_exact(world):
    srv, sink, _ = world
    message = big_message(3 * 1024 * 1024, seed=11).replace(b"<big@", b"<out@")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=60) as s:
        s.sendmail("big@example.test", ["far@remote.test"], message)
    got = wait_for(lambda: next((m for m in sink.messages if b"<out@example.test>" in m.content), None), 60,
                   what="the big message at the relay")
    assert got.rcpt_tos == ["far@remote.test"]
    # the server prepends its Received: header; everything after it is the message as sent
    assert got.content.endswith(message)
    assert sha(got.content[-len(message):]) == sha(message)


# --- the streaming encoders, fuzzed at every chunk boundary -------------------------------
TEXT = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\xe9", b"x: y"]),
                max_size=40).map(b"".join)
CUTS = st.lists(st.integers(1, 7), min_size=1, max_size=10)


def pieces(text: bytes, cuts: list[int]):
    i = k = 0
    while i < len(text):
        n = cuts[k % len(cuts)]
        yield text[i:i + n]
        i += n
        k += 1


@settings(max_examples=400, deadline=None)
@given(TEXT, CUTS)
def test_data_encoder_matches_whole_dot_stuffing_however_cut(text, cuts):
    enc = DataEncoder()
    out = b"".join(enc.feed(p) for p in pieces(text, cuts)) + enc.end()
    assert out == dot_stuff(normalize_crlf(text))


@settings(max_examples=400, deadline=None)
@given(TEXT, CUTS, st.integers(0, 5))
def test_top_cutter_matches_top_extent_however_cut(text, cuts, lines):
    cutter, enc = TopCutter(lines), MessageEncoder()
    out = b""
    for p in pieces(text, cuts):
        out += enc.feed(cutter.feed(p))
        if cutter.done:
            break
    out += enc.end()
    whole = MessageEncoder()
    assert out == whole.feed(text[:top_extent(text, lines, True)]) + whole.end()


@settings(max_examples=100, deadline=None)
@given(TEXT)
def test_prepare_file_figures_match_prepare(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("pf") / "q"
    path.write_bytes(b"ENVELOPE\n" + text + b"trailer")
    w, p = prepare_file(str(path), 9, len(text)), prepare(normalize_crlf(text))
    assert (w.size, w.eightbit, w.header_utf8) == (p.size, p.eightbit, p.header_utf8)
    assert w.source == (str(path), 9, len(text)) and w.body == b""
