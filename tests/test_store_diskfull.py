"""A full disk: every write path answers NO [OVERQUOTA] / -ERR with a clear text, leaves
nothing half-made, and the session goes on.  The disk is real: a 4 MiB tmpfs mounted for
the test (root, as the test command runs) and filled with a file."""
from __future__ import annotations

import os
import poplib
import re
import subprocess
from pathlib import Path

import pytest

from harness import maildir_path
from imap_fixtures import InProcessIMAP
from test_imap_session import ALICE, PW, Raw, msg

PLAIN = {"allow_plaintext_auth": True}


@pytest.fixture
def full(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the test command runs as root)")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(fs)], check=True)
    srv = None
    try:
        srv = InProcessIMAP(fs, PLAIN, pop3=True, pop3_overrides=PLAIN)
        for i in range(3):
            srv.deliver(ALICE, msg(i))
        filler = fs / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        yield srv, filler
    finally:
        if srv is not None:
            srv.close()
        if subprocess.run(["umount", str(fs)]).returncode:
            subprocess.run(["umount", "-l", str(fs)])


def files(path: Path) -> set[str]:
    return {f"{sub}/{n}" for sub in ("tmp", "new", "cur") for n in os.listdir(path / sub)}


def test_full_disk_answers_and_leaves_nothing_behind(full):
    srv, filler = full
    inbox = maildir_path(Path(srv.cfg.server.data_dir), ALICE)
    before = files(inbox)
    names_before = set(os.listdir(inbox))
    r = Raw(srv)
    lines, tagged = r.cmd("CREATE Projects/2024/Q1")
    assert b"NO [OVERQUOTA] Not enough disk space" in tagged, tagged
    assert set(os.listdir(inbox)) == names_before  # no half-made folder, no parent left
    lines, _ = r.cmd('LIST "" "Projects*"')
    assert lines == []
    big = msg(9) + b"x" * 300_000 + b"\r\n"
    r.n += 1
    r.send(b"t%d APPEND INBOX {%d+}\r\n" % (r.n, len(big)) + big + b"\r\n")
    tagged = r.until(b"t%d" % r.n)[1]
    assert b"NO [OVERQUOTA]" in tagged, tagged
    assert files(inbox) == before
    lines, tagged = r.cmd("SELECT INBOX")
    assert b"* 3 EXISTS" in lines and b"OK" in tagged
    lines, tagged = r.cmd("STORE 1 +FLAGS ($NeedsAPage)")
    assert re.search(rb"^t\d+ (OK|NO \[OVERQUOTA\])", tagged), tagged
    lines, tagged = r.cmd("COPY 1:3 Trash")
    assert re.search(rb"^t\d+ (OK|NO \[OVERQUOTA\])", tagged), tagged
    trash = inbox / ".Trash"
    if b"NO" in tagged:
        assert files(trash) == set()
    assert b"OK" in r.cmd("NOOP")[1]  # the session goes on

    # POP3: DELE + QUIT on the full disk removes the message and says +OK
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=10)
    p.user(ALICE)
    p.pass_(PW)
    assert p.stat()[0] == 3
    p.dele(1)
    assert p.quit().startswith(b"+OK")
    lines, _ = r.cmd("NOOP")
    assert b"* 1 EXPUNGE" in lines

    # with room again, the same CREATE works (no ALREADYEXISTS from a half-made folder)
    filler.unlink()
    assert b"OK" in r.cmd("CREATE Projects/2024/Q1")[1]
    r.n += 1
    r.send(b"t%d APPEND INBOX {%d+}\r\n" % (r.n, len(big)) + big + b"\r\n")
    assert b"OK [APPENDUID" in r.until(b"t%d" % r.n)[1]
