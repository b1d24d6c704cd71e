"""The POP3 mailbox lock (RFC 1939: the server locks the maildrop for one session at a time)."""
from __future__ import annotations

import asyncio
import fcntl
import os
import urllib.parse


class MailboxLocks:
    """One POP3 session per mailbox: an in-process table plus an flock()ed file, so that
    another process on the same data directory is kept out as well."""

    def __init__(self, lock_dir: os.PathLike | str) -> None:
        self.lock_dir = os.fspath(lock_dir)
        self._held: dict[str, int] = {}  # account -> fd (-1 while the file lock is being taken)

    def _path(self, account: str) -> str:
        return os.path.join(self.lock_dir, urllib.parse.quote(account, safe="@.-_+") + ".lock")

    def _take_file_lock(self, account: str) -> int | None:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        fd = os.open(self._path(account), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def acquire(self, account: str) -> bool:
        if account in self._held:
            return False
        self._held[account] = -1  # reserve before the await: two logins cannot both pass
        try:
            fd = await asyncio.to_thread(self._take_file_lock, account)
        except BaseException:
            del self._held[account]
            raise
        if fd is None:
            del self._held[account]
            return False
        self._held[account] = fd
        return True

    def release(self, account: str) -> None:
        fd = self._held.pop(account, None)
        if fd is not None and fd >= 0:
            os.close(fd)  # closing the descriptor drops the flock; the file stays (no unlink race)

    def held(self, account: str) -> bool:
        return account in self._held
