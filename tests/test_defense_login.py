"""Password guessing across SMTP AUTH, IMAP and POP3, against the real server process with
real clients (smtplib, imaplib, poplib) bound to different 127.0.0.x addresses: parallel
guesses capped, an address blocked on every protocol after N failures, the account's
owner logging in from his usual address never slowed, log lines the fail2ban filter in
docs/defense.md matches, a metric per reason."""
from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness import MailServer, free_port, wait_for

ALICE, PASSWORD = "alice@example.test", "secret pw"
OWNER_IP = "127.0.0.60"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "defense.md"


class IMAP(imaplib.IMAP4):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class POP3(poplib.POP3):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    metrics_port = free_port()
    srv = MailServer(tmp_path_factory.mktemp("login"), listeners=("submissions", "imap", "pop3", "managesieve"), overrides={
        "auth": {"fail_delay": 2.0, "fail_delay_max": 2.0, "max_parallel": 2, "block_after": 3,
                 "block_time": 600},
        "imap": {"allow_plaintext_auth": True},
        "pop3": {"allow_plaintext_auth": True},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "defense": {"login_timeout": 3.0},
    })
    srv.metrics_port = metrics_port
    srv.add_domain("example.test")
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def smtp_login(srv, ip: str, password: str, user: str = ALICE) -> tuple[int, bytes]:
    tls = ssl.create_default_context(cafile=str(srv.cert_path))
    tls.check_hostname = False
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], timeout=10, context=tls,
                          source_address=(ip, 0), local_hostname="client.example.test") as s:
        s.ehlo()
        s.user, s.password = user, password
        try:  # one mechanism: smtplib's login() would try PLAIN, then LOGIN (two guesses)
            return s.auth("PLAIN", s.auth_plain)
        except smtplib.SMTPResponseException as e:
            return e.smtp_code, e.smtp_error


def imap_login(srv, ip: str, password: str, user: str = ALICE) -> str:
    c = IMAP(srv.ports["imap"], ip)
    try:
        typ, data = c.login(user, password)
        c.logout()
        return typ + " " + data[0].decode()
    except imaplib.IMAP4.error as e:
        text = e.args[0]
        return "NO " + (text.decode() if isinstance(text, bytes) else str(text))
    finally:
        try:
            c.shutdown()
        except OSError:
            pass


def pop3_login(srv, ip: str, password: str, user: str = ALICE) -> str:
    c = POP3(srv.ports["pop3"], ip)
    try:
        c.user(user)
        reply = c.pass_(password).decode()
        c.quit()
        return reply
    except poplib.error_proto as e:
        return e.args[0].decode()
    finally:
        c.close()


def managesieve_login(srv, ip: str, password: str, user: str = ALICE) -> str:
    """AUTHENTICATE PLAIN after STARTTLS (RFC 5804); the reply line."""
    import base64
    from harness import HOSTNAME
    raw = socket.create_connection(("127.0.0.1", srv.ports["managesieve"]), timeout=10, source_address=(ip, 0))
    with raw:
        f = raw.makefile("rb")
        while not f.readline().startswith(b"OK"):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"OK")
        with srv.client_tls().wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            t = tls.makefile("rwb")
            while not t.readline().startswith(b"OK"):
                pass
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            t.write(f'AUTHENTICATE "PLAIN" "{token}"\r\n'.encode())
            t.flush()
            return t.readline().decode().strip()


LOGINS = {"smtp": smtp_login, "imap": imap_login, "pop3": pop3_login}


def ok(protocol: str, reply) -> bool:
    return {"smtp": lambda r: r[0] == 235, "imap": lambda r: r.startswith("OK"),
            "pop3": lambda r: r.startswith("+OK")}[protocol](reply)


def timed(fn, *args):
    t0 = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - t0


