"""Where imported messages go.

Always into the store: a MaildirStore on the configured mail_dir, built the way server.py
builds it (accounts, folders, subscriptions), and the store-level functions of
store/preserve.py for the messages themselves (a batch at a time, or under kept UIDs).  The
Maildir store is made to be shared by several processes (UID assignment and keyword tables
are flock()ed, files arrive tmp/ -> fsync -> rename), so the importer writes the same way
whether or not the server runs.  When a server does run, its control socket is
told after each batch which mailbox changed; the server publishes the same "new" event local
delivery publishes, so IMAP IDLE sessions report the mail at once instead of at their next
poll (imap.idle_refresh).  Message bytes never go over the control socket (it is a small
JSON-lines channel; a 50 MiB message has no place there).
"""
from __future__ import annotations

import asyncio
import logging
import time

from ..events import EventBus
from ..store import names
from ..store.base import MailboxExists, StoreError

log = logging.getLogger("mailstack.migrate")

NOTIFY_EVERY = 0.5  # seconds: at most this often per mailbox


class Target:
    def __init__(self, cfg, account: str) -> None:
        from ..fsutil import GroupSync
        from ..store.maildir import MaildirStore
        self.cfg = cfg
        self.account = names.normalize_account(account)
        self.store = MaildirStore(cfg.mail_dir, EventBus(), GroupSync())
        self.server_running = False
        self._pending: dict[str, float] = {}
        self._control = None

    async def open(self) -> None:
        await self.store.ensure_account(self.account)
        self.server_running = await asyncio.to_thread(self._ask, {"action": "status"}) is not None

    def _ask(self, req: dict) -> dict | None:
        try:
            from ..queue import control
            return control.request(self.cfg, req, timeout=5)
        except Exception as e:  # no socket, no permission: the server's own poll finds the mail
            log.debug("control socket: %s", e)
            return None

    async def existing(self) -> set[str]:
        return {b.name for b in await self.store.list_mailboxes(self.account)}

    async def ensure_mailbox(self, name: str, known: set[str]) -> None:
        if name in known:
            return
        try:
            await self.store.create_mailbox(self.account, name)
        except MailboxExists:
            pass
        known.add(name)
        for parent in names.parents(name):
            known.add(parent)

    async def changed(self, mailbox: str, force: bool = False) -> None:
        """Tell a running server that `mailbox` has new messages (throttled)."""
        if not self.server_running:
            return
        now = time.monotonic()
        last = self._pending.get(mailbox, 0.0)
        if not force and now - last < NOTIFY_EVERY:
            return
        self._pending[mailbox] = now
        resp = await asyncio.to_thread(self._ask, {"action": "mailbox-changed", "account": self.account,
                                                   "mailbox": mailbox})
        if resp is None or not resp.get("ok"):
            log.debug("server not told about %s: %s", mailbox, resp)


def check_flags(flags: set[str]) -> tuple[list[str], list[str]]:
    """(flags the store accepts, dropped ones): \\Recent and unknown system flags are dropped,
    and keywords that are not IMAP atoms."""
    from ..store import flags as fl
    keep, drop = [], []
    for f in flags:
        try:
            fl.parse_flags([f])
        except StoreError:
            drop.append(f)
            continue
        if f.lower() != "\\recent":
            keep.append(f)
    return keep, drop
