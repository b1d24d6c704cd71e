"""Take over a Dovecot Maildir tree: `mailstack import maildir USER PATH`.

The tree is Dovecot's default Maildir++ layout (mail_location = maildir:~/Maildir):

    PATH/                  INBOX (cur/ new/ tmp/), dovecot-uidlist, dovecot-keywords,
                           subscriptions, dovecot.index* (ignored: caches only)
    PATH/.Sent/            other folders, levels joined with ".", names in modified UTF-7
    PATH/.Archive.2023/    ...

Kept: every folder, every message byte (with CRLF line ends: Dovecot stores LF and serves
CRLF, so the bytes are what its IMAP clients saw and RFC822.SIZE equals its W= size), flags,
keywords (by name, through dovecot-keywords), INTERNALDATE (the file's mtime, as Dovecot
reads it), subscriptions, and when the destination folder is empty (or holds an earlier run
of this import): UIDVALIDITY, every UID and UIDNEXT (store/preserve.py).  POP3 UIDLs follow
(the INBOX records Dovecot's pop3_uidl_format and any UIDL Dovecot had saved per message).

Reruns are idempotent: a folder that already carries the source UIDVALIDITY gets only the
UIDs it lacks.  A folder that cannot keep UIDs (it held other mail) is appended to, with the
journal (state.py) keyed by the Dovecot file name, so reruns do not copy twice either.

The parsers of dovecot-uidlist, dovecot-keywords and subscriptions are pure functions.
"""
from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..imap import mutf7
from ..store import preserve
from ..store.base import StoreError
from . import folders
from .progress import Progress
from .state import Journal
from .target import Target

BATCH = 64  # messages placed per uidlist append / directory fsync
COPY_CHUNK = 1 << 20
DEFAULT_POP3_UIDL_FORMAT = "%08Xu%08Xv"  # Dovecot's default pop3_uidl_format
SYSTEM_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


class TreeError(Exception):
    """The path is not a usable Maildir tree; str() is the one line to print."""


# -- pure parsers -------------------------------------------------------------------------------

@dataclass
class DovecotUidList:
    uidvalidity: int
    nextuid: int
    uids: dict[str, int] = field(default_factory=dict)  # base -> uid
    pop3: dict[int, str] = field(default_factory=dict)  # uid -> saved POP3 UIDL (P field)


