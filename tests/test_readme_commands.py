"""The README, as a new user follows it: the shell blocks of "The two commands" (the server)
and "A first message, step by step" are extracted from README.md itself and run literally,
in a copy of the project, with only the port numbers moved to free high ports (the bundled
config.toml is changed the same way).  The first command installs into .venv with
./mailstack-setup, so this also proves the console scripts exist."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import free_port, wait_for
from test_privileges import _open_path_to_python

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "a first mailstack passphrase"
PORTS = (25, 465, 587, 143, 993, 110, 995)


def sh_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def test_readme_blocks_are_the_ones_this_test_knows():
    assert sh_blocks("The two commands") == ["./mailstack-setup serve --config config.toml\n",
                                              "bash tests/run.sh\n"]
    assert len(sh_blocks("A first message, step by step")) == 3


@pytest.fixture
def project():
    """A copy of the project where the server's user (when started as root) can enter."""
    base = Path(tempfile.mkdtemp(prefix="mailstack-readme-", dir="/tmp"))
    os.chmod(base, 0o711)
    copy = base / "mailstack-checkout"
    copy.mkdir(mode=0o755)
    for name in ("mailstack", "pyproject.toml", "README.md", "config.toml", "mailstack-setup"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / name)
    opened = _open_path_to_python() if os.geteuid() == 0 else []
    try:
        pwd.getpwnam("mailstack")
        had_user = True
    except KeyError:
        had_user = False
    try:
        yield copy
    finally:
        for path, mode in opened:
            os.chmod(path, mode)
        if os.geteuid() == 0 and not had_user:
            subprocess.run(["userdel", "mailstack"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_readme_walkthrough_runs_as_written(project):
    ports = {p: free_port() for p in PORTS}
    config = project / "config.toml"
    text = config.read_text()
    for p, high in ports.items():
        text, n = re.subn(rf'"0\.0\.0\.0:{p}"', f'"127.0.0.1:{high}"', text)
        assert n == 1, p
    config.write_text(text)

    def literal(block: str) -> str:
        for p, high in ports.items():
            block = block.replace(f"127.0.0.1:{p} ", f"127.0.0.1:{high} ")
        return block

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MAILSTACK"))}
    first = sh_blocks("The two commands")[0]
    log = open(project / "server.log", "wb")
    server = subprocess.Popen(["bash", "-c", first], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def up():
        if server.poll() is not None:
            raise AssertionError(f"server exited {server.returncode}:\n{(project / 'server.log').read_text()}")
        if "mailstack ready" not in (project / "server.log").read_text(errors="replace"):
            return False  # (a free port taken by another program must not look like our server)
        try:
            socket.create_connection(("127.0.0.1", ports[587]), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(up, 300, interval=0.2, what="./mailstack-setup serve: listeners up")
        for script in ("mailstack", "sendmail", "mailq", "newaliases"):
            assert (project / ".venv" / "bin" / script).exists(), script

        steps = sh_blocks("A first message, step by step")

        def run(block: str, stdin: str = "") -> str:
            r = subprocess.run(["bash", "-e", "-c", steps[0].splitlines()[0] + "\n" + literal(block)], cwd=project,
                               env=env, input=stdin, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"{block}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
            return r.stdout + r.stderr

        out = run(steps[0], stdin=PASSWORD + "\n")  # user add reads the password (stdin: not a terminal)
        assert "account alice@example.test added" in out and "250 2.0.0 Ok: queued as" in out
        wait_for(lambda: "status=sent (delivered to maildir)" in (project / "server.log").read_text(), 30,
                 what="delivery logged")
        out = run(steps[1])
        assert "Subject: hello" in out and "first message" in out and "Received: from" in out
        out = run(steps[2], stdin=PASSWORD + "\n")  # swaks asks for the password
        assert "235 2.7.0" in out and "250 2.0.0 Ok: queued as" in out, out
        wait_for(lambda: (project / "server.log").read_text().count("status=sent (delivered to maildir)") >= 2, 30,
                 what="alice's own message delivered")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        log.close()
    assert server.returncode == 0, (project / "server.log").read_text()
