"""POP3's fast paths (issue 16) against the plain definitions: sizes from Maildir names and
the index without reading files, sizes counted in bounded pieces, RETR's read-ahead of
small messages and its streaming of big ones from one descriptor.  Every RETR is compared
byte for byte with encode_message() of the stored file."""
from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import wait_for
from mailstack.pop3 import retrieve, sizes
from mailstack.pop3.parser import encode_message, message_size
from pop3_fixture import PASSWORD, USER, POP3Server

CRLF_DOTS = b"Subject: crlf\r\n\r\n" + b"".join(b".%05d line\r\n" % i for i in range(50))
LF_DOTS = b"Subject: bare lf\n\n" + b"".join(b".%05d line\n" % i for i in range(50))
MIXED = b"Subject: mixed\r\nX: lf\n\r\nbody\n.\r\n..\nend without newline\r"
# over two stream pieces once STREAM_CHUNK is made small below; dots at the piece borders
BIG_LF = b"Subject: big lf\n\n" + b"".join(b".%07d stored with LF only\n" % i for i in range(3000))
BIG_CRLF = b"Subject: big crlf\r\n\r\n" + b"".join(b".%07d stored with CRLF\r\n" % i for i in range(3000))
MESSAGES = [CRLF_DOTS, LF_DOTS, MIXED, BIG_LF, b".", b"x\r\n", BIG_CRLF, b"\r\n.\r\n"] + \
    [b"Subject: %d\n\n.%d\n" % (i, i) for i in range(40)]


@pytest.fixture
def srv(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieve, "STREAM_CHUNK", 4096 + 3)  # many pieces, cut anywhere
    server = POP3Server(tmp_path, pop3={"allow_plaintext_auth": True})
    yield server
    server.stop()


def place(srv, messages, named: str = "none") -> list[str]:
    """Write files into INBOX/cur behind the server's back, as another deliverer would:
    named "none" (no S=/W=), "sw" (Dovecot's ,S=<file size>,W=<CRLF size>)."""
    cur = srv.cfg.mail_dir / "example.test" / "alice" / "cur"
    cur.mkdir(parents=True, exist_ok=True)
    for sub in ("new", "tmp"):
        (cur.parent / sub).mkdir(exist_ok=True)
    names = []
    for i, msg in enumerate(messages):
        name = f"{1700000000 + i}.M{i}P9Q{i}.test"
        if named == "sw":
            name += f",S={len(msg)},W={message_size(msg)}"
        name += ":2,"
        (cur / name).write_bytes(msg)
        names.append(name)
    return names


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        assert self.line().startswith(b"+OK")

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def body(self) -> bytes:
        """The exact bytes of a multi-line answer up to its terminator (still stuffed)."""
        while True:
            if self.buf.startswith(b".\r\n"):
                self.buf = self.buf[3:]
                return b""
            i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                body, self.buf = self.buf[:i + 2], self.buf[i + 5:]
                return body
            self._fill()

    def send(self, *commands: str) -> None:
        self.sock.sendall(b"".join(c.encode() + b"\r\n" for c in commands))

    def login(self) -> None:
        self.send(f"USER {USER}", f"PASS {PASSWORD}")
        assert self.line().startswith(b"+OK") and self.line().startswith(b"+OK")


def plain(srv) -> Raw:
    return Raw(srv.ports["pop3"])


