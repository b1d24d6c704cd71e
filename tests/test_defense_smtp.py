"""Defence at the SMTP door, against the real server process: DNS block/allow lists served
by a real DNS server on loopback (listed, not listed, filtered, "query refused" codes,
REFUSED, timeout), pregreet, HELO and reverse-DNS policy, rate limits per client address
and per user.  Each test plays its own client address (127.0.0.x, bound by the client)."""
from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
import urllib.request

import pytest

from dnsserver import DNSServer
from harness import MailServer, free_port, wait_for

ALICE, PASSWORD = "alice@example.test", "secret pw"
BODY = b"Subject: hello\r\n\r\nclean mail\r\n"


def _zone() -> dict:
    zone: dict[str, dict[str, list]] = {}
    # Forward-confirmed reverse names for every client address but 127.0.0.30.
    for i in range(2, 41):
        if i == 30:
            continue
        zone[f"{i}.0.0.127.in-addr.arpa"] = {"PTR": [f"host{i}.client.test"]}
        zone[f"host{i}.client.test"] = {"A": [f"127.0.0.{i}"]}
    zone["2.0.0.127.bl.test"] = {"A": ["127.0.0.2"]}  # listed
    zone["3.0.0.127.bl.test"] = {"A": ["127.255.255.254"]}  # "query via a public resolver": not a listing
    zone["5.0.0.127.bl.test"] = {"A": ["127.0.0.2"]}  # listed ... and allowed by wl.test
    zone["5.0.0.127.wl.test"] = {"A": ["127.0.10.1"]}
    zone["6.0.0.127.filtered.test"] = {"A": ["127.0.0.99"]}  # outside the site's filter
    zone["7.0.0.127.filtered.test"] = {"A": ["127.0.0.3"]}  # inside it
    zone["bl.test"] = {"TXT": ["a list"]}
    zone["wl.test"] = {"TXT": ["a list"]}
    zone["filtered.test"] = {"TXT": ["a list"]}
    return zone


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    dns = DNSServer(_zone(), ttl=300).start()
    dns.silent.add("4.0.0.127.bl.test")
    dns.refused.add("8.0.0.127.bl.test")
    metrics_port = free_port()
    srv = MailServer(tmp_path_factory.mktemp("defense"), listeners=("smtp", "submissions"), overrides={
        "dns": {"nameservers": [dns.address], "timeout": 2.0},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "defense": {"dnsbl_sites": ["bl.test*2", "filtered.test=127.0.0.[2..11]*2", "wl.test*-2"],
                    "dnsbl_threshold": 2, "dnsbl_timeout": 1.0, "greet_delay": 0.3,
                    "helo_check": "reject", "rdns_check": "reject", "pipelining_check": "reject",
                    "max_connections_per_minute": 8, "max_messages_per_minute": 3,
                    "max_recipients_per_minute": 6, "max_failed_recipients_per_minute": 3,
                    "user_messages_per_hour": 2, "user_recipients_per_hour": 100},
    })
    srv.metrics_port = metrics_port
    srv.add_domain("example.test")
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    yield srv, dns
    srv.stop()
    dns.stop()


def client(srv, ip: str, helo: str = "client.example.test") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10, source_address=(ip, 0), local_hostname=helo)
    return s


def rcpt_reply(srv, ip: str, rcpt: str = ALICE, helo: str = "client.example.test") -> tuple[int, bytes]:
    with client(srv, ip, helo) as s:
        s.ehlo()
        assert s.mail("sender@remote.test")[0] == 250
        return s.rcpt(rcpt)


def log_has(srv, pattern: str) -> re.Match:
    try:
        return wait_for(lambda: re.search(pattern, srv.log(), re.M), 10, what=f"log line /{pattern}/")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- server log (end) ---\n{srv.log()[-3000:]}") from None


# --- DNS lists ------------------------------------------------------------------------------

def test_listed_client_is_refused_at_rcpt_naming_the_list(env):
    srv, dns = env
    assert rcpt_reply(srv, "127.0.0.2") == (554, b"5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test")
    log_has(srv, r"warning defense: \[127\.0\.0\.2\] reject: client listed by bl\.test \(score 2 >= 2\)$")


