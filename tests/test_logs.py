"""Logs of the real server process: one event per line on stderr, JSON when configured,
with the queue id and the client address on the lines that have them."""
from __future__ import annotations

import json
import logging
import re
import smtplib
import socket

import pytest

from harness import MailServer, wait_for
from mailstack import logs

ALICE, PASSWORD = "alice@example.test", "secret pw"
FORGED = "2030-01-01T00:00:00 info smtp: forged"


def traffic(srv: MailServer) -> str:
    """A message in on port 25 (delivered locally), and a failed IMAP login whose user name,
    sent as a literal, holds a line break. Returns the queue id."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.ehlo("outside.test")
        code, reply = s.docmd("MAIL", "FROM:<someone@outside.test>")
        assert code == 250
        assert s.rcpt(ALICE)[0] == 250
        code, reply = s.data(b"Subject: logs\r\n\r\nhi\r\n")
        assert code == 250
    qid = re.search(rb"queued as (\S+)", reply).group(1).decode()
    wait_for(lambda: srv.inbox_messages(ALICE), 15, what="delivery")
    user = f"x\r\n{FORGED}".encode()
    with socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=10) as raw:
        with srv.client_tls().wrap_socket(raw) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"* OK")
            s.sendall(b"a LOGIN {%d+}\r\n%s pw\r\n" % (len(user), user))
            assert f.readline().startswith(b"a NO [AUTHENTICATIONFAILED]")
            s.sendall(b"b LOGOUT\r\n")
            assert f.readline().startswith(b"* BYE")
    return qid


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_json_logs_every_line_parses_and_carries_qid_and_client(tmp_path, loop):
    with MailServer(tmp_path, {"server": {"log_format": "json"}}, loop=loop) as srv:
        srv.add_domain("example.test")
        srv.add_user(ALICE, PASSWORD)
        srv.start()
        qid = traffic(srv)
        # The delivery line is written just after the file lands in the Maildir.
        wait_for(lambda: "status=sent" in srv.log(), 10, what="the delivery line")
        assert srv.stop() == 0
    lines = srv.log().splitlines()
    assert len(lines) > 5
    events = []
    for line in lines:
        event = json.loads(line)  # every line, not only ours
        assert {"time", "level", "component", "message"} <= event.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
        events.append(event)
    [received] = [e for e in events if e.get("qid") == qid and "(queued)" in e["message"]]
    assert received["client"] == "127.0.0.1"
    assert received["component"] == "smtp" and "from=<someone@outside.test>" in received["message"]
    [delivered] = [e for e in events if e.get("qid") == qid and "status=sent" in e["message"]]
    assert f"to=<{ALICE}>" in delivered["message"] and "relay=local" in delivered["message"]
    # one line for the failed login, the login guard's (defense), with the client
    [failed] = [e for e in events if "login failed" in e["message"]]
    assert failed["component"] == "defense" and "protocol=imap" in failed["message"]
    assert failed["client"] == "127.0.0.1" and FORGED in failed["message"]
    assert any(e["message"] == "stopped" for e in events)


def test_text_logs_one_event_per_line_with_qid_and_client(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.add_domain("example.test")
        srv.add_user(ALICE, PASSWORD)
        srv.start()
        qid = traffic(srv)
        wait_for(lambda: "status=sent" in srv.log(), 10, what="the delivery line")
        assert srv.stop() == 0
    lines = srv.log().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (debug|info|warning|error|critical) ", ln)
               for ln in lines), lines
    assert any(f"smtp: [127.0.0.1] {qid}: from=<someone@outside.test>" in ln and "(queued)" in ln for ln in lines)
    assert any(f"queue: {qid}: to=<{ALICE}>" in ln and "status=sent" in ln for ln in lines)
    # The line break in the user name is shown escaped, inside the one line of its event.
    assert not any(ln.startswith(FORGED) for ln in lines)
    assert any("login failed" in ln and "x\\r\\n" + FORGED in ln for ln in lines)


def test_formatters_keep_one_event_per_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys
        exc = sys.exc_info()
    record = logging.LogRecord("mailstack.imap", logging.ERROR, __file__, 1, "user %s", ("a\r\nb",), exc)
    record.qid, record.client = "Q1", "192.0.2.7"
    text = logs.TextFormatter().format(record)
    assert "\n" not in text and "\r" not in text
    assert " error imap: [192.0.2.7] Q1: user a\\r\\nb | Traceback" in text
    event = json.loads(logs.JSONFormatter().format(record))
    assert (event["qid"], event["client"], event["message"]) == ("Q1", "192.0.2.7", "user a\r\nb")
    assert "boom" in event["exception"]
