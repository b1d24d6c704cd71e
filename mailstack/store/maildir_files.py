"""The blocking side of the Maildir store (maildir.py), run in worker threads: the files of
an account and of a mailbox (folders, UIDVALIDITY, subscriptions, the mailbox flock), writing
a message through tmp/, renaming for flags, unlinking, copying and moving message files
between mailboxes, and the tmp/ clean-up at start."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from ..fsutil import atomic_write
from . import filename as fn
from . import flags as fl
from . import names
from . import fts
from . import index as idxmod
from .groupwrite import recover_tmp
from . import uidlist as ulmod
from .base import MailboxNotFound, MessageSource, StoreError

log = logging.getLogger("mailstack.store")

KEYWORDS = "mailstack-keywords"
LOCK = "mailstack-lock"
SPECIAL_USE = "mailstack-special-use"
SUBSCRIPTIONS = "subscriptions"
UIDVALIDITY = "mailstack-uidvalidity"
MAILDIRFOLDER = "maildirfolder"
_COPY_CHUNK = 1 << 20
INDEX_AT_DELIVERY_MAX = 16 << 20  # bigger messages are indexed when first looked at


class Entry(NamedTuple):
    """One message file as last seen on disk."""

    uid: int
    base: str
    sub: str  # "new" or "cur"
    name: str  # file name inside sub
    size: int
    date: float
    letters: str


# ---------------------------------------------------------------- blocking helpers (threads)

def _mkdir(path: Path) -> bool:
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        return False


def _touch(path: Path, data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def _make_subdirs(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        _mkdir(path / sub)


@contextmanager
def _flock(mailbox_dir: Path) -> Iterator[None]:
    fd = os.open(mailbox_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _new_uidvalidity(account_dir: Path) -> int:
    """A UIDVALIDITY never given out before in this account: the time, or one more than the
    last value when mailboxes are (re)created faster than once a second."""
    fd = os.open(account_dir / UIDVALIDITY, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 64, 0).strip()
        last = int(raw) if raw.isdigit() else 0
        value = max(int(time.time()), last + 1)
        data = b"%d\n" % value
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return value
    finally:
        os.close(fd)


def _create_folder(account_dir: Path, path: Path, special_use: str | None) -> None:
    """Make one mailbox directory; FileExistsError when it is there already.  On any other
    error (a full disk) nothing of it is left: a later CREATE must not find half a folder."""
    os.mkdir(path, 0o700)
    try:
        _make_subdirs(path)
        _touch(path / MAILDIRFOLDER)
        if special_use:
            _touch(path / SPECIAL_USE, special_use.encode() + b"\n")
        atomic_write(path / ulmod.NAME, ulmod.format_header(_new_uidvalidity(account_dir), 1))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _list(path: Path) -> dict[str, tuple[str, str, str]]:
    """base -> (sub, name, letters) of every message file; new/ is read first so a file
    moving new/ -> cur/ during the listing is seen in cur/ rather than missed."""
    found: dict[str, tuple[str, str, str]] = {}
    usable = fn.usable
    for sub in ("new", "cur"):
        for name in os.listdir(path / sub):
            if usable(name):
                base, sep, info = name.partition(":")  # fn.split, inlined: 10,000s of names
                found[base] = (sub, name, info[2:] if sep and info.startswith("2,") else "")
    return found


def _stat_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_subscriptions(account_dir: Path) -> list[str]:
    try:
        data = (account_dir / SUBSCRIPTIONS).read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data.decode("utf-8", "replace").splitlines() if line]


def _write_subscriptions(account_dir: Path, subs: list[str]) -> None:
    atomic_write(account_dir / SUBSCRIPTIONS, "".join(s + "\n" for s in subs).encode("utf-8"))


def _copy_from_source(src: MessageSource, fd: int) -> None:
    """Spool file range -> fd inside the kernel when possible (no copy through Python)."""
    if src.prefix:
        _write_all(fd, src.prefix)
    sfd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset, remaining = src.offset, src.size
        fast = True
        while remaining > 0:
            n = 0
            if fast:
                try:
                    n = os.copy_file_range(sfd, fd, remaining, offset)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    fast = False
                    continue
            else:
                data = os.pread(sfd, min(remaining, _COPY_CHUNK), offset)
                n = os.write(fd, data) if data else 0
            if n <= 0:
                raise StoreError("message source is shorter than announced")
            offset += n
            remaining -= n
    finally:
        os.close(sfd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_message(mailbox_dir: Path, base: str, sub: str, name: str,
                   message: "bytes | MessageSource", mtime: float | None) -> None:
    """tmp/<base> -> fsync -> rename to <sub>/<name>: a reader never sees a partial message."""
    tmp = mailbox_dir / "tmp" / base
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            if isinstance(message, MessageSource):
                _copy_from_source(message, fd)
            else:
                _write_all(fd, message)
            os.fsync(fd)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.rename(tmp, mailbox_dir / sub / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_and_index(mailbox_dir: Path, base: str, sub: str, name: str,
                     message: "bytes | MessageSource", mtime: float | None, uidvalidity: int) -> dict | None:
    """_write_message, then the message's index entry from the bytes in hand, appended to
    the mailbox's index under its base name (index.py).  Indexing never fails a delivery:
    without an entry the message is indexed when first looked at."""
    _write_message(mailbox_dir, base, sub, name, message, mtime)
    size = message.length if isinstance(message, MessageSource) else len(message)
    if size > INDEX_AT_DELIVERY_MAX:
        return None
    try:
        if isinstance(message, MessageSource):
            message = message.read()
        entry = idxmod.message_entry(message)
        idxmod.append_lines(mailbox_dir / idxmod.NAME, uidvalidity, [idxmod.delivered_line(base, entry)])
    except Exception:  # noqa: BLE001 - a full disk or a parser bug must not lose the message
        log.warning("could not index %s at delivery", base, exc_info=True)
        return None
    try:  # added to the full-text index by the caller, several deliveries in one transaction
        entry["fts"] = fts.texts_of(message)  # not stored in the metadata index
    except Exception:  # noqa: BLE001 - derived data: added when first searched
        log.warning("could not extract the text of %s at delivery", base, exc_info=True)
    return entry


def _rename_back(account_dir: Path, pairs: list[tuple[str, str]]) -> None:
    for old, new in reversed(pairs):
        try:
            os.rename(account_dir / names.to_dirname(new), account_dir / names.to_dirname(old))  # type: ignore[operator]
        except OSError:
            log.warning("could not rename %s back to %s", new, old)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_file(path: Path, start: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb", buffering=0) as f:
        if start:
            f.seek(start)
        return f.read() if length is None else f.read(length)


# ---------------------------------------------------------------- blocking file operations

def _relocate(path: Path, listing: dict | None, base: str) -> tuple[dict, tuple[str, str, str] | None]:
    listing = _list(path) if listing is None else listing
    return listing, listing.get(base)


def _rename_flags(path: Path, targets: list[Entry], mode: str, change: str) -> dict[int, Entry | None]:
    """Rename each file to carry its new flags.  A file that moved since it was listed is
    looked up again by base name; None for files that are gone."""
    out: dict[int, Entry | None] = {}
    listing = None
    for e in targets:
        cur = e
        for attempt in range(3):
            letters = fl.apply(cur.letters, mode, change)
            new_name = fn.join(cur.base, letters)
            if cur.sub == "cur" and cur.name == new_name:
                out[e.uid] = cur
                break
            try:
                os.rename(path / cur.sub / cur.name, path / "cur" / new_name)
                out[e.uid] = cur._replace(sub="cur", name=new_name, letters=letters)
                break
            except FileNotFoundError:
                listing, loc = _relocate(path, None if attempt else listing, cur.base)
                if loc is None:
                    out[e.uid] = None
                    break
                cur = cur._replace(sub=loc[0], name=loc[1], letters=loc[2])
        else:
            out[e.uid] = None
    return out


def _unlink_deleted(path: Path, targets: list[Entry], flagged_only: bool = True) -> list[int]:
    done = []
    listing = None
    for e in targets:
        try:
            os.unlink(path / e.sub / e.name)
            done.append(e.uid)
            continue
        except FileNotFoundError:
            pass
        listing, loc = _relocate(path, listing, e.base)
        if loc is None:
            done.append(e.uid)  # gone already: expunged all the same
        elif "T" in loc[2] or not flagged_only:
            try:
                os.unlink(path / loc[0] / loc[1])
            except FileNotFoundError:
                pass
            done.append(e.uid)
        # else: \Deleted was cleared by someone else meanwhile: keep it
    return done


def _link_or_copy(src: Path, dst: Path, size: int, date: float) -> None:
    try:
        os.link(src, dst)  # same inode: same bytes, same mtime (= internal date), no copy
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
            raise
    base = dst.name.partition(":")[0]
    _write_message(dst.parent.parent, base, dst.parent.name, dst.name,
                   MessageSource(str(src), 0, size), date)


def _transfer(src: Path, dst: Path, plan: list[tuple[Entry, str]], move: bool) -> list[tuple[Entry, str]]:
    """Copy (hard link) or move (rename) files into dst/cur/.  Returns what was done."""
    if not (dst / "cur").is_dir():
        raise MailboxNotFound("destination mailbox is gone")
    done: list[tuple[Entry, str]] = []
    try:
        _transfer_files(src, dst, plan, move, done)
    except BaseException:  # a full disk part way: put back what was done
        _undo_transfer(src, dst, done, move)
        raise
    return done


def _undo_transfer(src: Path, dst: Path, done: list[tuple[Entry, str]], move: bool) -> None:
    for e, dname in done:
        try:
            if move:
                os.rename(dst / "cur" / dname, src / e.sub / e.name)
            else:
                os.unlink(dst / "cur" / dname)
        except OSError:
            log.warning("could not undo a %s of %s", "move" if move else "copy", dname)


def _transfer_files(src: Path, dst: Path, plan: list[tuple[Entry, str]], move: bool,
                    done: list[tuple[Entry, str]]) -> None:
    listing = None
    for e, dname in plan:
        sub, name = e.sub, e.name
        for attempt in range(2):
            try:
                if move:
                    os.rename(src / sub / name, dst / "cur" / dname)
                else:
                    _link_or_copy(src / sub / name, dst / "cur" / dname, e.size, e.date)
                done.append((e._replace(sub=sub, name=name), dname))  # where it came from
                break
            except FileNotFoundError:
                if attempt:
                    break
                listing, loc = _relocate(src, listing, e.base)
                if loc is None:
                    break
                sub, name = loc[0], loc[1]


def clean_stale_tmp(root: str | os.PathLike, before: float) -> int:
    """Blocking, once at server start: remove files in every mailbox's tmp/ last written before
    `before` (the server's start).  They are deliveries a kill cut short (even 0-byte ones); this
    server's own deliveries all start later.  Returns how many were removed."""
    removed = 0
    try:
        domains = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for domain in domains:
        if not domain.is_dir(follow_symlinks=False):
            continue
        for account in os.scandir(domain.path):
            if not account.is_dir(follow_symlinks=False):
                continue
            tmps = [os.path.join(account.path, "tmp")]
            tmps += [os.path.join(e.path, "tmp") for e in os.scandir(account.path)
                     if e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
            for tmp in tmps:
                try:
                    entries = list(os.scandir(tmp))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for e in entries:
                    try:
                        if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < before:
                            # a group-written delivery whose rename a crash undid: into new/
                            if recover_tmp(tmp, e.name) is None:
                                os.unlink(e.path)
                                removed += 1
                    except OSError:
                        pass
    return removed
