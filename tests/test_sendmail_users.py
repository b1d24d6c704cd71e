"""`sendmail` for every user of the host: a normal local user (not root, not the server's user)
submits through the server's public socket and is known by SO_PEERCRED (no setuid); `-f` is
only for root and trusted users; `-bs` and `-bv` work; `mailq` lists the queue for them;
`newaliases` is a harmless no-op; errors are one line.  Needs root to create the user."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import HOSTNAME, MailServer, wait_for
from test_privileges import _open_path_to_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root): creates a local user")

ROOT = Path(__file__).resolve().parent.parent
ALICE = "alice@example.test"


@pytest.fixture(scope="module")
def world():
    name = f"mssend{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    opened = _open_path_to_python()
    base = Path(tempfile.mkdtemp(prefix="mailstack-sendmail-", dir="/tmp"))
    os.chmod(base, 0o711)
    srv = MailServer(base, listeners=("smtp",), overrides={"sendmail": {"trusted_users": []}})
    os.chmod(srv.config_path, 0o644)
    try:
        srv.add_domain("example.test")
        srv.add_user(ALICE, "pw")
        srv.start()
        yield srv, pwd.getpwnam(name)
    finally:
        srv.kill()
        for path, mode in opened:
            os.chmod(path, mode)
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def as_user(world, script: str, *args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """Run a console script (`sendmail`, `mailq`, `newaliases`) as the plain local user."""
    srv, pw = world
    code = (f"import sys; sys.argv[0] = {script!r}; from mailstack.cli import {script}_main; "
            f"sys.exit({script}_main())")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "MAILSTACK_CONFIG": str(srv.config_path),
           "HOME": "/"}
    return subprocess.run([sys.executable, "-c", code, *args], input=input, capture_output=True, timeout=60,
                          user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=env, cwd="/")


def test_plain_user_submits_and_is_known_by_peer_credentials(world):
    srv, pw = world
    r = as_user(world, "sendmail", "-i", ALICE, input=b"Subject: from a plain user\n\nhello\n")
    assert r.returncode == 0, r.stderr
    msg = wait_for(lambda: next((m for m in srv.inbox_messages(ALICE) if b"from a plain user" in m), None),
                   what="delivery")
    assert f"(mailstack, from userid {pw.pw_uid})".encode() in msg
    assert f"From: {pw.pw_name}@{HOSTNAME}".encode() in msg or f"<{pw.pw_name}@{HOSTNAME}>".encode() in msg
    srv.wait_log(f"uid={pw.pw_uid} from=<{pw.pw_name}@{HOSTNAME}> (local submission)")
    # cron's habit: mail to `root` (root@<hostname>) reaches the postmaster account, not the internet
    r = as_user(world, "sendmail", "root", input=b"Subject: cron says hi\n\nx\n")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any(b"cron says hi" in m for m in srv.inbox_messages(ALICE)), what="root's mail at postmaster")
    srv.wait_log(f"to=<{ALICE}>, orig_to=<root@{HOSTNAME}>, relay=local")


def test_f_refused_for_plain_users(world):
    r = as_user(world, "sendmail", "-f", "ceo@example.test", ALICE, input=b"Subject: forged\n\nx\n")
    assert r.returncode == 77 and b"may not set the envelope sender" in r.stderr
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr


def test_bs_smtp_on_stdin_stdout(world):
    srv, pw = world
    own = f"{pw.pw_name}@{HOSTNAME}"
    session = (f"EHLO local\r\nMAIL FROM:<ceo@example.test>\r\nMAIL FROM:<{own}>\r\nRCPT TO:<{ALICE}>\r\n"
               "DATA\r\nSubject: via -bs\r\n\r\n..dot\r\n.\r\nQUIT\r\n").encode()
    r = as_user(world, "sendmail", "-bs", input=session)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().split("\r\n")
    assert lines[0].startswith("220 ") and any(x.startswith("553 5.7.1 <ceo@example.test>") for x in lines)
    assert any(x.startswith("250 2.0.0 Ok: queued as ") for x in lines) and "221 2.0.0 Bye" in lines
    msg = wait_for(lambda: next((m for m in srv.inbox_messages(ALICE) if b"via -bs" in m), None), what="-bs mail")
    assert msg.endswith(b"\r\n.dot\r\n")


def test_bv_mailq_newaliases(world):
    srv, _ = world
    r = as_user(world, "sendmail", "-bv", ALICE, "postmaster", "ghost@example.test", "x@remote.test")
    out = r.stdout.decode()
    assert f"{ALICE}: deliverable: local account {ALICE}" in out
    assert f"postmaster@{HOSTNAME}: deliverable: local account {ALICE}" in out
    assert "ghost@example.test: undeliverable: user unknown" in out
    assert "x@remote.test: deliverable: remote via the MX hosts of remote.test" in out
    assert r.returncode == 67  # one undeliverable (EX_NOUSER), as sendmail -bv
    r = as_user(world, "mailq")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"Mail queue is empty" in r.stdout or b"Request" in r.stdout
    r = as_user(world, "newaliases")
    assert r.returncode == 0 and b"nothing to do" in r.stdout


def test_plain_user_with_server_stopped_gets_one_line(world):
    srv, _ = world
    assert srv.stop() == 0
    try:
        r = as_user(world, "sendmail", ALICE, input=b"Subject: x\n\nx\n")
        assert r.returncode == 75 and b"not running" in r.stderr
        assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
        r = as_user(world, "mailq")
        assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    finally:
        srv.start()


@pytest.mark.parametrize("args", [("user", "list"), ("queue", "show", "0123456789ABCD"), ("queue", "delete", "ALL"),
                                  ("status",), ("queue", "cat", "0123456789ABCD"), ("domain", "add", "x.test")])
def test_cli_errors_for_a_plain_user_are_one_line(world, args):
    srv, pw = world
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "MAILSTACK_CONFIG": str(srv.config_path),
           "HOME": "/"}
    r = subprocess.run([sys.executable, "-m", "mailstack", *args], capture_output=True, timeout=60,
                       user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=env, cwd="/")
    assert r.returncode != 0 and b"Traceback" not in r.stderr + r.stdout, r.stderr
    err = (r.stderr or r.stdout).decode()
    assert err.count("\n") == 1 and ("Permission denied" in err or "permission" in err.lower()), err
