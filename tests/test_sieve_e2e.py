"""Sieve end to end on a running server: ManageSieve upload (sieve-connect, sievelib) ->
SMTP in -> the script files into a folder with flags -> visible over IMAP; redirect through
the outbound queue to a real SMTP sink; reject at DATA; vacation replies."""
from __future__ import annotations

import imaplib
import os
import smtplib
import ssl
import subprocess
import time

import pytest
import sievelib.managesieve as ms

from harness import HOSTNAME, MailServer, wait_for
from smtpsink import Sink, free_port_on

PASSWORD = "s3cret-pass"


@pytest.fixture(scope="module")
def sink():
    s = Sink("127.0.0.1", free_port_on("127.0.0.1")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, sink):
    srv = MailServer(tmp_path_factory.mktemp("sieve"), {
        "delivery": {"relayhost": f"[127.0.0.1]:{sink.port}"},
        "sieve": {"vacation_min_period": 0.0},
    }, listeners=("smtp", "imap", "managesieve"))
    srv.add_domain("example.test")
    for u in ("alice", "bob", "carol"):
        srv.add_user(f"{u}@example.test", PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def sieve_connect(server, user: str, *args: str, script: str | None = None, tmp=None) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.write(w, (PASSWORD + "\n").encode())
    os.close(w)
    cmd = ["sieve-connect", "--server", "127.0.0.1", "--port", str(server.ports["managesieve"]),
           "--user", user, "--passwordfd", str(r), "--notlsverify", "--authmech", "PLAIN", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, pass_fds=(r,))
    finally:
        os.close(r)


def send(server, sender: str, rcpts: list[str], body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail(sender, rcpts, body)


def imap(server, user: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    m.starttls(server.client_tls())
    m.login(user, PASSWORD)
    return m


def folder_messages(server, user: str, folder: str) -> list[tuple[bytes, bytes]]:
    """[(flags, message)] of a folder, read over IMAP."""
    m = imap(server, user)
    try:
        typ, count = m.select(f'"{folder}"', readonly=True)
        if typ != "OK" or count[0] == b"0":
            return []
        typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[])")
        out = []
        if typ == "OK" and data and data[0] is not None:
            for item in data:
                if isinstance(item, tuple):
                    out.append((item[0], item[1]))
        return out
    finally:
        m.logout()


def msg(sender: str, to: str, subject: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{time.time_ns()}@x.test>\r\n"
            f"{extra}\r\nHello.\r\n").encode()


def test_sieve_connect_upload_files_into_folder_with_flags_over_imap(server, tmp_path):
    script = tmp_path / "rules.sieve"
    script.write_text('require ["fileinto", "imap4flags", "mailbox"];\r\n'
                      'if header :contains "Subject" "[list]" {\r\n'
                      '  fileinto :create :flags ["\\\\Flagged", "$Label1"] "Lists/Dev";\r\n}\r\n')
    r = sieve_connect(server, "alice@example.test", "--upload", "--localsieve", str(script),
                      "--remotesieve", "rules")
    assert r.returncode == 0, r.stderr + r.stdout
    r = sieve_connect(server, "alice@example.test", "--activate", "--remotesieve", "rules")
    assert r.returncode == 0, r.stderr + r.stdout
    r = sieve_connect(server, "alice@example.test", "--list")
    assert "rules" in r.stdout, r.stdout + r.stderr
    send(server, "x@remote.test", ["alice@example.test"], msg("x@remote.test", "alice@example.test", "[list] hi"))
    send(server, "x@remote.test", ["alice@example.test"], msg("x@remote.test", "alice@example.test", "plain"))
    got = wait_for(lambda: folder_messages(server, "alice@example.test", "Lists/Dev"), 20, what="filed message")
    flags, body = got[0]
    assert b"\\Flagged" in flags and b"$Label1" in flags
    assert b"[list] hi" in body
    inbox = wait_for(lambda: folder_messages(server, "alice@example.test", "INBOX"), 20, what="kept message")
    assert [b for _, b in inbox if b"Subject: plain" in b]
    assert not [b for _, b in inbox if b"[list]" in b]


def test_sieve_connect_refuses_bad_script_with_line(server, tmp_path):
    script = tmp_path / "bad.sieve"
    script.write_text('require "fileinto";\r\nif true {\r\n  fileinto :create "x";\r\n}\r\n')
    r = sieve_connect(server, "alice@example.test", "--upload", "--localsieve", str(script), "--remotesieve", "bad")
    assert r.returncode != 0
    assert "line 3" in (r.stderr + r.stdout), r.stderr + r.stdout


def _sievelib(server, user="bob@example.test") -> ms.Client:
    ctx = ssl.create_default_context(cafile=str(server.cert_path))
    ctx.check_hostname = False
    orig = ms.ssllib.create_default_context
    ms.ssllib.create_default_context = lambda *a, **k: ctx  # trust the test server's own certificate
    try:
        c = ms.Client("127.0.0.1", server.ports["managesieve"], srvhostname=HOSTNAME)
        assert c.connect(user, PASSWORD, starttls=True, authmech="PLAIN")
    finally:
        ms.ssllib.create_default_context = orig
    return c


def test_sievelib_all_commands_and_next_delivery(server):
    c = _sievelib(server)
    try:
        assert "fileinto" in c.get_sieve_capabilities()
        assert c.havespace("s1", 100)
        assert not c.havespace("s1", 10 * 1024 * 1024)
        assert c.putscript("s1", 'require "fileinto";\r\nfileinto "Archive";\r\n')
        assert not c.putscript("s2", "if true {\r\n")
        assert c.checkscript('keep;\r\n')
        assert not c.checkscript('frobnicate;\r\n')
        assert c.setactive("s1")
        active, others = c.listscripts()
        assert active == "s1"
        assert "Archive" in c.getscript("s1")
        assert c.renamescript("s1", "s3")
        active, others = c.listscripts()
        assert active == "s3"
        assert not c.deletescript("s3")  # the active script cannot be deleted
        send(server, "y@remote.test", ["bob@example.test"], msg("y@remote.test", "bob@example.test", "to archive"))
        got = wait_for(lambda: folder_messages(server, "bob@example.test", "Archive"), 20, what="archived")
        assert b"to archive" in got[0][1]
        assert c.setactive("")
        assert c.deletescript("s3")
        assert c.listscripts() == (None, [])
    finally:
        c.logout()


def test_authenticate_needs_tls_and_good_password(server):
    import socket
    with socket.create_connection(("127.0.0.1", server.ports["managesieve"]), timeout=10) as s:
        f = s.makefile("rwb")
        greeting = b""
        while not greeting.endswith(b'ManageSieve ready"\r\n'):
            greeting += f.readline()
        assert b'"STARTTLS"' in greeting and b'"SASL" ""' in greeting
        f.write(b'AUTHENTICATE "PLAIN" "AGJvYkBleGFtcGxlLnRlc3QAczNjcmV0LXBhc3M="\r\n')
        f.flush()
        assert f.readline().startswith(b"NO (ENCRYPT-NEEDED)")
        f.write(b"LISTSCRIPTS\r\n")
        f.flush()
        assert f.readline().startswith(b"NO")
        f.write(b"NOOP \"t1\"\r\nLOGOUT\r\n")
        f.flush()
        assert f.readline() == b'OK (TAG "t1") "Done"\r\n'
        assert f.readline().startswith(b"OK")


def test_redirect_leaves_through_the_outbound_queue_with_the_sender_in_srs(server, sink):
    server.cli("sieve", "put", "carol@example.test", "fwd", input='redirect "carol@elsewhere.test";\n')
    server.cli("sieve", "activate", "carol@example.test", "fwd")
    send(server, "z@remote.test", ["carol@example.test"], msg("z@remote.test", "carol@example.test", "fwd me"))
    wait_for(lambda: [m for m in sink.messages if "carol@elsewhere.test" in m.rcpt_tos], 30, what="redirect")
    m = [m for m in sink.messages if "carol@elsewhere.test" in m.rcpt_tos][0]
    assert b"fwd me" in m.content and b"Delivered-To: carol@example.test" in m.content
    # Forwarded with the original sender, rewritten by SRS so SPF passes at the next hop
    # (senderauth.srs); a bounce to it goes back to z@remote.test.
    from mailstack.senderauth.srs import SRS, load_keys
    assert m.mail_from.startswith("SRS0=")
    assert SRS(load_keys(server.data_dir), HOSTNAME).reverse(m.mail_from) == "z@remote.test"
    assert not server.inbox_messages("carol@example.test")


def test_reject_at_data_for_a_single_recipient(server):
    server.cli("sieve", "put", "carol@example.test", "rej",
               input='require "reject";\nif header :contains "Subject" "spam" { reject "Go away"; }\n')
    server.cli("sieve", "activate", "carol@example.test", "rej")
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(server, "z@remote.test", ["carol@example.test"], msg("z@remote.test", "carol@example.test", "spam!"))
    assert e.value.smtp_code == 550 and b"Go away" in e.value.smtp_error


def test_an_account_without_scripts_is_filtered_from_the_next_message_on(server):
    """The server remembers that an account has no script (scripts.NoScripts) instead of reading
    its folder for every message; an upload over ManageSieve and a change with the CLI apply
    to the very next message all the same."""
    user = "dave@example.test"
    server.add_user(user, PASSWORD)

    def spam(n: int) -> None:
        send(server, "z@remote.test", [user], msg("z@remote.test", user, f"spam {n}"))
    spam(1)  # no script: accepted, and remembered
    c = _sievelib(server, user)
    try:
        assert c.putscript("rej", 'require "reject";\r\nif header :contains "Subject" "spam" { reject "Go away"; }\r\n')
        assert c.setactive("rej")
        with pytest.raises(smtplib.SMTPDataError) as e:
            spam(2)
        assert e.value.smtp_code == 550 and b"Go away" in e.value.smtp_error
        assert c.setactive("")
    finally:
        c.logout()
    spam(3)  # none active again: accepted, remembered
    server.cli("sieve", "activate", user, "rej")
    with pytest.raises(smtplib.SMTPDataError):
        spam(4)
    server.cli("sieve", "deactivate", user)
    spam(5)
    got = {m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in server.inbox_messages(user)}
    assert got == {b"spam 1", b"spam 3", b"spam 5"}


def test_vacation_once_per_sender_not_to_lists(server):
    server.cli("sieve", "put", "bob@example.test", "away",
               input='require "vacation";\nvacation :days 1 :subject "Away" "I am away.";\n')
    server.cli("sieve", "activate", "bob@example.test", "away")
    send(server, "alice@example.test", ["bob@example.test"], msg("alice@example.test", "bob@example.test", "q1"))
    send(server, "alice@example.test", ["bob@example.test"], msg("alice@example.test", "bob@example.test", "q2"))
    send(server, "alice@example.test", ["bob@example.test"],
         msg("alice@example.test", "bob@example.test", "list", "List-Id: <l.example.test>\r\n"))
    wait_for(lambda: len([m for m in server.inbox_messages("bob@example.test") if b"Subject: q" in m
                          or b"Subject: list" in m]) == 3, 20, what="three deliveries")

    def replies():
        return [m for m in server.inbox_messages("alice@example.test") if b"Subject: Away" in m]
    got = wait_for(replies, 20, what="vacation reply")
    assert b"Auto-Submitted: auto-replied" in got[0] and b"I am away." in got[0]
    assert b"In-Reply-To: <" in got[0]
    wait_for(lambda: queue_empty(server), 20, what="queue empty")  # any second reply would be delivered now
    assert len(replies()) == 1


def queue_empty(server) -> bool:
    q = server.data_dir / "queue"
    return not any((q / s).is_dir() and any(not n.startswith(".") for n in os.listdir(q / s))
                   for s in ("incoming", "active", "deferred"))


def test_cli_list_get_deactivate_delete(server):
    user = "carol@example.test"
    server.cli("sieve", "put", user, "one", input="keep;\n")
    server.cli("sieve", "activate", user, "one")
    assert "one  ACTIVE" in server.cli("sieve", "list", user).stdout
    assert server.cli("sieve", "get", user, "one").stdout == "keep;\n"
    r = server.cli("sieve", "delete", user, "one", check=False)
    assert r.returncode != 0 and "active" in r.stderr and "Traceback" not in r.stderr
    server.cli("sieve", "deactivate", user)
    server.cli("sieve", "delete", user, "one")
    assert "one" not in server.cli("sieve", "list", user).stdout
    r = server.cli("sieve", "put", user, "bad", input="if true {\n", check=False)
    assert r.returncode != 0 and "line 2" in r.stderr
    r = server.cli("sieve", "put", "nobody@example.test", "x", input="keep;\n", check=False)
    assert r.returncode != 0 and "no such account" in r.stderr


def test_starttls_drops_pipelined_plaintext_and_quota_is_enforced(server):
    import socket
    raw = socket.create_connection(("127.0.0.1", server.ports["managesieve"]), timeout=10)
    f = raw.makefile("rb")
    while not f.readline().startswith(b"OK"):
        pass
    raw.sendall(b"STARTTLS\r\nLOGOUT\r\n")  # the LOGOUT must not be run inside TLS
    assert f.readline().startswith(b"OK")
    tls = server.client_tls().wrap_socket(raw, server_hostname=HOSTNAME)
    t = tls.makefile("rwb")
    caps = b""
    while not caps.endswith(b'"TLS active"\r\n'):
        line = t.readline()
        assert line, caps
        caps += line
    assert b'"SASL" "PLAIN"' in caps and b"STARTTLS" not in caps
    t.write(b'AUTHENTICATE "PLAIN" {40+}\r\nAGJvYkBleGFtcGxlLnRlc3QAczNjcmV0LXBhc3M=\r\n')  # a literal
    t.flush()
    assert t.readline().startswith(b"OK")
    t.write(b"UNAUTHENTICATE\r\n")
    t.flush()
    assert t.readline().startswith(b"OK")
    t.write(b'AUTHENTICATE "PLAIN"\r\n')  # no initial response: the server asks with an empty challenge
    t.flush()
    assert t.readline() == b'""\r\n'
    t.write(b'"AGJvYkBleGFtcGxlLnRlc3QAczNjcmV0LXBhc3M="\r\n')
    t.flush()
    assert t.readline().startswith(b"OK")
    t.write(b'HAVESPACE "x" 99999999\r\n')
    t.flush()
    assert t.readline().startswith(b"NO (QUOTA/MAXSIZE)")
    t.write(b"LOGOUT\r\n")
    t.flush()
    assert t.readline().startswith(b"OK")
    tls.close()


def test_failed_logins_are_throttled_and_disconnect(server):
    import base64
    import socket
    raw = socket.create_connection(("127.0.0.1", server.ports["managesieve"]), timeout=30)
    f = raw.makefile("rb")
    while not f.readline().startswith(b"OK"):
        pass
    raw.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"OK")
    tls = server.client_tls().wrap_socket(raw, server_hostname=HOSTNAME)
    t = tls.makefile("rwb")
    while not t.readline().startswith(b"OK"):
        pass
    bad = base64.b64encode(b"\0carol@example.test\0wrong").decode()
    replies, started = [], time.monotonic()
    for _ in range(3):
        t.write(f'AUTHENTICATE "PLAIN" "{bad}"\r\n'.encode())
        t.flush()
        replies.append(t.readline())
    assert replies[0].startswith(b"NO") and replies[1].startswith(b"NO") and replies[2].startswith(b"BYE")
    assert time.monotonic() - started >= 0.05  # the throttle (auth.fail_delay 0.05 s in tests) slowed them
    tls.close()
