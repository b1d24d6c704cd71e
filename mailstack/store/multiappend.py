"""MULTIAPPEND (RFC 3502) for the Maildir store: several messages added to one mailbox
all together or not at all.

Every message is first written to tmp/ and fsynced (a full disk fails here, with nothing
visible yet); then, under the mailbox's lock (so no session of this process looks in
between), all are renamed into cur/, the folder is fsynced and the UIDs are given in one
uidlist write.  A failure at any step removes every file of the command again, so a
reader never sees some of the messages without the others stay.  Index entries are not
written here: the messages are indexed when first looked at (as big deliveries are).
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Iterable

from . import filename as fn
from . import flags as fl
from .base import StoreError


def _stage(mailbox_dir: Path, plan: list[tuple[str, str, bytes, float]]) -> None:
    """Write each message to tmp/<base> and fsync it; on failure remove all of them."""
    made: list[Path] = []
    try:
        for base, _name, message, date in plan:
            tmp = mailbox_dir / "tmp" / base
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            made.append(tmp)
            try:
                view = memoryview(message)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(tmp, (date, date))
    except BaseException:
        _unlink_all(made)
        raise


def _commit(mailbox_dir: Path, plan: list[tuple[str, str, bytes, float]]) -> None:
    """tmp/<base> -> cur/<name> for all; on failure the ones moved go back to tmp/."""
    moved: list[tuple[Path, Path]] = []
    try:
        for base, name, _message, _date in plan:
            src, dst = mailbox_dir / "tmp" / base, mailbox_dir / "cur" / name
            os.rename(src, dst)
            moved.append((src, dst))
    except BaseException:
        for src, dst in reversed(moved):
            try:
                os.rename(dst, src)
            except OSError:
                _unlink_all([dst])
        raise


def _unlink_all(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


async def append_many(store, account: str, mailbox: str,
                      messages: list[tuple[bytes, Iterable[str], float | None]],
                      origin: object = None) -> tuple[int, list[int]]:
    """See Store.append_many.  `store` is the MaildirStore (its _state, _dsync, _publish)."""
    parsed = []
    for message, flags, date in messages:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise StoreError("message must be bytes")
        when = time.time() if date is None else float(date)
        if when < 0:
            raise StoreError("bad internal date")
        parsed.append((bytes(message), *fl.parse_flags(flags), when))
    st = await store._state(account, mailbox)
    quota = store.quota  # store/quota.py: the whole command fits or none of it is stored
    total = sum(len(m) for m, _, _, _ in parsed)
    if quota is not None:
        await quota.check(st.account, total, len(parsed))
    stored = False
    st.refs += 1
    try:
        keywords = list(dict.fromkeys(k for _, _, kws, _ in parsed for k in kws))
        async with st.lock:
            if keywords:
                await st.ensure_keywords(keywords)
            plan = []
            for message, system, kws, when in parsed:
                base = fn.new_base(when, len(message))
                letters = "".join(sorted(fl.letters_for(system, kws, st.keywords)))
                plan.append((base, fn.join(base, letters), message, when))
        await asyncio.to_thread(_stage, st.path, plan)
        try:
            async with st.lock:
                await asyncio.to_thread(_commit, st.path, plan)
                try:
                    await store._dsync(st.path / "cur")
                    uids = await st.assign([(base, None, None) for base, _, _, _ in plan])
                    uidvalidity = st.ul.uidvalidity
                except BaseException:
                    await asyncio.to_thread(_unlink_all, [st.path / "cur" / name for _, name, _, _ in plan])
                    st.dirty = True
                    raise
        except BaseException:
            await asyncio.to_thread(_unlink_all, [st.path / "tmp" / base for base, _, _, _ in plan])
            raise
        stored = True
    finally:
        st.refs -= 1
        if quota is not None:  # ends the change check() began, recording it if it was made
            await quota.charge(st.account, total if stored else 0, len(parsed) if stored else 0)
    ordered = [uids[base] for base, _, _, _ in plan]
    store._publish(st.account, st.name, "new", ordered, origin)
    return uidvalidity, ordered
