"""Per-account quota: usage kept in Maildir++'s `maildirsize` file, limits from the directory.

The file is the one Courier, Dovecot, Exim and maildrop keep in the account's Maildir root
(the INBOX directory), so Dovecot pointed at the same Maildir reports the same numbers:

    1073741824S,1000C          the limits: bytes (S) and messages (C); "0S" = no limit
    52123 17                   the usage when last counted: bytes, messages
    3120 1                     then one line per change, appended: +/- bytes, +/- messages
    -3120 -1

Usage is the sum of the lines.  A change appends one short line (O_APPEND: concurrent
writers do not tear it), so a delivery never walks the Maildir.  The file is counted again
(every folder's new/ and cur/, sizes from the ",S=" in the names, stat() only without one)
and rewritten whole (tmp + rename) when it is missing, unreadable, at least 5120 bytes
long (Maildir++'s limit: some hundreds of changes), when its limits are not the current
ones, when it was last written more than 15 minutes ago, or when this process last counted
the account more than 15 minutes ago (or never: once after each start): messages added or
removed behind the server's back (a `mv` into cur/, an import, another program) are counted
within 15 minutes even in a mailbox that changes all the time.  No count starts while this
process has changes of the account under way (see Quota), and a count during which a
folder changed is not written (as Dovecot): it is done again at the next look.

Every message file counts, \\Deleted ones too, in every folder (Trash and Junk included),
as with Dovecot.  A MOVE inside the account changes nothing; COPY, APPEND and delivery
add, EXPUNGE and DELETE of a folder remove.

The blocking functions here run in worker threads; `Quota` is the async face the store,
SMTP and IMAP use.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..fsutil import atomic_write
from ..keyedlocks import KeyedLocks
from .base import StoreError

log = logging.getLogger("mailstack.store")

MAILDIRSIZE = "maildirsize"
RECALC_SIZE = 5120  # bytes: a longer file is counted again (Maildir++, Dovecot)
STALE = 15 * 60  # seconds: an older file is counted again
_DELTA_RE = re.compile(rb"^\s*(-?\d{1,20})\s+(-?\d{1,20})\s*$")
_SIZE_RE = re.compile(r"^\s*(\d{1,20})\s*([kmgt]?)(i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class QuotaExceeded(StoreError):
    """The account's quota does not allow this; nothing was changed.  `permanent`: the
    request can never fit (bigger than the whole limit), not merely not now."""

    def __init__(self, message: str = "Quota exceeded (mailbox for user is full)", permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Limits:
    storage: int = 0  # bytes; 0 = no limit
    messages: int = 0  # 0 = no limit

    @property
    def unlimited(self) -> bool:
        return not self.storage and not self.messages

    def header(self) -> str:
        """The first line of maildirsize, as Dovecot writes it ("0S" when there is no limit)."""
        parts = []
        if self.storage or not self.messages:
            parts.append(f"{self.storage}S")
        if self.messages:
            parts.append(f"{self.messages}C")
        return ",".join(parts)


@dataclass(frozen=True)
class Usage:
    storage: int = 0  # bytes
    messages: int = 0


# --------------------------------------------------------------------------- pure helpers

@functools.lru_cache(maxsize=256)  # the [quota] default is parsed at every delivery's check
def parse_size(text: str) -> int:
    """"500M", "1G", "1024", "10 KiB" -> bytes (K/M/G/T are powers of 1024).  ValueError
    with a one-line reason otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M, G or T, e.g. 500M)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    """Bytes as a short size: exact units when they fit (1G, 512M), else one decimal (1.5M)."""
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit.lower()]
        if n >= mult:
            if n % mult == 0:
                return f"{n // mult}{unit}"
            return f"{n / mult:.1f}{unit}"
    return f"{n}B"


def parse_limits(line: bytes) -> Limits | None:
    """The header line ("1000S,10C", "0S", "10C"); None when it is not one."""
    storage = messages = 0
    for part in line.strip().split(b","):
        part = part.strip()
        if len(part) < 2 or not part[:-1].isdigit():
            return None
        value = int(part[:-1])
        if part.endswith(b"S"):
            storage = value
        elif part.endswith(b"C"):
            messages = value
        else:
            return None
    return Limits(storage, messages)