def parse_uidlist(data: bytes) -> DovecotUidList | None:
    """dovecot-uidlist, versions 3 ("3 V<uv> N<next> G<guid>", lines "<uid> [ext] :<base>")
    and 1 ("1 <uv> <next>", lines "<uid> <base>").  None when the header is unusable."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if not lines or not lines[0].strip():
        return None
    head = lines[0].split()
    try:
        if head[0] == "1":
            ul = DovecotUidList(int(head[1]), int(head[2]))
        elif head[0] in ("2", "3"):
            fields = {h[0]: h[1:] for h in head[1:] if h}
            ul = DovecotUidList(int(fields["V"]), int(fields["N"]))
        else:
            return None
    except (IndexError, KeyError, ValueError):
        return None
    if ul.uidvalidity <= 0:
        return None
    top = 0
    for line in lines[1:]:
        if not line:
            continue
        if head[0] == "1":
            uid_s, _, base = line.partition(" ")
            ext = ""
        else:
            meta, sep, base = line.partition(" :")
            if not sep:  # a line without extensions: "<uid> :<base>" has the space; be lenient
                meta, sep, base = line.partition(":")
            uid_s, _, ext = meta.strip().partition(" ")
        if not uid_s.isdigit() or not base:
            continue
        uid = int(uid_s)
        if uid <= 0:
            continue
        ul.uids[base] = uid
        top = max(top, uid)
        for item in ext.split():
            if item.startswith("P") and len(item) > 1:
                ul.pop3[uid] = item[1:]
    ul.nextuid = max(ul.nextuid, top + 1, 1)
    return ul


def parse_keywords(data: bytes) -> dict[int, str]:
    """dovecot-keywords: "<index> <keyword>" lines; index i is letter chr(97 + i)."""
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        idx, _, word = line.partition(" ")
        if idx.isdigit() and word and int(idx) < 26:
            out[int(idx)] = word
    return out


def parse_subscriptions(data: bytes) -> list[list[str]]:
    """Dovecot's subscriptions file: version 2 ("V\\t2\\n\\n" then one name a line, levels
    separated by TAB) or version 1 (one name a line, levels separated by the namespace
    separator, taken to be "." or "/").  Levels are modified UTF-7 as on disk."""
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    out = []
    if lines and lines[0].startswith("V\t"):
        for line in lines[1:]:
            if line:
                out.append(line.split("\t"))
        return out
    for line in lines:
        if line:
            out.append(re.split(r"[./]", line) if not line.upper() == "INBOX" else ["INBOX"])
    return out


def folder_levels(dirname: str) -> list[str]:
    """Maildir++ directory ".Archive.2023" -> ["Archive", "2023"], decoded from modified UTF-7."""
    return _decode_levels(dirname[1:].split("."))


def _decode_levels(levels: list[str]) -> list[str]:
    out = []
    for lvl in levels:
        try:
            out.append(mutf7.decode(lvl))
        except Exception:
            out.append(lvl)
    return out


def split_name(name: str) -> tuple[str, str]:
    """(base, flag letters) of a Maildir file name."""
    base, sep, info = name.partition(":")
    if sep and info.startswith("2,"):
        return base, info[2:]
    return base, ""


def to_crlf(chunk: bytes, carry_cr: bool) -> tuple[bytes, bool]:
    """LF -> CRLF for one chunk of a stream; CRLF stays.  carry_cr: the previous chunk ended
    with CR (so a LF at the start of this one is already paired)."""
    if carry_cr and chunk.startswith(b"\n"):
        head, chunk = b"\n", chunk[1:]
    else:
        head = b""
    ends_cr = chunk.endswith(b"\r")
    out = re.sub(rb"(?<!\r)\n", b"\r\n", chunk)
    return head + out, ends_cr


# -- reading the tree ---------------------------------------------------------------------------

@dataclass
class SourceFolder:
    path: Path
    levels: list[str]  # decoded
    uidlist: DovecotUidList | None
    keywords: dict[int, str]


def scan_tree(root: Path) -> list[SourceFolder]:
    if not (root / "cur").is_dir() and not (root / "new").is_dir():
        raise TreeError(f"{root}: not a Maildir (no cur/ or new/)")
    out = []
    candidates = [(root, ["INBOX"])]
    for entry in sorted(os.listdir(root)):
        p = root / entry
        if entry.startswith(".") and entry not in (".", "..") and p.is_dir() and \
                ((p / "cur").is_dir() or (p / "new").is_dir()):
            candidates.append((p, folder_levels(entry)))
    for path, levels in candidates:
        ul = None
        try:
            ul = parse_uidlist((path / "dovecot-uidlist").read_bytes())
        except FileNotFoundError:
            pass
        kw: dict[int, str] = {}
        try:
            kw = parse_keywords((path / "dovecot-keywords").read_bytes())
        except FileNotFoundError:
            pass
        out.append(SourceFolder(path, levels, ul, kw))
    return out


def list_messages(path: Path) -> dict[str, tuple[str, str]]:
    """base -> (subdir, file name) of the messages in new/ and cur/."""
    out = {}
    for sub in ("new", "cur"):
        try:
            names_ = os.listdir(path / sub)
        except FileNotFoundError:
            continue
        for name in names_:
            if name.startswith("."):
                continue
            base, _ = split_name(name)
            out[base] = (sub, name)
    return out


def _flags_of(sub: str, letters: str, keywords: dict[int, str]) -> set[str]:
    flags = set()
    for c in letters:
        if c in SYSTEM_LETTERS:
            flags.add(SYSTEM_LETTERS[c])
        elif "a" <= c <= "z" and (ord(c) - 97) in keywords:
            flags.add(keywords[ord(c) - 97])
    return flags


def _copy_converted(src: Path, dst_dir: Path, tmp_name: str) -> tuple[int, float]:
    """Copy src into dst_dir/tmp/tmp_name with CRLF line ends, fsynced.  (size, mtime)."""
    st = os.stat(src)
    fd = os.open(dst_dir / "tmp" / tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    size = 0
    try:
        with open(src, "rb") as f:
            carry = False
            while True:
                chunk = f.read(COPY_CHUNK)
                if not chunk:
                    break
                out, carry = to_crlf(chunk, carry)
                view = memoryview(out)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(out)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, st.st_mtime


# -- the import ---------------------------------------------------------------------------------

async def run_import(cfg, account: str, root: Path, progress: Progress,
                     pop3_uidl_format: str = DEFAULT_POP3_UIDL_FORMAT, keep_uids: bool = True) -> int:
    root = Path(root)
    try:
        tree = await asyncio.to_thread(scan_tree, root)
    except (TreeError, OSError) as e:
        raise TreeError(str(e) if isinstance(e, TreeError) else f"{root}: {e.strerror}") from None
    target = Target(cfg, account)
    await target.open()
    if target.server_running:
        progress.line("the server is running: new mail is announced to its IMAP sessions as it arrives")
    known = await target.existing()
    journal = Journal(cfg.data_dir, target.account, f"maildir:{root.resolve()}")
    progress.plan(len(tree))
    local_names = {}
    try:
        for folder in tree:
            local = folders.local_name(folder.levels) if folder.levels != ["INBOX"] else "INBOX"
            if local in local_names.values() and local != "/".join(folder.levels):
                local = "/".join(folder.levels)  # "Deleted Messages" when "Trash" is taken already
            local_names[folder.path] = local
            progress.begin_folder(local)
            await target.ensure_mailbox(local, known)
            kept = False
            if keep_uids and folder.uidlist is not None:
                kept = await _import_keeping_uids(target, progress, folder, local, pop3_uidl_format)
            if not kept:
                await _import_appending(target, journal, progress, folder, local)
            await target.changed(local, force=True)
            progress.end_folder()
        await _subscriptions(target, root, tree, local_names, progress)
    finally:
        journal.close()
    progress.summary()
    return 1 if progress.c.failed else 0


async def _import_keeping_uids(target: Target, progress: Progress, folder: SourceFolder, local: str,
                               pop3_uidl_format: str) -> bool:
    ul = folder.uidlist
    assert ul is not None
    msgs = await asyncio.to_thread(list_messages, folder.path)
    # Files Dovecot had not listed yet get the UIDs it would have given them: from N up.
    nextuid = ul.nextuid
    plan: list[tuple[int, str, str]] = []  # (uid, sub, name)
    unlisted = []
    for base, (sub, name) in msgs.items():
        uid = ul.uids.get(base)
        if uid is None:
            unlisted.append((base, sub, name))
        else:
            plan.append((uid, sub, name))
    for base, sub, name in sorted(unlisted):
        plan.append((nextuid, sub, name))
        nextuid += 1
    plan.sort()
    words = [folder.keywords[i] for i in sorted(folder.keywords)]
    mdir = target.store.mailbox_dir(target.account, local)
    take = await asyncio.to_thread(preserve.begin, mdir, target.store.account_dir(target.account),
                                   ul.uidvalidity, nextuid, words)
    if take is None:
        progress.warn(f"{local}: holds other mail already, so Dovecot's UIDs cannot be kept there; "
                      "appending with new UIDs")
        return False
    letter_map = {}
    for i, w in folder.keywords.items():
        lower = [k.lower() for k in take.keywords]
        if w.lower() in lower:
            letter_map[chr(97 + i)] = chr(97 + lower.index(w.lower()))
        else:
            progress.warn(f"{local}: keyword {w!r} not kept (over 26 keywords or not an IMAP atom)")
    present = await asyncio.to_thread(preserve.present_files, mdir)
    missing = {uid for uid, base in take.present.items() if base not in present}
    if missing:  # listed by a run that was killed before the file was renamed into place
        await asyncio.to_thread(preserve.forget_missing, mdir, missing)
    done = set(take.present) - missing
    progress.add_work(len(plan))
    batch: list[tuple[int, str, int, float, str]] = []
    for uid, sub, name in plan:
        if uid in done:
            progress.skipped(1)
            continue
        _, letters = split_name(name)
        mapped = "".join(c if c in SYSTEM_LETTERS else letter_map.get(c, "") for c in letters
                         if c in SYSTEM_LETTERS or "a" <= c <= "z")
        tmp = preserve.tmp_name()
        try:
            size, mtime = await asyncio.to_thread(_copy_converted, folder.path / sub / name, mdir, tmp)
        except FileNotFoundError:  # Dovecot still running and moved it: look in the other subdir
            progress.failed(f"{local}: {name} vanished while copying (is Dovecot still running?)")
            continue
        batch.append((uid, tmp, size, mtime, mapped))
        progress.copied(size)
        if len(batch) >= BATCH:
            await asyncio.to_thread(preserve.place, mdir, batch)
            batch = []
            await target.changed(local)
    await asyncio.to_thread(preserve.place, mdir, batch)
    if local == "INBOX":
        await asyncio.to_thread(preserve.write_pop3_uidl, mdir, pop3_uidl_format, ul.pop3)
    return True


async def _import_appending(target: Target, journal: Journal, progress: Progress, folder: SourceFolder,
                            local: str) -> None:
    """Fresh UIDs (preserve.append_new, a batch at a time), flags and dates kept, the journal
    keyed by the Dovecot base name so a rerun copies nothing twice."""
    from .state import esc
    msgs = await asyncio.to_thread(list_messages, folder.path)
    key = f"maildir:{folder.path.name}"
    done = await asyncio.to_thread(journal.keys, key, 0)
    mdir = target.store.mailbox_dir(target.account, local)
    progress.add_work(len(msgs))
    batch: list[tuple[str, int, float, set[str]]] = []
    bases: list[str] = []

    async def flush() -> None:
        _, uids, lost = await asyncio.to_thread(preserve.append_new, mdir, batch)
        if lost:
            progress.warn(f"{local}: keywords not kept (26 per folder at most): {' '.join(lost)}")
        for base, uid, (_, size, _, _) in zip(bases, uids, batch):
            journal.record(key, 0, base, local, uid)
            progress.copied(size)
        batch.clear()
        bases.clear()
        await target.changed(local)

    for base, (sub, name) in sorted(msgs.items()):
        if esc(base) in done:
            progress.skipped(1)
            continue
        _, letters = split_name(name)
        tmp = preserve.tmp_name()
        try:
            size, mtime = await asyncio.to_thread(_copy_converted, folder.path / sub / name, mdir, tmp)
        except FileNotFoundError:
            progress.failed(f"{local}: {name} vanished while copying (is Dovecot still running?)")
            continue
        batch.append((tmp, size, mtime, _flags_of(sub, letters, folder.keywords)))
        bases.append(base)
        if len(batch) >= BATCH:
            await flush()
    if batch:
        await flush()


async def _subscriptions(target: Target, root: Path, tree: list[SourceFolder], local_names: dict,
                         progress: Progress) -> None:
    try:
        data = (root / "subscriptions").read_bytes()
    except FileNotFoundError:
        return
    by_levels = {tuple(f.levels): local_names.get(f.path) for f in tree}
    for raw_levels in parse_subscriptions(data):
        levels = _decode_levels(raw_levels)
        local = by_levels.get(tuple(levels))
        if local is None:
            continue  # subscribed to a folder that is not there (or a parent without mail)
        try:
            await target.store.subscribe(target.account, local, True)
        except StoreError as e:
            progress.warn(f"subscription {'/'.join(levels)}: {e}")
