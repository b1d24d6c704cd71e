"""A full disk: every write path answers NO [OVERQUOTA] / -ERR with a clear text, leaves
nothing half-made, and the session goes on.  The disk is real: a 64 MiB tmpfs mounted for
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
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(fs)], check=True)
    srv = None
    try:
        srv = InProcessIMAP(fs, PLAIN, pop3=True, pop3_overrides=PLAIN)
        for i in range(3):
            srv.deliver(ALICE, msg(i))
        # their index entries and full-text rows are written in a batch after (derived.py)
        srv.call(srv.services.store.group_writer.settled())
        # The UID list of Trash ends exactly at the end of its last page: the next UIDs
        # (a COPY or MOVE into Trash) need a new page of the full disk.  (A line without
        # " :" is ignored by the UID list's reader.)
        uidlist = maildir_path(Path(srv.cfg.server.data_dir), ALICE) / ".Trash" / "mailstack-uidlist"
        size = uidlist.stat().st_size
        with open(uidlist, "ab") as f:
            f.write(b"#" * ((-size - 1) % 4096) + b"\n")
        assert uidlist.stat().st_size % 4096 == 0
        filler = fs / "filler"
        # Unbuffered, down to single bytes: a buffered file would keep the tail of the
        # last refused write and raise ENOSPC again when closed.
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (65536, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError:
                    pass
        finally:
            os.close(fd)
        yield srv, filler
    finally:
        if srv is not None:
            srv.close()
        if subprocess.run(["umount", str(fs)]).returncode:
            subprocess.run(["umount", "-l", str(fs)])


def untagged_expunge(lines) -> list[bytes]:
    return [x for x in lines if x.endswith(b" EXPUNGE")]


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
    trash = inbox / ".Trash"
    lines, tagged = r.cmd("COPY 1:3 Trash")  # the links are made, the UIDs cannot be: undone
    assert b"NO [OVERQUOTA]" in tagged, tagged
    assert files(trash) == set()
    lines, tagged = r.cmd("MOVE 2 Trash")  # moved back where it was
    assert b"NO [OVERQUOTA]" in tagged and not untagged_expunge(lines), (lines, tagged)
    assert files(trash) == set() and files(inbox) == before
    lines, _ = r.cmd("FETCH 2 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"UID 2 " in lines[0] and b"hello 1" in lines[0]
    # the subscriptions file is rewritten: refused whole, nothing renamed
    lines, tagged = r.cmd("RENAME Archive Old")
    assert re.search(rb"^t\d+ (OK|NO \[OVERQUOTA\])", tagged), tagged
    listed = b"\n".join(r.cmd('LIST "" "*"')[0])
    lsubbed = b"\n".join(r.cmd('LSUB "" "*"')[0])
    if b"NO" in tagged:
        assert b'"/" Archive' in listed and b'"/" Old' not in listed
    else:
        assert b'"/" Old' in listed and b'"/" Old' in lsubbed
    lines, tagged = r.cmd("UNSUBSCRIBE Drafts")
    assert re.search(rb"^t\d+ (OK|NO \[OVERQUOTA\])", tagged), tagged
    assert b"OK" in r.cmd("NOOP")[1]  # the session goes on

    # POP3: DELE + QUIT on the full disk removes the message and says +OK
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=10)
    p.user(ALICE)
    p.pass_(PW)
    left = len([f for f in files(inbox) if not f.startswith("tmp/")])
    assert p.stat()[0] == left
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