@pytest.mark.parametrize("named", ["none", "sw"])
def test_retr_in_order_pipelined_and_out_of_order_is_exact(srv, named):
    """Read-ahead (small ones, several at a time) and streaming (big ones, in pieces) send
    exactly encode_message() of each file; STAT/LIST sizes are the CRLF sizes, from the
    files' names or counted from files without them (bare LF, no final newline)."""
    place(srv, MESSAGES, named)
    c = plain(srv)
    c.login()
    c.send("STAT", "LIST")
    assert c.line() == b"+OK %d %d" % (len(MESSAGES), sum(map(message_size, MESSAGES)))
    assert c.line().startswith(b"+OK")
    assert c.body() == b"".join(b"%d %d\r\n" % (i + 1, message_size(m)) for i, m in enumerate(MESSAGES))
    # one by one, as most clients do
    for n in range(1, 20):
        c.send(f"RETR {n}")
        assert c.line() == b"+OK %d octets" % message_size(MESSAGES[n - 1])
        assert c.body() == encode_message(MESSAGES[n - 1]), n
    # pipelined (RFC 2449), skipping some: what was read ahead for a skipped one is not sent
    order = [25, 21, 20, 30, 31, 48, 47, 1, 4, 7, 22]
    c.send(*[f"RETR {n}" for n in order])
    for n in order:
        assert c.line() == b"+OK %d octets" % message_size(MESSAGES[n - 1])
        assert c.body() == encode_message(MESSAGES[n - 1]), n
    c.send("QUIT")
    assert c.line().startswith(b"+OK")


def test_retr_of_many_in_order_crosses_every_read_ahead_refill_exactly(srv):
    """More messages than several read-aheads hold (count and bytes both bind at times): each
    RETR, one by one and then pipelined, is exactly encode_message() of its file."""
    many = [b"Subject: %d\r\n\r\n" % i + (b".dotline\r\n" if i % 3 else b"x line\n") * (i * 37 % 4000)
            for i in range(2 * retrieve.READ_AHEAD_COUNT + 40)]
    assert sum(map(len, many)) > 2 * retrieve.READ_AHEAD_BYTES
    place(srv, many, "sw")
    c = plain(srv)
    c.login()
    half = len(many) // 2
    for n in range(1, half + 1):
        c.send(f"RETR {n}")
        assert c.line() == b"+OK %d octets" % message_size(many[n - 1])
        assert c.body() == encode_message(many[n - 1]), n
    c.send(*[f"RETR {n}" for n in range(half + 1, len(many) + 1)])
    for n in range(half + 1, len(many) + 1):
        assert c.line() == b"+OK %d octets" % message_size(many[n - 1])
        assert c.body() == encode_message(many[n - 1]), n
    c.send("QUIT")
    assert c.line().startswith(b"+OK")


def test_message_expunged_after_it_was_read_ahead_gets_err(srv):
    """A message read ahead and then expunged over IMAP is not sent from memory: -ERR, as
    without the read-ahead; the others still come."""
    place(srv, MESSAGES[8:20])
    c = plain(srv)
    c.login()
    c.send("RETR 1")
    assert c.line().startswith(b"+OK") and c.body() == encode_message(MESSAGES[8])
    session = next(s for s in srv.services.sessions.sessions if getattr(s, "account", None) == USER)
    wait_for(lambda: 2 in session._ahead and 5 in session._ahead, 10, what="read-ahead of messages 2..")
    box = srv.call(srv.services.store.open(USER, "INBOX"))
    uid = box.messages[4].uid
    srv.call(box.store_flags([uid], {"\\Deleted"}, "+"))
    assert srv.call(box.expunge([uid])) == [uid]
    c.send("RETR 5", "RETR 2")
    assert c.line().startswith(b"-ERR")
    assert c.line().startswith(b"+OK") and c.body() == encode_message(MESSAGES[9])
    c.send("QUIT")
    c.line()
    srv.call(box.close())


