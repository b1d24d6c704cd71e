"""`mailstack export USER DEST [--mbox]`: an account written out so other software reads it.

Maildir (default): Dovecot's default layout (mail_location = maildir:DEST), so Dovecot, mutt
(`mutt -f DEST`), offlineimap & co read it as it is:

    DEST/cur/<base>:2,<flags>       INBOX; flags as Maildir letters, keywords as a..z
    DEST/.Archive.2024/             other folders, levels in modified UTF-7 (Dovecot's naming)
    dovecot-keywords                per folder: letter -> keyword
    dovecot-uidlist                 per folder: UIDVALIDITY, UIDNEXT and every UID, so a Dovecot
                                    serving the tree keeps the UIDs clients know
    DEST/subscriptions              Dovecot's version-2 format

File names carry ",S=<size>" and the file's mtime is the INTERNALDATE, as Dovecot reads them.
Messages are copied in chunks (never a whole folder in memory).

mbox (--mbox): one mboxrd file per folder (DEST/INBOX, DEST/Archive/2024 ...; a folder that
has both messages and subfolders keeps its messages in "<name>.mbox" beside the directory of
its subfolders), LF line ends, ">From " quoting, flags in Status:/X-Status:/X-Keywords: the
way Dovecot and mutt write them.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from ..imap import mutf7
from ..store.base import StoreError
from ..store.flags import KEYWORD_LETTERS
from .progress import Progress
from .target import Target

CHUNK = 1 << 20
LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}


class ExportError(Exception):
    pass


def maildir_dirname(name: str) -> tuple[str, bool]:
    """Maildir++ directory of a mailbox (Dovecot's naming); (dirname, renamed) where renamed
    says a "." inside a level had to become "_" (Maildir++ has no escape for it by default)."""
    if name == "INBOX":
        return "", False
    levels = name.split("/")
    renamed = any("." in lvl for lvl in levels)
    return "." + ".".join(mutf7.encode(lvl.replace(".", "_")) for lvl in levels), renamed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest}: exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)


async def run_export(cfg, account: str, dest: Path, progress: Progress, mbox: bool = False) -> int:
    await asyncio.to_thread(_prepare, dest)
    target = Target(cfg, account)
    store = target.store
    boxes = [b for b in await store.list_mailboxes(target.account) if b.selectable]
    progress.plan(len(boxes))
    has_children = {b.name for b in boxes if b.has_children}
    for box in boxes:
        progress.begin_folder(box.name)
        try:
            mb = await store.open(target.account, box.name, read_only=True)
        except StoreError as e:
            progress.failed(f"{box.name}: {e}")
            continue
        try:
            progress.add_work(len(mb.messages), sum(m.size for m in mb.messages))
            if mbox:
                await _export_mbox(mb, dest, box.name, box.name in has_children, progress)
            else:
                await _export_maildir(mb, dest, box.name, progress)
        finally:
            await mb.close()
        progress.end_folder()
    if not mbox:
        subs = await store.subscriptions(target.account)
        lines = ["V\t2", ""] + ["\t".join(mutf7.encode(lvl) for lvl in s.split("/")) for s in subs]
        await asyncio.to_thread(_write_file, dest / "subscriptions", ("\n".join(lines) + "\n").encode())
    progress.summary()
    return 1 if progress.c.failed else 0


async def _copy_message(mb, uid: int, fd: int) -> int:
    """Stream one message into fd; returns its size."""
    path = mb.path(uid)
    if path is not None:
        def copy() -> int:
            n = 0
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        return n
                    _write_all(fd, chunk)
                    n += len(chunk)
        try:
            return await asyncio.to_thread(copy)
        except FileNotFoundError:
            pass  # renamed for a flag change meanwhile: read through the store
    data = await mb.read(uid)
    await asyncio.to_thread(_write_all, fd, data)
    return len(data)


async def _export_maildir(mb, dest: Path, name: str, progress: Progress) -> None:
    dirname, renamed = maildir_dirname(name)
    if renamed:
        progress.warn(f"{name}: '.' in a level written as '_' (Maildir++ reserves '.')")
    folder = dest / dirname if dirname else dest

    def mkdirs() -> None:
        folder.mkdir(exist_ok=True, mode=0o700)
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(exist_ok=True, mode=0o700)
        if dirname:
            _write_file(folder / "maildirfolder", b"")
    await asyncio.to_thread(mkdirs)
    keywords: list[str] = []
    lines = []
    pid = os.getpid()
    for info in mb.messages:
        letters = "".join(sorted(LETTERS[f] for f in info.flags if f in LETTERS))
        kw = ""
        for f in sorted(info.flags):
            if f.startswith("\\"):
                continue
            if f not in keywords:
                if len(keywords) >= len(KEYWORD_LETTERS):
                    progress.warn(f"{name} UID {info.uid}: keyword {f} not kept (26 per folder)")
                    continue
                keywords.append(f)
            kw += KEYWORD_LETTERS[keywords.index(f)]
        base = f"{int(info.internaldate)}.M{info.uid}P{pid}.mailstack,S={info.size}"
        tmp = folder / "tmp" / base
        fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            size = await _copy_message(mb, info.uid, fd)
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)

        def finish() -> None:
            os.utime(tmp, (info.internaldate, info.internaldate))
            os.rename(tmp, folder / "cur" / f"{base}:2,{''.join(sorted(letters + kw))}")
        await asyncio.to_thread(finish)
        lines.append(f"{info.uid} :{base}\n")
        progress.copied(size)
    kw_data = "".join(f"{i} {k}\n" for i, k in enumerate(keywords)).encode()
    uidlist = (f"3 V{mb.uidvalidity} N{mb.uidnext}\n" + "".join(lines)).encode()

    def finish_folder() -> None:
        if keywords:
            _write_file(folder / "dovecot-keywords", kw_data)
        _write_file(folder / "dovecot-uidlist", uidlist)
    await asyncio.to_thread(finish_folder)


# -- mbox ---------------------------------------------------------------------------------------

_FROM_QUOTE = re.compile(rb"^(>*From )", re.M)
_OUR_HEADERS = re.compile(rb"^(status|x-status|x-keywords|x-uid):", re.I)


def mbox_entry(message: bytes, flags: set[str], internaldate: float) -> bytes:
    """One mboxrd entry: From_ line, headers with Status/X-Status/X-Keywords, quoted body, blank
    line.  Pure."""
    text = message
    while b"\r\n" in text:  # CR CR LF too: mbox lines end in LF alone
        text = text.replace(b"\r\n", b"\n")
    if text.endswith(b"\r"):  # a last line ending in a bare CR: the LF we add completes it
        text = text[:-1] + b"\n"
    head, sep, body = text.partition(b"\n\n")
    if not sep:
        head, body = text.rstrip(b"\n"), b""
    kept = []
    skipping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = bool(_OUR_HEADERS.match(line))
        if not skipping:
            kept.append(line)
    status = b"R" if "\\Seen" in flags else b""
    status += b"O"
    xstatus = b"".join(c for f, c in (("\\Answered", b"A"), ("\\Flagged", b"F"), ("\\Draft", b"T"),
                                      ("\\Deleted", b"D")) if f in flags)
    keywords = " ".join(sorted(f for f in flags if not f.startswith("\\"))).encode()
    kept.append(b"Status: " + status)
    if xstatus:
        kept.append(b"X-Status: " + xstatus)
    if keywords:
        kept.append(b"X-Keywords: " + keywords)
    stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(internaldate)).encode()
    out = b"From MAILER-DAEMON " + stamp + b"\n" + _FROM_QUOTE.sub(rb">\1", b"\n".join(kept) + b"\n\n" + body)
    if not out.endswith(b"\n"):
        out += b"\n"
    return out + b"\n"


def mbox_path(dest: Path, name: str, has_children: bool) -> Path:
    levels = [lvl if lvl not in (".", "..") else "_" + lvl for lvl in name.split("/")]
    path = dest.joinpath(*levels)
    return path.with_name(path.name + ".mbox") if has_children else path


async def _export_mbox(mb, dest: Path, name: str, has_children: bool, progress: Progress) -> None:
    path = mbox_path(dest, name, has_children)
    if has_children:
        progress.warn(f"{name}: has subfolders, so its own messages are in {path.name}")

    def open_file() -> int:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    fd = await asyncio.to_thread(open_file)
    try:
        for info in mb.messages:
            data = await mb.read(info.uid)
            entry = await asyncio.to_thread(mbox_entry, data, info.flags, info.internaldate)
            await asyncio.to_thread(_write_all, fd, entry)
            progress.copied(info.size)
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