def test_filter_of_a_site_decides_which_answers_count(env):
    srv, _ = env
    assert rcpt_reply(srv, "127.0.0.6")[0] == 250  # 127.0.0.99 is outside 127.0.0.[2..11]
    assert rcpt_reply(srv, "127.0.0.7") == (
        554, b"5.7.1 Service unavailable; client [127.0.0.7] blocked using filtered.test")


def test_query_refused_code_timeout_and_refused_server_are_no_listing(env):
    srv, dns = env
    assert rcpt_reply(srv, "127.0.0.3")[0] == 250
    log_has(srv, r"dnsbl bl\.test: answer 127\.255\.255\.254 for 127\.0\.0\.3 is an error code")
    t0 = time.monotonic()
    assert rcpt_reply(srv, "127.0.0.4")[0] == 250  # the list never answers: 1 s, then accepted
    assert time.monotonic() - t0 < 5
    log_has(srv, r"dnsbl bl\.test: no answer for 127\.0\.0\.4 within 1\.0s")
    assert rcpt_reply(srv, "127.0.0.8")[0] == 250  # REFUSED by the list's server
    log_has(srv, r"dnsbl bl\.test: lookup for 127\.0\.0\.8 failed")


def test_allow_list_offsets_a_listing_and_answers_are_cached_by_ttl(env):
    srv, dns = env
    assert rcpt_reply(srv, "127.0.0.5")[0] == 250  # bl.test*2 + wl.test*-2 = 0 < 2
    log_has(srv, r"\[127\.0\.0\.5\] dnsbl: score 0/2: listed by bl\.test, allowed by wl\.test")
    asked = [q for q in dns.queries if q[0] == "5.0.0.127.bl.test"]
    assert len(asked) == 1
    assert rcpt_reply(srv, "127.0.0.5")[0] == 250
    assert [q for q in dns.queries if q[0] == "5.0.0.127.bl.test"] == asked  # TTL 300: from the cache


# --- pregreet, HELO, rDNS ----------------------------------------------------------------------

def test_client_talking_before_the_banner_is_refused(env):
    srv, _ = env
    sock = socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=10, source_address=("127.0.0.9", 0))
    sock.sendall(b"EHLO early.example.test\r\n")
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data == b"554 5.5.1 Error: protocol error, you talked before my greeting\r\n"
    log_has(srv, r"warning defense: \[127\.0\.0\.9\] PREGREET 25 after 0\.\d\d: b'EHLO early")
    # a client that waits for the banner (smtplib) is served, and not delayed again afterwards
    assert rcpt_reply(srv, "127.0.0.15")[0] == 250
    t0 = time.monotonic()
    with client(srv, "127.0.0.15") as s:
        assert s.noop()[0] == 250
    assert time.monotonic() - t0 < 0.25  # greet_delay is 0.3 s; a client that passed skips it


def _raw_replies(sock, n: int) -> list[bytes]:
    f = sock.makefile("rb")
    out = []
    while len(out) < n:
        line = f.readline()
        if not line:
            break
        if line[3:4] == b" ":
            out.append(line.rstrip(b"\r\n"))
    return out


def test_pipelining_without_pipelining_is_refused(env):
    srv, _ = env
    sock = socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=10, source_address=("127.0.0.17", 0))
    assert _raw_replies(sock, 1)[0].startswith(b"220 ")
    sock.sendall(b"HELO client.example.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert _raw_replies(sock, 3)[2] == b"550 5.5.1 Error: protocol error, command pipelining without PIPELINING"
    sock.close()
    log_has(srv, r"\[127\.0\.0\.17\] COMMAND PIPELINING before PIPELINING was offered \(refused\)")
    # After the EHLO reply has offered PIPELINING, pipelining is what a good client does.
    sock = socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=10, source_address=("127.0.0.18", 0))
    assert _raw_replies(sock, 1)[0].startswith(b"220 ")
    sock.sendall(b"EHLO client.example.test\r\n")
    assert _raw_replies(sock, 1)[0] == b"250 HELP"
    sock.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nQUIT\r\n")
    assert _raw_replies(sock, 3) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"221 2.0.0 Bye"]
    sock.close()


def test_helo_policy(env):
    srv, _ = env
    assert rcpt_reply(srv, "127.0.0.10", helo="localhost") == (
        550, b"5.7.1 <localhost>: Helo command rejected: need fully-qualified hostname")
    assert rcpt_reply(srv, "127.0.0.10", helo="mail.example.test") == (
        550, b"5.7.1 <mail.example.test>: Helo command rejected: that is my own name")
    assert rcpt_reply(srv, "127.0.0.10", helo="[127.0.0.10]")[0] == 250
    log_has(srv, r"info defense: \[127\.0\.0\.10\] helo check: 'localhost' need fully-qualified hostname \(refused\)")


