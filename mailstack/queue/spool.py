"""The queue on disk: one file per message, one directory per state.

Layout under queue_dir (Postfix's model):

    incoming/   accepted ("250 queued" said), not yet taken up by the manager
    active/     being delivered (or waiting for a delivery slot)
    deferred/   waiting for the next retry
    hold/       put aside by the operator; never delivered until released
    maildrop/   written by `mailstack sendmail`; the server moves it to incoming/
    corrupt/    files that could not be parsed (kept for a person to look at)
    status/     per-recipient delivery status of a message, written only when the
                message is deferred or held (independent of the state directory)
    done/       one line per remote recipient that a remote server accepted, appended
                and fsynced right after its "250" so that a crash before the status is
                written does not send it again

A queue file holds envelope and message together, so that accepting a message
costs one file fsync and one (group-committed) directory fsync:

    MSQ1 <n>\\n            magic and the length of the envelope JSON
    <envelope JSON>\\n     {"sender", "recipients", "arrival", "size", "meta"}
    <message bytes>        exactly "size" bytes, as received (CRLF line ends)

A file whose message part is shorter than "size" was cut short by a crash before
it was acknowledged; the manager moves such files to corrupt/ at start.

Everything here that touches disk blocks, except `enqueue`, which does its work in
a worker thread: call the other methods through asyncio.to_thread from the loop.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..fsutil import GroupSync, atomic_write, fsync_dir, fsync_together
from ..store.base import MessageSource
from .types import QueuedMessage

MAGIC = b"MSQ1 "
MAX_ENVELOPE = 16 * 1024 * 1024  # a sanity bound when reading a file back
STATES = ("incoming", "active", "deferred", "hold", "maildrop", "corrupt")
# States that hold messages the server owns (maildrop is the sendmail drop box).
QUEUE_STATES = ("incoming", "active", "deferred", "hold")
IOV_MAX = 1024

# base32hex keeps the sort order of the numbers it encodes: ids sort by time.
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUV"


class CorruptQueueFile(Exception):
    """A queue file that cannot be read back (cut short, bad header)."""

    def __init__(self, message: str, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated  # the file ends early: a write that a crash interrupted


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


def valid_qid(qid: str) -> bool:
    return 8 <= len(qid) <= 32 and all(c in _ALPHABET for c in qid)


class _IdSource:
    """Unique, time-sortable ids: 11 base32 digits of microseconds (strictly increasing within
    a process) + 3 random digits, so that the server and a `sendmail` process never collide."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._random = random.Random()  # seeded from the OS once

    def new(self) -> str:
        with self._lock:
            now = max(time.time_ns() // 1000, self._last + 1)
            self._last = now
            # Not secrets: ids need not be unguessable, and os.urandom per id is slow on some VMs.
            rand = self._random.getrandbits(15)
        return _b32(now, 11) + _b32(rand, 3)


new_id = _IdSource().new


def encode_header(sender: str, recipients: list[str], arrival: float, size: int, meta: dict) -> bytes:
    env = json.dumps({"sender": sender, "recipients": recipients, "arrival": arrival, "size": size,
                      "meta": meta}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return MAGIC + str(len(env)).encode() + b"\n" + env + b"\n"


def read_envelope(path: str | os.PathLike, qid: str | None = None) -> QueuedMessage:
    """Read the envelope of a queue file (not the message). Raises CorruptQueueFile."""
    path = os.fspath(path)
    qid = qid or os.path.basename(path)
    try:
        with open(path, "rb") as f:
            first = f.readline(64)
            if MAGIC.startswith(first) or (first.startswith(MAGIC) and not first.endswith(b"\n")):
                raise CorruptQueueFile(f"{path}: header cut short", truncated=True)
            if not first.startswith(MAGIC) or not first.endswith(b"\n"):
                raise CorruptQueueFile(f"{path}: not a queue file")
            try:
                n = int(first[len(MAGIC):-1])
            except ValueError:
                raise CorruptQueueFile(f"{path}: bad header") from None
            if not 0 < n <= MAX_ENVELOPE:
                raise CorruptQueueFile(f"{path}: bad envelope length")
            raw = f.read(n + 1)
            if len(raw) != n + 1 or raw[-1:] != b"\n":
                raise CorruptQueueFile(f"{path}: envelope cut short", truncated=True)
            try:
                env = json.loads(raw[:-1])
                sender, recipients = env["sender"], env["recipients"]
                size, arrival, meta = int(env["size"]), float(env["arrival"]), env.get("meta") or {}
            except (ValueError, KeyError, TypeError):
                raise CorruptQueueFile(f"{path}: bad envelope") from None
            if not isinstance(sender, str) or not isinstance(recipients, list) or not isinstance(meta, dict):
                raise CorruptQueueFile(f"{path}: bad envelope")
            offset = len(first) + n + 1
            if os.fstat(f.fileno()).st_size != offset + size:
                raise CorruptQueueFile(f"{path}: message cut short", truncated=True)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptQueueFile(f"{path}: {e}") from None
    return QueuedMessage(qid=qid, sender=sender, recipients=[str(r) for r in recipients],
                         source=MessageSource(path, offset, size), arrival=arrival, meta=meta)


def create_queue_file(path: str | os.PathLike, header: bytes, chunks: Iterable, exclusive: bool = True,
                      owner: tuple[int, int] | None = None) -> int:
    """Create `path` with header + chunks (os.writev, no concatenation), not yet fsynced; returns
    the open descriptor.  On any error the partial file is removed."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        views = [memoryview(header)] + [memoryview(c).cast("B") for c in chunks if len(c)]
        while views:
            batch = views[:IOV_MAX]
            n = os.writev(fd, batch)
            # Drop what was written; a short write leaves the rest of one buffer.
            done = 0
            while done < len(batch) and n >= len(batch[done]):
                n -= len(batch[done])
                done += 1
            del views[:done]
            if n:
                views[0] = views[0][n:]
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    return fd


def write_queue_file(path: str | os.PathLike, header: bytes, chunks: Iterable, exclusive: bool = True,
                     owner: tuple[int, int] | None = None) -> None:
    """Create `path` with header + chunks and fsync it. On any error the partial file is removed."""
    fd = create_queue_file(path, header, chunks, exclusive, owner)
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Spool:
    def __init__(self, queue_dir: Path | str, group_sync: GroupSync | None = None) -> None:
        self.dir = Path(queue_dir)
        self.group_sync = group_sync or GroupSync()
        # Called on the loop with the QueuedMessage once it is durable (the manager's wake-up).
        self.on_enqueue: Callable[[QueuedMessage], None] | None = None
        self.new_id = new_id
        # Ids whose files in incoming/ this process is writing right now: a scan of incoming/
        # (start-up recovery) must not take such a file for one a crash cut short.
        self.writing: set[str] = set()
        self._batch: list = []  # (path, header, chunks, future) waiting for the next group commit
        self._committing = False
        self.kept_bytes = 0  # bytes of new messages held in memory for local delivery

    # --- layout ----------------------------------------------------------------------
    def path(self, state: str, qid: str) -> Path:
        return self.dir / state / qid

    def status_path(self, qid: str) -> Path:
        return self.dir / "status" / qid

    def setup(self) -> None:
        """Create the directories (mode 0700). Blocking, small: called once at start."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in STATES + ("status", "done"):
            (self.dir / name).mkdir(exist_ok=True, mode=0o700)
        fsync_dir(self.dir)

    # --- accepting -------------------------------------------------------------------
    async def enqueue(self, sender: str, recipients: list[str], chunks: list, meta: dict,
                      qid: str | None = None, state: str = "incoming") -> str:
        """Write a new message into incoming/ (or straight into hold/ for quarantined mail);
        durable (file and directory fsynced) on return."""
        if state not in ("incoming", "hold"):
            raise ValueError(f"cannot enqueue into {state}")
        qid = qid or self.new_id()
        if not valid_qid(qid):
            raise ValueError(f"bad queue id {qid!r}")
        size = sum(len(memoryview(c).cast("B")) for c in chunks)
        arrival = time.time()
        header = encode_header(sender, list(recipients), arrival, size, meta)
        path = self.path(state, qid)
        self.writing.add(qid)
        try:
            await self._commit(path, header, chunks)
        finally:
            self.writing.discard(qid)
        msg = QueuedMessage(qid=qid, sender=sender, recipients=list(recipients),
                            source=MessageSource(str(path), len(header), size), arrival=arrival,
                            meta=dict(meta))
        if self.on_enqueue is not None and state == "incoming":
            self.keep_in_memory(msg, chunks)
            self.on_enqueue(msg)
        return qid

    # --- group commit --------------------------------------------------------------------
    # Every message that arrives while a batch is being made durable waits for the next batch;
    # a batch is one worker-thread call: write every file, then fsync all of them and their
    # directory at once (fsutil.fsync_together), so a burst of N messages costs about one
    # durable step instead of N in a row, and the event loop is woken once per batch.
    def _commit(self, path: Path, header: bytes, chunks: list) -> "asyncio.Future[None]":
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._batch.append((path, header, chunks, fut))
        if not self._committing:
            self._committing = True
            loop.create_task(self._commit_loop())
        return fut

    async def _commit_loop(self) -> None:
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    errors = await asyncio.to_thread(self._write_batch, [item[:3] for item in batch])
                except BaseException as e:  # cancelled at shutdown: nothing of it was acknowledged
                    if isinstance(e, GeneratorExit):  # closed with its (closed) loop: nobody waits
                        raise
                    for item in batch + self._batch:
                        if not item[3].done():
                            item[3].set_exception(RuntimeError("the spool is shutting down"))
                    self._batch = []
                    if isinstance(e, Exception):
                        continue
                    raise
                for (_, _, _, fut), err in zip(batch, errors):
                    if fut.done():
                        continue
                    if err is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(err)
        finally:
            self._committing = False

    def _write_batch(self, items: list) -> list[BaseException | None]:
        """Blocking: create every file, then make all of them durable together.  A file whose
        write or fsync (or whose directory's fsync) failed is removed: it was never acknowledged,
        so it must not be delivered either."""
        errors: list[BaseException | None] = [None] * len(items)
        fds: dict[int, int] = {}
        for i, (path, header, chunks) in enumerate(items):
            try:
                try:
                    fds[i] = create_queue_file(path, header, chunks)
                except FileNotFoundError:
                    # Mail arrived before the spool was set up (or while another thread was setting
                    # it up): make sure the directories exist, then try once more.
                    self.setup()
                    fds[i] = create_queue_file(path, header, chunks)
            except Exception as e:
                errors[i] = e
        dirs = sorted({os.fspath(items[i][0].parent) for i in fds})
        try:
            fd_errors, dir_errors = fsync_together(list(fds.values()), dirs)
        finally:
            for fd in fds.values():
                os.close(fd)
        for (i, _), err in zip(fds.items(), fd_errors):
            err = err or dir_errors[os.fspath(items[i][0].parent)]
            if err is not None:
                errors[i] = err
                _unlink_quietly(items[i][0])
        return errors

    # --- the bytes of new messages, kept for local delivery ---------------------------------
    # A message just accepted is usually delivered locally a moment later: it is handed to the
    # store from memory instead of being read back from the queue file.  Bounded per message
    # and in total; what does not fit is read from the file as before.
    KEEP_MAX_MESSAGE = 1024 * 1024
    KEEP_MAX_TOTAL = 64 * 1024 * 1024

    def keep_in_memory(self, msg: QueuedMessage, chunks: list) -> None:
        size = msg.source.size
        if size > self.KEEP_MAX_MESSAGE or self.kept_bytes + size > self.KEEP_MAX_TOTAL:
            return
        data = b"".join(chunks)
        if len(data) != size:
            return
        msg.data = data
        self.kept_bytes += size

    def forget_data(self, msg: QueuedMessage | None) -> None:
        """The message's bytes are no longer needed in memory (its local delivery is done)."""
        if msg is not None and msg.data is not None:
            self.kept_bytes -= len(msg.data)
            msg.data = None

    # --- moving (blocking) ---------------------------------------------------------------
    def move(self, qid: str, src: str, dst: str, sync: bool = False) -> Path:
        """Rename between state directories. With sync, fsync the destination directory (and the
        source, so the file cannot show up in both after a crash)."""
        target = self.path(dst, qid)
        os.rename(self.path(src, qid), target)
        if sync:
            fsync_dir(target.parent)
            fsync_dir(self.dir / src)
        return target

    def remove(self, qid: str, state: str) -> None:
        """Forget a message: its file, then its status and done files."""
        try:
            os.unlink(self.path(state, qid))
        except FileNotFoundError:
            pass
        for extra in (self.status_path(qid), self.done_path(qid)):
            try:
                os.unlink(extra)
            except FileNotFoundError:
                pass

    # --- durable record of remote successes (blocking) --------------------------------
    def done_path(self, qid: str) -> Path:
        return self.dir / "done" / qid

    def record_done(self, qid: str, recipients: list[str]) -> None:
        """Append recipients a remote server accepted; durable on return (file fsynced, and the
        directory when the file is new). Called right after the remote "250"."""
        path = self.done_path(qid)
        data = "".join(r.replace("\n", " ") + "\n" for r in recipients).encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            new = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            new = False
        except FileNotFoundError:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            new = True
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(path.parent)

    def read_done(self, qid: str) -> set[str]:
        """Remote recipients already accepted (lower-cased); a line cut by a crash is ignored."""
        try:
            with open(self.done_path(qid), "rb") as f:
                data = f.read(MAX_ENVELOPE)
        except (FileNotFoundError, OSError):
            return set()
        lines = data.split(b"\n")[:-1]  # the last piece has no newline: incomplete or empty
        return {line.decode("utf-8", "replace").lower() for line in lines if line}

    def locate(self, qid: str, states: Iterable[str] = QUEUE_STATES) -> str | None:
        """Which state directory holds the message now, if any."""
        if not valid_qid(qid):
            return None
        for state in states:
            if os.path.exists(self.path(state, qid)):
                return state
        return None

    def ids(self, state: str) -> list[str]:
        """Queue ids in one state directory, oldest first (temporary dot-files skipped)."""
        try:
            names = os.listdir(self.dir / state)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".") and valid_qid(n))

    def entries(self, states: Iterable[str] = QUEUE_STATES) -> Iterator[tuple[str, str]]:
        for state in states:
            for qid in self.ids(state):
                yield state, qid

    # --- per-recipient status (blocking) ----------------------------------------------
    def read_status(self, qid: str) -> dict | None:
        try:
            with open(self.status_path(qid), "rb") as f:
                data = json.loads(f.read(MAX_ENVELOPE))
            return data if isinstance(data, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def write_status(self, qid: str, status: dict) -> None:
        atomic_write(self.status_path(qid), json.dumps(status, ensure_ascii=False).encode("utf-8"), mode=0o600)

    def orphan_status(self) -> list[str]:
        """Status files whose message is gone (a crash between the two unlinks)."""
        live = {qid for _, qid in self.entries()}
        return [q for q in self.ids("status") if q not in live]

    def orphan_done(self) -> list[str]:
        live = {qid for _, qid in self.entries()}
        return [q for q in self.ids("done") if q not in live]

    # --- reading the message (blocking) -----------------------------------------------
    @staticmethod
    def read_headers(source: MessageSource, limit: int = 256 * 1024) -> bytes:
        """The header section of a message (up to and including the blank line), at most `limit` bytes."""
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            data = f.read(min(limit, source.size))
        for sep in (b"\r\n\r\n", b"\n\n"):
            end = data.find(sep)
            if end >= 0:
                return data[:end + len(sep)]
        return data

    @staticmethod
    def read_message(source: MessageSource) -> bytes:
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            return f.read(source.size)
