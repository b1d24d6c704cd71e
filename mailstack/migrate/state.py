"""The import journal: which source messages are already in mailstack.

One append-only file per (account, source) under <data_dir>/migrate/, one line per copied
message:

    <folder>\t<source uidvalidity>\t<source uid>\t<destination mailbox>\t<destination uid>

A line is written after the store has the message durably (store.append returns after the
fsyncs), and the file is fsynced every FSYNC_EVERY lines and at the end of each folder.  A
crash (Ctrl-C, kill -9) can therefore lose the last few lines: the messages they describe are
in the destination with UIDs above the highest destination UID the journal knows, so a rerun
reads those few messages' Message-ID and size and recognises them (imap.py).  Only one folder's
lines are in memory at a time.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

FSYNC_EVERY = 50


@dataclass
class FolderState:
    done: set[int] = field(default_factory=set)  # source UIDs copied
    max_dest_uid: int = 0  # highest destination UID recorded (for the crash window check)


def esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


class Journal:
    def __init__(self, data_dir: Path, account: str, source: str) -> None:
        digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
        self.dir = Path(data_dir) / "migrate"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / f"{account}.{digest}.journal"
        self._fd: int | None = None
        self._unsynced = 0

    def load(self, folder: str, uidvalidity: int, dest: str) -> FolderState:
        st = FolderState()
        key = f"{esc(folder)}\t{uidvalidity}\t"
        try:
            f = open(self.path, "r", encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return st
        with f:
            for line in f:
                if not line.startswith(key) or not line.endswith("\n"):
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 5 or not parts[2].isdigit() or not parts[4].isdigit():
                    continue
                st.done.add(int(parts[2]))
                if parts[3] == esc(dest):
                    st.max_dest_uid = max(st.max_dest_uid, int(parts[4]))
        return st

    def keys(self, folder: str, uidvalidity: int) -> set[str]:
        """The source keys recorded for a folder, as text (for sources whose messages are
        known by name rather than UID: a Maildir file's base name)."""
        out = set()
        prefix = f"{esc(folder)}\t{uidvalidity}\t"
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(prefix) and line.endswith("\n"):
                        out.add(line.split("\t")[2])
        except FileNotFoundError:
            pass
        return out

    def record(self, folder: str, uidvalidity: int, uid: int | str, dest: str, dest_uid: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        line = f"{esc(folder)}\t{uidvalidity}\t{esc(str(uid))}\t{esc(dest)}\t{dest_uid}\n".encode("utf-8")
        os.write(self._fd, line)
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0

    def close(self) -> None:
        self.sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