def parse_maildirsize(data: bytes) -> tuple[Limits, Usage, int] | None:
    """(limits of the header, usage summed, number of usage lines); None when the file is
    broken (no header, a malformed line, a negative sum: count again)."""
    if not data.endswith(b"\n") or b"\0" in data:
        return None
    lines = data.split(b"\n")[:-1]
    if not lines:
        return None
    limits = parse_limits(lines[0])
    if limits is None:
        return None
    storage = messages = 0
    for line in lines[1:]:
        m = _DELTA_RE.match(line)
        if not m:
            return None
        storage += int(m.group(1))
        messages += int(m.group(2))
    if storage < 0 or messages < 0 or len(lines) < 2:
        return None
    return limits, Usage(storage, messages), len(lines) - 1


def percent(usage: Usage, limits: Limits) -> float:
    """How full the fuller of the two resources is, in percent (0 without limits)."""
    fills = []
    if limits.storage:
        fills.append(100.0 * usage.storage / limits.storage)
    if limits.messages:
        fills.append(100.0 * usage.messages / limits.messages)
    return max(fills, default=0.0)


def refusal(usage: Usage, limits: Limits, storage: int, messages: int) -> QuotaExceeded | None:
    """Why adding `messages` messages of `storage` bytes would break the limits (None if not)."""
    if limits.storage and storage > limits.storage or limits.messages and messages > limits.messages:
        return QuotaExceeded("Quota exceeded (message too large for the mailbox)", permanent=True)
    if (limits.storage and usage.storage + storage > limits.storage
            or limits.messages and usage.messages + messages > limits.messages):
        return QuotaExceeded()
    return None


def over(usage: Usage, limits: Limits) -> bool:
    """Full already: not even a message of one byte fits."""
    return refusal(usage, limits, 1, 1) is not None


# --------------------------------------------------------------------------- blocking (threads)

def _folder_dirs(account_dir: Path) -> list[Path]:
    """INBOX and every Maildir++ folder (".Name" directories) of the account."""
    out = [account_dir]
    try:
        with os.scandir(account_dir) as it:
            for de in it:
                if de.name.startswith(".") and de.name not in (".", "..") and de.is_dir(follow_symlinks=False):
                    out.append(Path(de.path))
    except FileNotFoundError:
        return []
    return out


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def count(account_dir: Path) -> tuple[Usage, bool]:
    """Walk the account: every file in every folder's new/ and cur/ (as Dovecot counts).
    Returns (usage, settled): settled is False when a folder changed during the walk (a
    file moving between folders may have been missed or seen twice: count again later)."""
    storage = messages = 0
    seen: dict[Path, int] = {}
    for folder in _folder_dirs(account_dir):
        for sub in ("new", "cur"):
            path = folder / sub
            seen[path] = _mtime(path)
            try:
                names = os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                i = name.find(",S=")
                if i >= 0:
                    digits = re.match(r"\d+", name[i + 3:])
                    rest = name[i + 3 + len(digits.group()):] if digits else "x"
                    if digits and (not rest or rest[0] in ":,"):
                        storage += int(digits.group())
                        messages += 1
                        continue
                try:
                    storage += os.stat(path / name).st_size
                    messages += 1
                except FileNotFoundError:  # moved or expunged meanwhile
                    pass
    settled = all(_mtime(path) == mtime for path, mtime in seen.items())
    return Usage(storage, messages), settled


MAX_READ = 1 << 20  # a file this long (changes without a quiet moment to count) is counted anyway


# What the last read or write of each maildirsize found: path -> (signature, limits, usage,
# number of lines).  A file with the same signature (inode, size, mtime) is not read again:
# a delivery costs one stat() to learn the usage, and one append to record its own.
_seen: dict[str, tuple[tuple, Limits, Usage, int]] = {}
MAX_SEEN = 100_000


def _sig(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(path: Path, sig: tuple, limits: Limits, usage: Usage, lines: int) -> None:
    if len(_seen) >= MAX_SEEN:
        _seen.clear()
    _seen[os.fspath(path)] = (sig, limits, usage, lines)


def _read(path: Path) -> tuple[tuple[Limits, Usage, int] | None, os.stat_result] | None:
    """(the parsed file or None when broken or too long, its stat) or None when there is none."""
    try:
        st = os.stat(path)
        known = _seen.get(os.fspath(path))
        if known is not None and known[0] == _sig(st):
            return known[1:], st
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_READ)
    except (FileNotFoundError, NotADirectoryError):
        return None
    parsed = parse_maildirsize(data) if len(data) < MAX_READ else None
    if parsed is not None:
        _remember(path, _sig(st), *parsed)
    return parsed, st


