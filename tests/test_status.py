"""`mailstack status` (and the container health check built on it).

The assessment and the report are plain functions over the server's answer; the
end-to-end tests ask a real server process over its real control socket.
"""
from __future__ import annotations

import datetime
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from harness import MailServer, free_port, wait_for, write_config
from mailstack import status as st

NOW = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)


def answer(**changes) -> dict:
    """A status answer as the server gives it."""
    base = {
        "ok": True, "hostname": "mail.example.test", "pid": 4242,
        "listeners": [{"name": "smtp", "address": "0.0.0.0:25", "up": True},
                      {"name": "imaps", "address": "0.0.0.0:993", "up": True}],
        "sessions": {"smtp": 3},
        "queue": {"incoming": 0, "active": 1, "deferred": 2, "hold": 0, "maildrop": 0},
        "last_delivery_error": None,
        "certificate": {"path": "/data/tls/cert.pem", "not_after": "2031-06-01T00:00:00+00:00"},
    }
    base.update(changes)
    return base


# --- assess / render: pure ---------------------------------------------------------------------
def test_healthy_answer_has_no_problems_and_reports_everything():
    problems, warnings = st.assess(answer(), NOW)
    assert problems == [] and warnings == []
    text = st.render(answer(last_delivery_error="0ABC: to=<b@x.example>: 451 try later"), NOW)
    assert text.splitlines()[0] == "mail.example.test (pid 4242): healthy"
    assert "smtp         0.0.0.0:25             up    3 sessions" in text
    assert "imaps        0.0.0.0:993            up    0 sessions" in text
    assert "queue: incoming 0, active 1, deferred 2, hold 0, maildrop 0" in text
    assert "last delivery error: 0ABC: to=<b@x.example>: 451 try later" in text
    assert "certificate: /data/tls/cert.pem, expires 2031-06-01 00:00 UTC (515 days)" in text


def test_a_listener_down_is_unhealthy_and_named():
    down = answer(listeners=[{"name": "smtp", "address": "0.0.0.0:25", "up": True},
                             {"name": "imap", "address": "0.0.0.0:143", "up": False}])
    problems, _ = st.assess(down, NOW)
    assert problems == ["listener imap 0.0.0.0:143 is not accepting connections"]
    text = st.render(down, NOW)
    assert text.startswith("mail.example.test (pid 4242): UNHEALTHY\n")
    assert "imap         0.0.0.0:143            DOWN" in text


def test_expired_certificate_is_a_problem_and_expiring_one_a_warning():
    expired = answer(certificate={"path": "/c.pem", "not_after": "2029-12-31T00:00:00+00:00"})
    assert st.assess(expired, NOW)[0] == ["certificate /c.pem expired on 2029-12-31 00:00 UTC"]
    soon = answer(certificate={"path": "/c.pem", "not_after": "2030-01-08T12:00:00+00:00"})
    problems, warnings = st.assess(soon, NOW)
    assert problems == []
    assert warnings == ["certificate /c.pem expires in 7 days (2030-01-08): replace it, then send SIGHUP"]
    unreadable = answer(certificate={"path": "/c.pem", "not_after": None})
    assert st.assess(unreadable, NOW) == ([], ["certificate /c.pem: cannot read its expiry date"])


def test_error_answer_and_stopped_queue_manager_are_problems():
    assert st.assess({"ok": False, "error": "boom"}, NOW)[0] == ["the server answered with an error: boom"]
    nested = {"ok": True, "pid": 7, "queue": {"running": False, "states": {"deferred": 4},
                                              "stats": {"sent": 9}, "last_error": None}}
    assert st.assess(nested, NOW)[0] == ["the queue manager is not running: accepted mail is not being delivered"]
    text = st.render(nested, NOW)
    assert "queue: incoming 0, active 0, deferred 4, hold 0, maildrop 0" in text
    assert "since start: sent 9" in text
    # The server's flat counts beside the manager's own report.
    both = answer(queue_manager={"running": True, "states": {"deferred": 2}, "stats": {"sent": 5}})
    assert st.assess(both, NOW) == ([], [])
    assert "since start: sent 5" in st.render(both, NOW)
    both["queue_manager"]["running"] = False
    assert st.assess(both, NOW)[0] == ["the queue manager is not running: accepted mail is not being delivered"]


# --- the command, against real processes ----------------------------------------------------------
def run_status(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailstack", "status", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=30)


def test_no_server_running_exits_1_and_says_so(tmp_path):
    config = write_config(tmp_path / "config.toml", {"server": {"data_dir": str(tmp_path / "data")}})
    for args in ((), ("--quiet",), ("--json",)):
        result = run_status(config, *args)
        assert result.returncode == 1, result
        assert f"no server answers on {tmp_path / 'data' / 'control.sock'}" in result.stdout + result.stderr


@pytest.fixture
def server(tmp_path):
    # Remote mail goes to a relay port where nothing listens, so it is deferred with an error.
    dead_relay = free_port()
    srv = MailServer(tmp_path, overrides={"delivery": {"relayhost": f"[127.0.0.1]:{dead_relay}",
                                                       "connect_timeout": 1.0}},
                     listeners=("smtp", "imaps"))
    srv.add_domain("example.test")
    srv.start()
    yield srv
    srv.kill()


def test_running_server_reports_listeners_queue_and_certificate(server):
    result = server.cli("status")
    text = result.stdout
    assert text.splitlines()[0].startswith("mail.example.test (pid ") and text.splitlines()[0].endswith("healthy")
    assert f"127.0.0.1:{server.ports['smtp']}" in text and f"127.0.0.1:{server.ports['imaps']}" in text
    assert "DOWN" not in text
    assert "queue: incoming 0, active 0, deferred 0, hold 0, maildrop 0" in text

    # The expiry date shown is the one of the certificate the server actually serves.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(server.cert_path)
    import socket
    with socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="mail.example.test") as tls:
            served = datetime.datetime.strptime(tls.getpeercert()["notAfter"], "%b %d %H:%M:%S %Y %Z")
    assert f"expires {served:%Y-%m-%d %H:%M} UTC" in text

    quiet = server.cli("status", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    data = json.loads(server.cli("status", "--json").stdout)
    assert {item["name"] for item in data["listeners"]} == {"smtp", "imaps"}
    assert all(item["up"] for item in data["listeners"])


def test_last_delivery_error_shows_a_deferred_message(server):
    sent = server.cli("sendmail", "-f", "root@example.test", "bob@remote.example",
                      input="Subject: to a dead relay\n\nhello\n")
    assert sent.returncode == 0

    def deferred_with_error():
        out = server.cli("status").stdout
        return out if "deferred 1" in out and "last delivery error: none" not in out else None
    text = wait_for(deferred_with_error, timeout=20, interval=0.2, what="a deferred message in status")
    assert "bob@remote.example" in text.split("last delivery error:", 1)[1].splitlines()[0]
    # A deferred message is the normal life of a mail server, not a reason to restart it.
    assert server.cli("status", "--quiet").returncode == 0


def test_status_fails_once_the_server_stopped(server):
    assert server.cli("status", "--quiet").returncode == 0
    assert server.stop() == 0
    result = server.cli("status", "--quiet", check=False)
    assert result.returncode == 1
    assert "no server answers" in result.stdout
