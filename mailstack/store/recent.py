"""Which messages are still \\Recent, kept per mailbox on disk (as Dovecot keeps it in its
dovecot-uidlist), so that a restart does not make every message recent again.

The file `mailstack-recent` holds "V<uidvalidity> R<highest UID a session took>".  It is
replaced atomically but not fsynced: after a crash the worst is that some messages are
recent once more.  Pure read/write helpers (blocking: called in a worker thread).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

NAME = "mailstack-recent"


def parse(data: bytes, uidvalidity: int) -> int:
    """The mark for this UIDVALIDITY; 0 when absent, unreadable or of an older UIDVALIDITY."""
    fields = {f[:1]: f[1:] for f in data.decode("ascii", "replace").split()}
    try:
        if int(fields.get("V", "0")) != uidvalidity:
            return 0
        return max(0, int(fields.get("R", "0")))
    except ValueError:
        return 0


def read(mailbox_dir: Path, uidvalidity: int) -> int:
    try:
        return parse((mailbox_dir / NAME).read_bytes()[:200], uidvalidity)
    except FileNotFoundError:
        return 0


def write(mailbox_dir: Path, uidvalidity: int, mark: int) -> None:
    tmp = mailbox_dir / f".{NAME}.{os.getpid()}.{threading.get_ident()}"
    try:
        tmp.write_bytes(b"V%d R%d\n" % (uidvalidity, mark))
        os.replace(tmp, mailbox_dir / NAME)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
