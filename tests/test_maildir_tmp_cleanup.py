"""Files a kill left in Maildir tmp/ folders (even 0-byte ones) are removed when the server starts,
because they are older than the process, not 36 hours later; mail in new/ and cur/ is untouched."""
from __future__ import annotations

import os
import time

from harness import MailServer, wait_for
from mailstack.store.maildir import clean_stale_tmp


def test_stale_tmp_files_removed_at_start(tmp_path):
    srv = MailServer(tmp_path, listeners=("smtp",))
    srv.add_domain("example.test")
    srv.add_user("alice@example.test", "pw")
    box = srv.maildir("alice@example.test")
    stale = [box / "tmp" / "1700000000.M1P1.host", box / "tmp" / "empty", box / ".Sent" / "tmp" / "cut"]
    for i, p in enumerate(stale):
        p.write_bytes(b"" if i == 1 else b"Subject: half a messa")
    kept = box / "new" / "1700000000.M2P2.host:2,"
    kept.write_bytes(b"Subject: whole\r\n\r\nbody\r\n")
    srv.start()
    try:
        wait_for(lambda: not any(p.exists() for p in stale), 20, what="stale tmp/ files removed")
        assert kept.exists()
        wait_for(lambda: "removed 3 stale file(s) from Maildir tmp/" in srv.log(), 10, what="log line")
    finally:
        assert srv.stop() == 0


def test_files_newer_than_the_start_are_left_alone(tmp_path):
    tmp = tmp_path / "example.test" / "bob" / "tmp"
    tmp.mkdir(parents=True)
    old, young = tmp / "old", tmp / "young"
    old.write_bytes(b"")
    young.write_bytes(b"x")
    start = time.time()
    os.utime(old, (start - 5, start - 5))
    os.utime(young, (start + 1, start + 1))  # written by this process, after its start
    assert clean_stale_tmp(tmp_path, start) == 1
    assert not old.exists() and young.exists()