def _recount(account_dir: Path, limits: Limits, write: bool) -> Usage:
    usage, settled = count(account_dir)
    if write and settled and account_dir.is_dir():
        data = f"{limits.header()}\n{usage.storage} {usage.messages}\n".encode()
        try:
            atomic_write(account_dir / MAILDIRSIZE, data)
        except OSError as e:  # a full disk: the count is right all the same; written later
            log.warning("cannot write %s: %s", account_dir / MAILDIRSIZE, e.strerror or e)
    elif write and not settled:  # Dovecot does the same: not written, counted at the next look
        forget(account_dir)
    return usage


def load(account_dir: Path, limits: Limits, write: bool = True, now: float | None = None,
         quiet: bool = True, due: bool = False) -> tuple[Usage, bool]:
    """The account's usage, from maildirsize, counted again when the file says so (see the
    module's doc).  Returns (usage, counted again?).  `write=False` (the CLI) never writes.
    `quiet=False`: changes of this process are under way (files written, not yet recorded):
    a count now would see some of them twice, so the file's numbers are used as long as it
    can be read, and the count waits for a quiet moment.  `due`: count (when quiet) even
    if the file looks fresh."""
    path = Path(account_dir) / MAILDIRSIZE
    got = _read(path)
    if got is not None and got[0] is not None:
        parsed, st = got
        fresh = (st.st_size < RECALC_SIZE and parsed[0] == limits and not due
                 and (time.time() if now is None else now) - st.st_mtime < STALE)
        if fresh or not quiet:
            return parsed[1], False
    if not quiet:  # no file to go by: count, but do not write what the changes' lines would add to
        return _recount(Path(account_dir), limits, False), False
    return _recount(Path(account_dir), limits, write), True


def change(account_dir: Path, limits: Limits, storage: int, messages: int, quiet: bool = True,
           due: bool = False) -> tuple[Usage, Usage, bool]:
    """Record a change that has happened already: one line appended (or the file counted
    again, which includes it).  Returns (usage before, usage after, counted again?)."""
    after, counted = load(account_dir, limits, quiet=quiet, due=due)
    if counted:
        return Usage(after.storage - storage, after.messages - messages), after, True
    before = after
    after = Usage(before.storage + storage, before.messages + messages)
    path = Path(account_dir) / MAILDIRSIZE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:  # removed since it was read: counted again at the next look
        return before, after, False
    try:
        line = f"{storage} {messages}\n".encode()
        os.write(fd, line)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    known = _seen.get(os.fspath(path))
    if known is not None and known[0][0] == st.st_ino and known[0][1] + len(line) == st.st_size:
        _remember(path, _sig(st), known[1], after, known[3] + 1)  # nobody else wrote meanwhile
    return before, after, False


def forget(account_dir: Path) -> None:
    """Make the next look count the account again (a whole folder went)."""
    try:
        os.unlink(Path(account_dir) / MAILDIRSIZE)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- async face

# Set while the server itself delivers a notice (the quota warning): it must get through.
exempt: contextvars.ContextVar[bool] = contextvars.ContextVar("quota_exempt", default=False)


