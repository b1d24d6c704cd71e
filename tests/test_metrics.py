"""Prometheus metrics: the exposition and the HTTP parsing as plain functions, then a real
server process scraped with real HTTP clients (urllib and curl) after real mail traffic:
mail delivered and deferred, a relay attempt, an unknown user, failed logins on SMTP, IMAP
and POP3, TLS handshakes (STARTTLS and implicit) and a failed one."""
from __future__ import annotations

import base64
import imaplib
import poplib
import re
import smtplib
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from harness import MailServer, free_port, wait_for
from mailstack import metrics as m

ALICE, PASSWORD = "alice@example.test", "secret pw"

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                     r'(-?[0-9.e+]+|\+Inf|NaN)$')


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    """Text format 0.0.4 -> {(name, labels): value}; fails on any line that is not valid."""
    out: dict[tuple[str, frozenset], float] = {}
    typed: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in typed, f"{name} typed twice"
            typed.add(name)
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        assert any(name == t or name.startswith(t + "_") for t in typed), f"{name} has no TYPE"
        pairs = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
        key = (name, pairs)
        assert key not in out, f"duplicate series {line!r}"
        out[key] = float(value)
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- pure parts ----------------------------------------------------------------------------------
def test_request_head_parsing():
    assert m.parse_request_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == ("GET", "/metrics")
    assert m.parse_request_head(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n") == ("HEAD", "/metrics")
    for head, status in ((b"POST /metrics HTTP/1.1\r\n\r\n", 405), (b"GET /metrics\r\n\r\n", 400),
                         (b"\x16\x03\x01\x02\x00\x01\r\n\r\n", 400), (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
                         (b"GET /\xff HTTP/1.1\r\n\r\n", 400)):
        with pytest.raises(m.BadRequest) as e:
            m.parse_request_head(head)
        assert e.value.status == status


def test_histogram_buckets_are_cumulative_and_le_inclusive():
    h = m.Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert (h.count, h.sum) == (4, pytest.approx(7.65))


def test_reject_reasons_match_the_policy_replies():
    from mailstack.smtp import policy
    client = policy.Client(ip="192.0.2.1", listener="smtp", tls=False, auth_user=None, trusted=False)
    metrics = m.Metrics()
    metrics.smtp_reject(policy.check_recipient("x@remote.test", "remote", client))
    metrics.smtp_reject(policy.check_recipient("x@example.test", "unknown", client))
    metrics.smtp_reject(policy.check_mail_allowed(policy.Client("192.0.2.1", "submission", True, None, False)))
    metrics.smtp_reject(policy.check_sender("b@example.test", policy.Client("192.0.2.1", "smtp", True, "a", False),
                                            lambda acct, addr: False))
    metrics.smtp_reject(policy.check_declared_size(10, 5))
    metrics.smtp_reject(policy.check_recipient_count(5, 5))
    metrics.smtp_reject(policy.check_address_charset("ü@example.test", False))
    metrics.smtp_reject("999 9.9.9 something new")
    # the stages' 554 5.7.1 refusals are not relay refusals (defense/stage.py, filters/)
    metrics.smtp_reject("554 5.7.1 Service unavailable; client [192.0.2.9] blocked using zen.example")
    metrics.smtp_reject("554 5.7.1 Spam message rejected (score 9.0)")
    metrics.smtp_reject("554 5.7.1 Access denied")
    assert metrics.smtp_rejected == {"relay_denied": 1, "unknown_user": 1, "auth_required": 1,
                                     "sender_not_owned": 1, "size": 1, "too_many_recipients": 1,
                                     "smtputf8_required": 1, "other": 1, "blocklisted": 1, "spam": 1,
                                     "policy": 1}


# --- the real server -------------------------------------------------------------------------------
def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == m.CONTENT_TYPE
        return parse_exposition(r.read().decode())


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_scrape_after_real_traffic(tmp_path, loop):
    mport = free_port()
    overrides = {"metrics": {"listen": f"127.0.0.1:{mport}"}, "delivery": {"outbound": False}}
    with MailServer(tmp_path, overrides, loop=loop) as srv:
        srv.add_domain("example.test")
        srv.add_user(ALICE, PASSWORD)
        srv.start()
        url = f"http://127.0.0.1:{mport}/metrics"
        before = scrape(url)
        assert value(before, "mailstack_messages_received_total", listener="smtp") == 0
        assert value(before, "mailstack_queue_messages", state="deferred") == 0
        tls = srv.client_tls()

        # Port 25: one message in, one relay attempt, one unknown user.
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            s.ehlo("outside.test")
            s.sendmail("someone@outside.test", [ALICE], b"Subject: m\r\n\r\nhi\r\n")
            s.mail("someone@outside.test")
            assert s.rcpt("victim@remote.test")[0] == 554
            assert s.rcpt("nobody@example.test")[0] == 550
            s.rset()
        # Submission: STARTTLS, one failed login, then a message to a remote address (deferred:
        # outbound delivery is off) and a MAIL before AUTH on the port that wants it.
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
            s.starttls(context=tls)
            s.ehlo("client.test")
            assert s.mail(ALICE)[0] == 530
            bad = base64.b64encode(f"\0{ALICE}\0wrong".encode()).decode()
            assert s.docmd("AUTH", f"PLAIN {bad}")[0] == 535  # one attempt (smtplib's login tries two)
            s.login(ALICE, PASSWORD)
            s.sendmail(ALICE, ["bob@remote.test"], b"Subject: out\r\n\r\nhi\r\n")
        # Implicit TLS handshakes on imaps and pop3s, each with a failed login.
        with imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=tls, timeout=10) as imap:
            with pytest.raises(imaplib.IMAP4.error):
                imap.login(ALICE, "wrong")
        pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls, timeout=10)
        with pytest.raises(poplib.error_proto):
            pop.user(ALICE)
            pop.pass_("wrong")
        pop.quit()
        # A client that speaks plain SMTP to the implicit-TLS port: a failed handshake.
        with socket.create_connection(("127.0.0.1", srv.ports["submissions"]), timeout=10) as s:
            s.sendall(b"EHLO plain.test\r\n" * 20)
            s.recv(100)  # the server hangs up (after a TLS alert)

        wait_for(lambda: srv.inbox_messages(ALICE), 15, what="local delivery")
        after = wait_for(lambda: (lambda s: s if value(s, "mailstack_deliveries_total", status="deferred",
                                                       transport="remote") >= 1
                                  and value(s, "mailstack_tls_handshake_failures_total", listener="submissions",
                                            mode="implicit") >= 1 else None)(scrape(url)),
                         15, what="deferred delivery and the failed handshake in the metrics")

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("mailstack_messages_received_total", listener="smtp") == 1
        assert moved("mailstack_messages_received_total", listener="submission") == 1
        assert moved("mailstack_smtp_rejected_total", reason="relay_denied") == 1
        assert moved("mailstack_smtp_rejected_total", reason="unknown_user") == 1
        assert moved("mailstack_smtp_rejected_total", reason="auth_required") == 1
        assert moved("mailstack_deliveries_total", status="delivered", transport="local") == 1
        # Deferred, and retried every half second or so by the harness's queue.retry_min.
        assert moved("mailstack_deliveries_total", status="deferred", transport="remote") >= 1
        assert sum(value(after, "mailstack_queue_messages", state=st) for st in ("incoming", "active", "deferred")) == 1
        assert moved("mailstack_delivery_latency_seconds_count", transport="local") == 1
        assert value(after, "mailstack_delivery_latency_seconds_bucket", transport="local", le="+Inf") == 1
        assert 0 < value(after, "mailstack_delivery_latency_seconds_sum", transport="local") < 15
        for proto in ("smtp", "imap", "pop3"):
            assert moved("mailstack_auth_failures_total", protocol=proto) == 1, proto
        assert moved("mailstack_tls_handshakes_total", listener="submission", mode="starttls") == 1
        assert moved("mailstack_tls_handshakes_total", listener="imaps", mode="implicit") == 1
        assert moved("mailstack_tls_handshakes_total", listener="pop3s", mode="implicit") == 1
        assert moved("mailstack_tls_handshake_failures_total", listener="submissions", mode="implicit") == 1
        assert moved("mailstack_tls_handshakes_total", listener="submissions", mode="implicit") == 0
        assert moved("mailstack_tls_handshakes_started_total", listener="imaps", mode="implicit") == 1
        assert value(after, "mailstack_start_time_seconds") > 0

        # An open session shows in the gauge and the connection counter, read by curl this time.
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:  # greeted: the session is open
            s.noop()
            text = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, timeout=10, check=True).stdout
            during = parse_exposition(text)
            assert value(during, "mailstack_sessions", listener="smtp") == 1
            assert (value(during, "mailstack_connections_total", listener="smtp")
                    == value(after, "mailstack_connections_total", listener="smtp") + 1)

        # HTTP edges: other paths, other methods, HEAD, an oversized head.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10)
        assert e.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
        assert e.value.code == 405
        head = raw_http(mport, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 1000
        big = raw_http(mport, b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431 ")
        assert srv.stop() == 0


def test_metrics_off_by_default_and_bad_address_refused(tmp_path):
    from mailstack import config
    from pathlib import Path
    assert config.from_dict({}, Path(".")).metrics.listen == ""
    with pytest.raises(config.ConfigError, match=r"^metrics\.listen: "):
        config.from_dict({"metrics": {"listen": "localhost"}}, Path("."))
    # A port in use stops the start with one line naming the key.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = MailServer(tmp_path, {"metrics": {"listen": f"127.0.0.1:{port}"}}, listeners=("smtp",))
        with pytest.raises(AssertionError, match="metrics.listen: cannot listen on 127.0.0.1:.*address already in use"):
            srv.start(timeout=20)