def test_first_stat_takes_sizes_from_names_and_index_not_the_files(srv):
    """W= in a name is the size (Dovecot's convention, trusted as Dovecot does); a file
    without one is counted once and its size kept in the index: the second login reads no
    file (here: a file changed behind the server's back still has its indexed size)."""
    names = place(srv, [CRLF_DOTS, LF_DOTS], "none")
    cur = srv.cfg.mail_dir / "example.test" / "alice" / "cur"
    named = "1800000000.M1P1Q1.test,S=99,W=12345:2,"
    (cur / named).write_bytes(b"Subject: w\r\n\r\nshort\r\n")
    c = plain(srv)
    c.login()
    c.send("LIST", "QUIT")
    assert c.line().startswith(b"+OK")
    assert c.body() == b"1 %d\r\n2 %d\r\n3 12345\r\n" % (message_size(CRLF_DOTS), message_size(LF_DOTS))
    c.line()
    (cur / names[1]).write_bytes(b"x")  # never done to a Maildir file: shows nothing reads it
    wait_for(lambda: not srv.services.sessions.sessions, 10, what="first session gone")
    c = plain(srv)
    c.login()
    c.send("LIST 2", "QUIT")
    assert c.line() == b"+OK 2 %d" % message_size(LF_DOTS)
    c.line()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"."]), max_size=80).map(b"".join),
       st.integers(min_value=1, max_value=9))
def test_file_size_counted_in_pieces_equals_message_size(tmp_path_factory, data, chunk):
    path = tmp_path_factory.mktemp("sz") / "m"
    path.write_bytes(data)
    assert sizes.file_message_size(str(path), chunk) == message_size(data)


def test_stream_closes_its_descriptor_after_a_read_in_flight(tmp_path):
    """close() while next() runs (shutdown) leaves the descriptor to that read to close."""
    path = tmp_path / "m"
    path.write_bytes(BIG_CRLF)
    s = retrieve.FileStream(str(path))
    fd = s._fd
    s._busy = True  # as if a read were running in a worker thread
    s.close()
    os.fstat(fd)  # still open: the read would use it
    s._busy = False
    with pytest.raises(OSError):
        s.next()
    s.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def _session(srv):
    return next(s for s in srv.services.sessions.sessions if getattr(s, "account", None) == USER)


def _count_at_once(srv, session) -> list[bool]:
    """Records what session.retr_at_once answers (wrapped on the server's loop)."""
    seen: list[bool] = []
    inner = session.retr_at_once

    def wrapped(line: bytes) -> bool:
        seen.append(inner(line))
        return seen[-1]

    async def install() -> None:
        session.conn.on_line = wrapped
    srv.call(install())
    return seen


def test_retr_of_a_message_read_ahead_is_answered_at_once_in_order(srv):
    """RETR of a message already read ahead is answered from data_received, without waking
    the session's task; anything else takes the ordinary way, and pipelined answers stay in
    order, with the same bytes and the same errors."""
    place(srv, MESSAGES[8:40], "sw")
    c = plain(srv)
    c.login()
    c.send("RETR 1")
    assert c.line().startswith(b"+OK") and c.body() == encode_message(MESSAGES[8])
    session = _session(srv)
    seen = _count_at_once(srv, session)
    for n in range(2, 12):
        wait_for(lambda: n in session._ahead or n - 1 in session._ahead, 10, what=f"read-ahead of {n}")
        c.send(f"RETR {n}")
        assert c.line() == b"+OK %d octets" % message_size(MESSAGES[7 + n])
        assert c.body() == encode_message(MESSAGES[7 + n]), n
    wait_for(lambda: len(seen) == 10, 5, what="the last answer's record")  # (written before recorded)
    assert seen.count(True) >= 9  # (one may have raced its read-ahead)
    wait_for(lambda: 13 in session._ahead and 15 in session._ahead, 10, what="read-ahead of 14, 16")
    # declined ones (a DELEted message, a bad number, other commands, lower case) keep their place
    c.send("RETR 14", "DELE 14", "RETR 14", "RETR 0", "RETR 99", "RETR 16 ", "retr 16", "NOOP", "RETR 16",
           "STAT")
    assert c.line() == b"+OK %d octets" % message_size(MESSAGES[21])
    assert c.body() == encode_message(MESSAGES[21])
    assert c.line().startswith(b"+OK Message 14 marked")
    assert c.line().startswith(b"-ERR Message 14 already deleted")
    assert c.line().startswith(b"-ERR No such message")
    assert c.line().startswith(b"-ERR No such message")
    for noop in (False, False, True):  # "RETR 16 " (trailing space, tolerated), "retr 16", NOOP, "RETR 16"
        if noop:
            assert c.line() == b"+OK"
        assert c.line() == b"+OK %d octets" % message_size(MESSAGES[23])
        assert c.body() == encode_message(MESSAGES[23])
    total = sum(message_size(m) for m in MESSAGES[8:40]) - message_size(MESSAGES[21])
    assert c.line() == b"+OK %d %d" % (31, total)
    c.send("QUIT")
    assert c.line().startswith(b"+OK")