class Quota:
    """What the store, SMTP and IMAP ask about quota.  Installed by the server as
    `store.quota`; a store without one tracks nothing and enforces nothing.

    limits_of(account) -> Limits   the account's limits (directory, else the config default)
    warn(account, usage, limits)   called once each time usage crosses warn_percent upwards

    The store calls check() before it writes (which also marks a change as under way) and
    charge() after; an expunge calls begin() before it unlinks.  While a change is under
    way the account is not counted again (the count would see its file, and then its line).
    A change that failed between the two is forgotten after BUSY_FOR seconds.
    """

    BUSY_FOR = 60.0
    # How long a usage this process read or recorded is answered from memory.  The checks
    # (SMTP RCPT, delivery, APPEND) are advisory bounds that deliveries already in flight can
    # overrun anyway; reading maildirsize in a thread for each of them cost SMTP a third of its
    # rate.  Changes of this process update the memo at once; others' within MEMO_FOR.
    MEMO_FOR = 2.0

    def __init__(self, account_dir: Callable[[str], Path], limits_of: Callable[[str], Limits],
                 warn_percent: "float | Callable[[], float]" = 0,
                 warn: Callable[[str, Usage, Limits], Awaitable[None]] | None = None) -> None:
        self.account_dir = account_dir
        self.limits_of = limits_of
        self.warn_percent = warn_percent
        self.warn = warn
        self._lock = KeyedLocks()  # per account
        self._busy: dict[str, list] = {}  # account -> [changes under way, when the last began]
        # account -> when this process last counted it: a busy account's file never gets 15
        # minutes old, yet what others changed (a `mv`, an import) must be counted that often.
        self._counted: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._memo: dict[str, tuple[Usage, Limits, float]] = {}  # account -> (usage, limits, when)
        self._pending: dict[str, list[int]] = {}  # account -> [bytes, messages, changes] not yet written
        self._writing: dict[str, tuple[int, int]] = {}  # account -> (bytes, messages) being written
        self._soon: dict[str, asyncio.TimerHandle] = {}  # account -> its charge_soon write, scheduled
        self._last_write: dict[str, float] = {}  # account -> when charge_soon last wrote

    def begin(self, account: str) -> None:
        """A change of the account's messages starts (charge() ends it)."""
        busy = self._busy.setdefault(account, [0, 0.0])
        busy[0] += 1
        busy[1] = time.monotonic()

    def _under_way(self, account: str) -> int:
        busy = self._busy.get(account)
        if busy is None:
            return 0
        if time.monotonic() - busy[1] > self.BUSY_FOR:  # failed without charge(): forgotten
            del self._busy[account]
            return 0
        return busy[0]

    def _end(self, account: str) -> None:
        busy = self._busy.get(account)
        if busy is not None:
            busy[0] -= 1
            if busy[0] <= 0:
                del self._busy[account]

    def _due(self, account: str) -> bool:
        return time.monotonic() - self._counted.get(account, -STALE) >= STALE

    def _was_counted(self, account: str) -> None:
        if len(self._counted) > 100_000:
            self._counted.clear()
        self._counted[account] = time.monotonic()

    def _remember(self, account: str, usage: Usage, limits: Limits) -> None:
        if len(self._memo) > 100_000:
            self._memo.clear()
        self._memo[account] = (usage, limits, time.monotonic())

    async def usage(self, account: str, fresh: bool = False) -> tuple[Usage, Limits]:
        """The account's usage and limits; from memory when this process knew it less than
        MEMO_FOR seconds ago (unless `fresh`: what GETQUOTA and the CLI show)."""
        limits = self.limits_of(account)
        memo = self._memo.get(account)
        if (not fresh and memo is not None and memo[1] == limits and time.monotonic() - memo[2] < self.MEMO_FOR
                and not self._due(account)):
            return self._with_unwritten(account, memo[0]), limits
        async with self._lock(account):
            usage, counted = await asyncio.to_thread(load, self.account_dir(account), limits,
                                                     quiet=not self._under_way(account), due=self._due(account))
            if counted:
                self._was_counted(account)
            self._remember(account, usage, limits)
            return self._with_unwritten(account, usage), limits

    async def check(self, account: str, storage: int, messages: int = 1) -> None:
        """Raise QuotaExceeded when `messages` messages of `storage` bytes in all do not fit;
        else the change is under way until charge()."""
        limits = self.limits_of(account)
        if not exempt.get() and not limits.unlimited:
            usage, _ = await self.usage(account)
            refused = refusal(usage, limits, storage, messages)
            if refused is not None:
                log.info("quota: %s: %s (%d of %d bytes, %d of %d messages in use)", account, refused,
                         usage.storage, limits.storage, usage.messages, limits.messages)
                raise refused
        self.begin(account)

    def _with_unwritten(self, account: str, usage: Usage) -> Usage:
        """`usage` plus the changes recorded by charge() and not yet in the file and the memo
        (a delivery's charge is written after its reply: charge_soon)."""
        pending, writing = self._pending.get(account), self._writing.get(account)
        if pending is None and writing is None:
            return usage
        storage, messages = usage.storage, usage.messages
        for change in (pending, writing):
            if change is not None:
                storage, messages = storage + change[0], messages + change[1]
        return Usage(storage, messages)

    WRITE_AFTER = 0.25  # seconds a delivery's charge waits for others (one line, one thread hop)

    def charge_soon(self, account: str, storage: int, messages: int) -> None:
        """charge() without waiting for its line: written at once, or when the account's
        line was written less than WRITE_AFTER seconds ago, at the end of that time with
        the charges of the deliveries made meanwhile, as one line in one thread hand-off
        (a hand-off per message cost a single SMTP session an eighth of its event loop).
        Exact all the same: usage() adds the changes not yet written (_with_unwritten).  A
        crash before the line is written loses only the line: every account is counted
        again at its first look after a start (_due), and a stop writes it (settled())."""
        if not self._note(account, storage, messages) or account in self._soon:
            return  # joins the write already scheduled
        wait = self._last_write.get(account, -self.WRITE_AFTER) + self.WRITE_AFTER - time.monotonic()
        if wait <= 0:  # none lately: written at once (the first of a burst, a quiet account)
            self._write_soon(account)
        else:
            self._soon[account] = asyncio.get_running_loop().call_later(wait, self._write_soon, account)

    def _write_soon(self, account: str) -> None:
        self._soon.pop(account, None)
        if len(self._last_write) > 100_000:
            self._last_write.clear()
        self._last_write[account] = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._write(account))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Returns when every charge so far is written (shutdown, tests)."""
        for account, timer in list(self._soon.items()):
            timer.cancel()
            self._write_soon(account)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _note(self, account: str, storage: int, messages: int) -> bool:
        """The change joins the account's pending one; False: nothing to write."""
        if not storage and not messages:
            self._end(account)
            return False
        pending = self._pending.setdefault(account, [0, 0, 0])
        pending[0] += storage
        pending[1] += messages
        pending[2] += 1
        return True

    async def charge(self, account: str, storage: int, messages: int) -> None:
        """Record a change made (negative when messages went) and end it.  Never raises: the
        numbers are counted again later if this fails.  Changes recorded while another is
        being written are written together, as one line, by the next to take the lock."""
        if self._note(account, storage, messages):
            await self._write(account)

    async def _write(self, account: str) -> None:
        limits = self.limits_of(account)
        path = self.account_dir(account)
        async with self._lock(account):
            pending = self._pending.pop(account, None)
            if pending is None:  # written, with the others, by a charge that held the lock
                return
            storage, messages, changes = pending
            self._writing[account] = (storage, messages)
            try:
                quiet = self._under_way(account) <= changes  # only these: a count includes them
                before, after, counted = await asyncio.to_thread(change, path, limits, storage, messages,
                                                                 quiet, self._due(account))
                if counted:
                    self._was_counted(account)
                self._remember(account, after, limits)
            except OSError as e:
                log.warning("quota: %s: usage not recorded (%s); counted again later", account, e.strerror or e)
                await asyncio.to_thread(forget, path)
                return
            finally:
                self._writing.pop(account, None)
                for _ in range(changes):
                    self._end(account)
        level = self.warn_percent() if callable(self.warn_percent) else self.warn_percent
        if (self.warn is not None and level and storage > 0
                and percent(before, limits) < level <= percent(after, limits)):
            task = asyncio.get_running_loop().create_task(self._warn(account, after, limits))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _warn(self, account: str, usage: Usage, limits: Limits) -> None:
        exempt.set(True)  # this task's own context: the notice gets in even when full
        try:
            await self.warn(account, usage, limits)
        except Exception:  # noqa: BLE001 - a notice must never break a delivery
            log.exception("quota: warning to %s not delivered", account)

    async def forget(self, account: str) -> None:
        """A whole folder went: the account is counted again at the next look.  That count
        sees the files of the changes whose lines are not written yet (charge_soon), so
        those lines are dropped, not added on top of it."""
        self._memo.pop(account, None)
        async with self._lock(account):
            await asyncio.to_thread(forget, self.account_dir(account))
            timer = self._soon.pop(account, None)
            if timer is not None:
                timer.cancel()
            pending = self._pending.pop(account, None)
            for _ in range(pending[2] if pending is not None else 0):
                self._end(account)
