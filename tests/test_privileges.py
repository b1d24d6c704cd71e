"""Least privilege: started as root with server.user set, the real server binds, reads its
keys, then becomes that user before it accepts a connection; what it writes is private.

Needs root (to create a user and to switch to it).  CI runs as root; elsewhere these
tests are skipped with that reason.
"""
from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import mailstack
from harness import MailServer, wait_for, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root): the test creates a system user and starts the server as root to see it drop to that user")

ROOT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def user():
    """A system user made for these tests, removed afterwards."""
    name = f"mstest{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    opened = _open_path_to_python()
    try:
        yield pwd.getpwnam(name)
    finally:
        for path, mode in opened:
            os.chmod(path, mode)
        subprocess.run(["userdel", name], check=True, capture_output=True)


def _open_path_to_python() -> list[tuple[str, int]]:
    """The unprivileged user must be able to run this Python and import mailstack (a Python
    under /root, mode 0700, is out of its reach).  Lets it through (search permission only)
    the directories on the way that refuse it, for the duration of the tests."""
    opened = []
    for target in (os.path.realpath(sys.executable), sys.prefix, os.path.dirname(mailstack.__file__)):
        path = Path(target)
        for d in [*reversed(path.parents), path] if path.is_dir() else reversed(path.parents):
            mode = os.stat(d).st_mode
            if not mode & stat.S_IXOTH:
                opened.append((str(d), stat.S_IMODE(mode)))
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
    return opened


@pytest.fixture
def base_dir():
    """A test directory the user can pass through (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="mailstack-priv-", dir="/tmp"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _ids(pid: int, field: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_root_start_drops_to_server_user_and_keeps_files_private(user, base_dir):
    srv = MailServer(base_dir, loop="uvloop", overrides={"server": {"user": user.pw_name}})
    srv.add_domain("example.test")
    srv.add_user("alice@example.test", "secret")  # as root, before the first start
    srv.start()
    try:
        pid = srv.proc.pid
        assert _ids(pid, "Uid") == [user.pw_uid] * 4  # real, effective, saved, filesystem
        assert _ids(pid, "Gid") == [user.pw_gid] * 4
        assert 0 not in _ids(pid, "Groups")
        log = srv.wait_log("mailstack ready")  # switched before the listeners started accepting
        assert log.index(f"running as user {user.pw_name}") < log.index("mailstack ready")

        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as smtp:
            smtp.sendmail("someone@remote.example", ["alice@example.test"],
                          b"Subject: after the drop\r\nMessage-ID: <dropped@test>\r\n\r\nhello\r\n")
        wait_for(lambda: any(b"<dropped@test>" in m for m in srv.inbox_messages("alice@example.test")),
                 what="delivery by the unprivileged server")

        control = srv.data_dir / "control.sock"
        st = os.stat(control)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == user.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
        assert "queue" in srv.cli("status").stdout  # root's CLI still reaches the server

        # An account added by root while the server runs stays readable by the server.
        srv.add_user("bob@example.test", "hunter2")
        assert os.stat(srv.data_dir / "accounts").st_uid == user.pw_uid

        def bob_logs_in():
            with imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.client_tls(), timeout=10) as imap:
                try:
                    return imap.login("bob@example.test", "hunter2")[0] == "OK"
                except imaplib.IMAP4.error:
                    return False
        wait_for(bob_logs_in, 10, interval=0.2, what="bob's login")

        exposed = []
        for dirpath, dirnames, filenames in os.walk(srv.data_dir):
            for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                st = os.lstat(name)
                if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != user.pw_uid:
                    exposed.append(f"{name} {stat.filemode(st.st_mode)} uid={st.st_uid}")
        assert not exposed, "not private to the server's user:\n" + "\n".join(exposed)
    finally:
        assert srv.stop() == 0


def _free_privileged_port() -> int:
    for port in range(1023, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def test_port_below_1024_without_privilege_is_one_clear_line(user, base_dir):
    base = base_dir
    data = base / "data"
    data.mkdir(mode=0o700)
    os.chown(data, user.pw_uid, user.pw_gid)
    port = _free_privileged_port()
    config = write_config(base / "config.toml", {
        "server": {"hostname": "mail.example.test", "data_dir": str(data)},
        "listen": {name: [f"127.0.0.1:{port}"] if name == "smtp" else []
                   for name in ("smtp", "submissions", "submission", "imap", "imaps", "pop3", "pop3s",
                                "managesieve")},
    })
    os.chmod(config, 0o644)
    result = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         sys.executable, "-m", "mailstack", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=ROOT_DIR,
        env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    errors = [line for line in output.splitlines() if " error " in line]
    assert len(errors) == 1, output
    assert errors[0].endswith(f"cannot start: listen.smtp: cannot listen on 127.0.0.1:{port}: permission denied "
                              "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"), output
    assert "Traceback" not in output


def test_default_start_as_root_never_keeps_root(base_dir, tmp_path):
    """server.user defaults to `mailstack`: created as a system user when missing (and said in the
    log), then the server runs as it.  Where that user cannot reach data_dir, the start is refused
    in one line that says what to do, rather than running as root."""
    existed = True
    try:
        pwd.getpwnam("mailstack")
    except KeyError:
        existed = False
    opened = _open_path_to_python()
    try:
        srv = MailServer(base_dir, listeners=("smtp",), overrides={"server": {"user": ""}})
        srv.start()
        try:
            pw = pwd.getpwnam("mailstack")
            assert _ids(srv.proc.pid, "Uid") == [pw.pw_uid] * 4 and pw.pw_uid != 0
            if not existed:
                srv.wait_log("created system user mailstack")
        finally:
            assert srv.stop() == 0
        # tmp_path (root's, mode 0700) is out of the user's reach: refused, one line, not root
        refused = MailServer(tmp_path, listeners=("smtp",), overrides={"server": {"user": ""}})
        r = refused.cli("serve", check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "server.user: 'mailstack' cannot reach" in out and "Traceback" not in out
    finally:
        for path, mode in opened:
            os.chmod(path, mode)
        if not existed:
            subprocess.run(["userdel", "mailstack"], capture_output=True)