def test_reverse_dns_policy(env):
    srv, _ = env
    assert rcpt_reply(srv, "127.0.0.30") == (450, b"4.7.25 Client host rejected: cannot find your hostname, [127.0.0.30]")
    log_has(srv, r"\[127\.0\.0\.30\] rdns check: no reverse name that resolves back to the client \(refused\)")


# --- rate limits ---------------------------------------------------------------------------------

def test_messages_per_minute_per_client_address(env):
    srv, _ = env
    with client(srv, "127.0.0.11") as s:
        for _ in range(3):
            s.sendmail("sender@remote.test", [ALICE], BODY)
        code, msg = s.mail("sender@remote.test")
    assert (code, msg) == (451, b"4.7.0 Error: too many messages from your address, try again later")
    log_has(srv, r"warning defense: \[127\.0\.0\.11\] rate limit: messages 4/3 per minute$")
    assert rcpt_reply(srv, "127.0.0.16")[0] == 250  # another address is not affected


def test_recipients_per_minute_per_client_address(env):
    srv, _ = env
    with client(srv, "127.0.0.12") as s:
        s.ehlo()
        s.mail("sender@remote.test")
        replies = [s.rcpt(ALICE)[0] for _ in range(7)]
    assert replies == [250] * 6 + [451]
    log_has(srv, r"\[127\.0\.0\.12\] rate limit: recipients 7/6 per minute$")


def test_failed_recipients_end_harvesting(env):
    srv, _ = env
    with client(srv, "127.0.0.13") as s:
        s.ehlo()
        s.mail("sender@remote.test")
        replies = [s.rcpt(f"guess{i}@example.test") for i in range(4)]
    assert [code for code, _ in replies] == [550, 550, 550, 421]
    assert replies[3][1] == b"4.7.0 mail.example.test Error: too many unknown recipients, try again later"
    log_has(srv, r"\[127\.0\.0\.13\] rate limit: failed recipients 4/3 per minute \(harvesting\?\): disconnecting")
    with pytest.raises(smtplib.SMTPConnectError) as e:  # while the rate is high, refused at connect
        client(srv, "127.0.0.13")
    assert e.value.smtp_code == 421


def test_connections_per_minute_per_client_address(env):
    srv, _ = env
    for _ in range(8):
        with client(srv, "127.0.0.14") as s:
            s.noop()
    with pytest.raises(smtplib.SMTPConnectError) as e:
        client(srv, "127.0.0.14")
    assert (e.value.smtp_code, e.value.smtp_error) == (
        421, b"4.7.0 mail.example.test Error: too many connections from your address, try again later")
    log_has(srv, r"\[127\.0\.0\.14\] rate limit: connections 9/8 per minute$")


def test_authenticated_user_messages_per_hour(env):
    srv, _ = env
    tls = ssl.create_default_context(cafile=str(srv.cert_path))
    tls.check_hostname = False
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], timeout=10, context=tls,
                          local_hostname="client.example.test") as s:
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, ["bob@remote.test"], BODY)
        s.sendmail(ALICE, ["bob@remote.test"], BODY)
        code, msg = s.mail(ALICE)
    assert (code, msg) == (451, b"4.7.0 Error: you sent too many messages in the last hour, try again later")
    log_has(srv, r"warning defense: \[127\.0\.0\.1\] rate limit: user=<alice@example\.test> messages 3/2 per hour$")


def test_clean_client_delivers_and_metrics_count_per_reason(env):
    srv, _ = env
    with client(srv, "127.0.0.20") as s:
        s.sendmail("friend@remote.test", [ALICE], BODY)
    wait_for(lambda: any(b"clean mail" in m for m in srv.inbox_messages(ALICE)), 15, what="delivery")
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    assert re.search(r'^mailstack_defense_total\{check="dnsbl",reason="listed"\} [1-9]', text, re.M)
    assert re.search(r'^mailstack_defense_total\{check="pregreet",reason="early_talker"\} 1$', text, re.M)
    assert re.search(r'^mailstack_defense_total\{check="rate",reason="messages"\} [1-9]', text, re.M)