def test_retr_at_once_counts_as_activity_and_as_a_command(tmp_path):
    """The read timeout counts from the last RETR answered at once (not from the last command
    read the ordinary way), and RETRs answered at once count against max_commands."""
    server = POP3Server(tmp_path, pop3={"allow_plaintext_auth": True, "idle_timeout": 1, "max_commands": 10})
    try:
        place(server, MESSAGES[8:30], "sw")
        c = plain(server)
        c.login()  # commands 1, 2
        c.send("RETR 1")  # 3
        assert c.line().startswith(b"+OK") and c.body() == encode_message(MESSAGES[8])
        session = _session(server)
        seen = _count_at_once(server, session)
        for n in range(2, 6):  # 4 .. 7, over about 2 s: longer than the timeout
            wait_for(lambda: n - 1 in session._ahead, 10, what=f"read-ahead of {n}")
            time.sleep(0.5)
            c.send(f"RETR {n}")
            assert c.line().startswith(b"+OK") and c.body() == encode_message(MESSAGES[7 + n])
        wait_for(lambda: len(seen) == 4, 5, what="the last answer's record")  # (written before recorded)
        assert seen == [True] * 4
        c.send("RETR 6", "RETR 7", "RETR 8", "RETR 9")  # 8, 9, 10, then the 11th is refused
        for n in (6, 7, 8):
            assert c.line().startswith(b"+OK") and c.body() == encode_message(MESSAGES[7 + n])
        assert c.line() == b"-ERR Too many commands in one session"
        with pytest.raises(ConnectionError):
            c.line()
        # and silence is still cut off after the timeout
        d = plain(server)
        t0 = time.monotonic()
        d.login()
        d.send("RETR 1")
        assert d.line().startswith(b"+OK") and d.body() == encode_message(MESSAGES[8])
        assert d.line() == b"-ERR Disconnected for inactivity"
        assert 0.9 <= time.monotonic() - t0 < 5
    finally:
        server.stop()


def _w_field(key: str) -> int | None:
    """The plain definition of size_from_name: the digits after the first ",W=", ending at
    the end of the name, "," or ":"; None when there are none or something else follows."""
    i = key.find(",W=")
    if i < 0:
        return None
    digits = ""
    for ch in key[i + 3:]:
        if ch in "0123456789":
            digits += ch
            continue
        if ch not in ",:":
            return None
        break
    return int(digits) if digits else None


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["1", "0", "42", ",W=", ",S=", ",", ":", ":2,", "x", ".", "\n", "٣", "M1P2"]),
                max_size=10).map("".join))
def test_size_from_name_is_the_plain_definition(key):
    assert sizes.size_from_name(key) == _w_field(key)


_PIECES = ["1795475826", ".", "M", "99999", "P", "10", "Q", "3", "D", "abc_2E", ".host", ",S=", ",W=", "12", "x",
           ":2,", ","]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=14).map("".join))
def test_scan_base_is_parse_base_and_arrival_key(base):
    """The first STAT's scan of new files parses each name once (store/filename.scan_base):
    the same size, date and delivery id as parse_base, and the same order as arrival_key."""
    from mailstack.store import filename as fn
    size, date, did, order = fn.scan_base(base)
    assert (size, date, did) == fn.parse_base(base)
    assert order is None or order == fn.arrival_key(base)
    made = fn.new_base(1795475826, 42, "d1")
    assert fn.scan_base(made) == (42, 1795475826, "d1", fn.arrival_key(made))
