"""Connection floods against the real server process: ten addresses holding idle SMTP
connections no longer lock out a new client; IMAP takes tens of connections per address,
not 10,000; idle sessions that have not logged in are closed quickly under stress."""
from __future__ import annotations

import smtplib
import socket

import pytest

from harness import MailServer, wait_for

ALICE, PASSWORD = "alice@example.test", "secret pw"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("floods"), listeners=("smtp", "imap"))
    srv.add_domain("example.test")
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def connect(port: int, ip: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(ip, 0))
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def test_ten_addresses_holding_idle_smtp_connections_do_not_block_a_new_client(srv):
    holders = []
    try:
        for n in range(10):  # 10 x 20 = smtp.max_connections (200), each at max_connections_per_ip
            ip = f"127.0.0.{100 + n}"
            for _ in range(20):
                s = connect(srv.ports["smtp"], ip)
                assert read_line(s).startswith(b"220 ")
                s.sendall(b"EHLO idle.example.test\r\n")
                while not read_line(s).startswith(b"250 "):
                    pass
                holders.append(s)
        # All slots are taken: one more from a holder's address is refused (per-address limit).
        extra = connect(srv.ports["smtp"], "127.0.0.100")
        assert read_line(extra) == b"421 4.7.0 mail.example.test Error: too many connections\r\n"
        extra.close()

        # A new client gets in (at once, once the holders have been idle a second) and delivers.
        def deliver():
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10, source_address=("127.0.0.200", 0),
                                  local_hostname="client.example.test") as c:
                    c.sendmail("friend@remote.test", [ALICE], b"Subject: through\r\n\r\nmade it\r\n")
                return True
            except smtplib.SMTPConnectError:
                return False

        wait_for(deliver, 15, interval=0.2, what="a new client to deliver past the idle holders")
        wait_for(lambda: any(b"made it" in m for m in srv.inbox_messages(ALICE)), 15, what="delivery")
        # The holders are being closed: each got the protocol's timeout reply.
        closed = []
        for s in holders:
            s.settimeout(0.01)
            try:
                line = read_line(s)
            except (TimeoutError, socket.timeout):
                continue
            closed.append(line)
        assert closed and set(closed) <= {b"421 4.4.2 mail.example.test Error: timeout exceeded\r\n"}
        wait_for(lambda: "closing idle smtp session before login/MAIL: evicted" in srv.log(), 10, what="log line")
    finally:
        for s in holders:
            s.close()


def test_imap_takes_tens_of_connections_per_address_not_ten_thousand(srv):
    conns = []
    try:
        for _ in range(50):  # imap.max_connections_per_ip default
            s = connect(srv.ports["imap"], "127.0.0.120")
            assert read_line(s).startswith(b"* OK ")
            conns.append(s)
        s = connect(srv.ports["imap"], "127.0.0.120")
        assert read_line(s) == b"* BYE [UNAVAILABLE] Too many connections\r\n"
        s.close()
        s = connect(srv.ports["imap"], "127.0.0.121")  # another address is still welcome
        assert read_line(s).startswith(b"* OK ")
        s.close()
    finally:
        for s in conns:
            s.close()


def test_idle_sessions_before_login_are_closed_under_stress(tmp_path):
    with MailServer(tmp_path, listeners=("pop3",), overrides={
            "pop3": {"max_connections": 20}, "defense": {"stress_at": 0.5, "stress_timeout": 1.0}}) as srv:
        srv.start()
        _stress(srv)


def _stress(srv):
    idle, arrivals = [], []
    try:
        for n in range(9):  # pop3.max_connections 20, stress at 50 %: 9 is not stress yet
            s = connect(srv.ports["pop3"], f"127.0.0.{130 + n}")
            assert read_line(s).startswith(b"+OK ")
            idle.append(s)

        def swept():
            s = connect(srv.ports["pop3"], "127.0.0.150")  # each arrival may sweep, under stress
            assert read_line(s).startswith(b"+OK")
            arrivals.append(s)
            idle[0].settimeout(0.05)
            try:
                return read_line(idle[0])
            except (TimeoutError, socket.timeout):
                return None

        # The sessions idle since before the stress began (with the normal pre-login timeout)
        # are closed by the sweep once idle longer than stress_timeout.
        assert wait_for(swept, 15, interval=0.3, what="idle POP3 session closed under stress") == \
            b"-ERR Disconnected for inactivity\r\n"
        wait_for(lambda: "closing idle pop3 session before login/MAIL: stress_timeout" in srv.log(), 10,
                 what="log line")
        # Sessions that arrived under stress got the short timeout themselves.
        arrivals[-1].settimeout(5)
        assert read_line(arrivals[-1]) == b"-ERR Disconnected for inactivity\r\n"
    finally:
        for s in idle + arrivals:
            s.close()