def test_parallel_guesses_from_one_address_are_capped(srv):
    ip = "127.0.0.50"
    assert imap_login(srv, ip, "wrong 0").startswith("NO [AUTHENTICATIONFAILED]")  # now it waits 2 s a try
    clients = [IMAP(srv.ports["imap"], ip) for _ in range(10)]
    barrier = threading.Barrier(len(clients))
    results: list[str] = []

    def guess(c, n):
        barrier.wait()
        try:
            c.login(ALICE, f"wrong {n}")
            results.append("OK")
        except imaplib.IMAP4.error as e:
            text = e.args[0]
            results.append(text.decode() if isinstance(text, bytes) else str(text))
        finally:
            c.shutdown()

    threads = [threading.Thread(target=guess, args=(c, n)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Two at a time (max_parallel) were checked, each after its delay; the third failure
    # (block_after) blocked the address, and those still waiting their turn were refused.
    # (The first of the two to fail hands its slot on before the second fails: 2 or 3
    # guesses are checked, never the ten that were sent at once.)
    checked = [r for r in results if "AUTHENTICATIONFAILED" in r]
    refused = [r for r in results if r == "[UNAVAILABLE] Too many failed logins from your address, try again later"]
    assert len(results) == 10 and len(checked) in (2, 3) and len(refused) == 10 - len(checked), results
    srv.wait_log(re.compile(r"warning defense: \[127\.0\.0\.50\] login refused: protocol=imap "
                            r"user=<alice@example\.test> reason=blocked$", re.M))


def test_guessing_from_several_addresses_blocks_them_everywhere_not_the_owner(srv):
    # The owner has logged in from his address before (his phone, his office).
    for protocol, login in LOGINS.items():
        assert ok(protocol, login(srv, OWNER_IP, PASSWORD))
    attackers = ["127.0.0.52", "127.0.0.53", "127.0.0.54"]
    stop = threading.Event()
    owner_times: list[tuple[str, float]] = []

    def attack(ip):
        n = 0
        while not stop.is_set() and n < 3:  # block_after = 3: one guess per protocol
            protocol = ("imap", "pop3", "smtp")[n % 3]
            reply = LOGINS[protocol](srv, ip, f"guess {n}")
            assert not ok(protocol, reply)
            n += 1

    owner_errors: list = []

    def owner():
        while not stop.is_set():
            for protocol, login in LOGINS.items():
                try:
                    reply, seconds = timed(login, srv, OWNER_IP, PASSWORD)
                except Exception as e:  # noqa: BLE001 - reported by the test thread
                    owner_errors.append((protocol, repr(e)))
                    continue
                if not ok(protocol, reply):
                    owner_errors.append((protocol, reply))
                owner_times.append((protocol, seconds))

    threads = [threading.Thread(target=attack, args=(ip,)) for ip in attackers]
    owner_thread = threading.Thread(target=owner)
    for t in threads + [owner_thread]:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    owner_thread.join(30)
    # The owner was never slowed although his account was under attack all along
    # (the account's count slows only addresses that never logged in to it).
    assert not owner_errors
    assert len(owner_times) >= 6
    assert max(s for _, s in owner_times) < 1.6, owner_times  # a stranger waits >= 2 s

    # Every attacker is now blocked on every protocol, even with the right password, at once.
    for ip in attackers:
        reply, seconds = timed(smtp_login, srv, ip, PASSWORD)
        assert reply == (454, b"4.7.0 Error: too many failed logins from your address, try again later")
        assert seconds < 1.0
        reply, seconds = timed(imap_login, srv, ip, PASSWORD)
        assert reply == "NO [UNAVAILABLE] Too many failed logins from your address, try again later"
        reply, seconds = timed(pop3_login, srv, ip, PASSWORD)
        assert reply == "-ERR [SYS/TEMP] Too many failed logins from your address, try again later"
        assert seconds < 1.0
        reply, seconds = timed(managesieve_login, srv, ip, PASSWORD)  # port 4190 is no way around it
        assert reply == 'NO (TRYLATER) "Too many failed logins from your address, try again later"'
        assert seconds < 1.0
    srv.wait_log(*(re.compile(rf"warning defense: \[{re.escape(ip)}\] address blocked for 600s after 3 failed logins")
                   for ip in attackers))
    # A stranger's correct login for the attacked account is slowed (not refused).
    reply, seconds = timed(imap_login, srv, "127.0.0.61", PASSWORD)
    assert reply.startswith("OK") and seconds >= 2.0
    # ... and the owner is still fine.
    reply, seconds = timed(pop3_login, srv, OWNER_IP, PASSWORD)
    assert reply.startswith("+OK") and seconds < 1.6


def _fail2ban_regexes() -> list[re.Pattern]:
    text = DOCS.read_text()
    block = re.search(r"^failregex = (.*?)^ignoreregex", text, re.S | re.M).group(1)
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    return [re.compile(line.replace("<HOST>", r"(?P<host>\S+)")) for line in lines]


def test_fail2ban_filter_in_the_docs_matches_the_log_lines(srv):
    # (an account nobody attacked yet: no per-account delay)
    assert smtp_login(srv, "127.0.0.70", "nope", "carol@example.test")[0] == 535
    assert pop3_login(srv, "127.0.0.71", "nope", "carol@example.test").startswith("-ERR [AUTH]")
    assert imap_login(srv, "127.0.0.72", "nope", "carol@example.test").startswith("NO [AUTHENTICATIONFAILED]")
    assert managesieve_login(srv, "127.0.0.73", "nope", "carol@example.test").startswith("NO")
    regexes = _fail2ban_regexes()

    def matched_hosts() -> set[str]:
        hosts = set()
        for line in srv.log().splitlines():
            for rx in regexes:
                m = rx.search(line)
                if m:
                    hosts.add(m.group("host"))
        return hosts

    want = {"127.0.0.70", "127.0.0.71", "127.0.0.72", "127.0.0.73", "127.0.0.52"}
    hosts = wait_for(lambda: want <= matched_hosts() and matched_hosts(), 10, what="log lines")
    assert OWNER_IP not in hosts  # successful logins never match
    # one line per failed login, the guard's: the protocols do not log their own beside it
    for ip in ("127.0.0.71", "127.0.0.72", "127.0.0.73"):
        assert len([ln for ln in srv.log().splitlines() if f"[{ip}]" in ln and "login failed" in ln]) == 1


def test_metrics_count_per_reason(srv):
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    counts = {m.group(1): int(m.group(2)) for m in
              re.finditer(r'^mailstack_defense_total\{check="login",reason="(\w+)"\} (\d+)$', text, re.M)}
    assert counts.get("bad_password", 0) >= 15 and counts.get("block", 0) >= 3
    assert counts.get("blocked", 0) >= 16


def test_imap_client_silent_before_login_is_logged_out_after_login_timeout(srv):
    s = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=15, source_address=("127.0.0.80", 0))
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK ")
    t0 = time.monotonic()
    assert f.readline() == b"* BYE Autologout; idle for too long\r\n"  # not after imap.idle_timeout (30 min)
    assert 2.5 <= time.monotonic() - t0 < 10
    s.close()
