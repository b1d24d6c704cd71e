"""A small in-memory Store (store/base.py semantics) so the IMAP session can be tested on its
own.  The end-to-end tests use the real Maildir store; this one only stands in for it in the
in-process tests, following the interface's contract (per-session views, events)."""
from __future__ import annotations

import time

from mailstack.events import MailboxEvent
from mailstack.store.base import (Changes, Mailbox, MailboxExists, MailboxInfo, MailboxNotFound, MessageInfo,
                                  SPECIAL_MAILBOXES, Store, StoreError)


class _Box:
    def __init__(self, name, uidvalidity):
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self.msgs: dict[int, tuple[bytes, set, float]] = {}
        self.cache: dict[int, dict] = {}
        self.subscribed = False
        self.special = SPECIAL_MAILBOXES.get(name)


class MemStore(Store):
    def __init__(self, events):
        self.events = events
        self.accounts: dict[str, dict[str, _Box]] = {}
        self._v = int(time.time())

    def _acct(self, account):
        return self.accounts.setdefault(account, {})

    def _box(self, account, name) -> _Box:
        try:
            return self._acct(account)[name]
        except KeyError:
            raise MailboxNotFound(f"no mailbox {name}") from None

    async def ensure_account(self, account):
        boxes = self._acct(account)
        for name in ["INBOX", *SPECIAL_MAILBOXES]:
            if name not in boxes:
                self._v += 1
                boxes[name] = _Box(name, self._v)
                boxes[name].subscribed = True

    def _add(self, account, box, message, flags, date):
        uid = box.uidnext
        box.uidnext += 1
        box.msgs[uid] = (bytes(message), set(flags) - {"\\Recent"}, date or time.time())
        return uid

    async def deliver(self, account, message, delivery_id, mailbox="INBOX", flags=()):
        box = self._box(account, mailbox)
        uid = self._add(account, box, message, flags, None)
        self.events.publish(MailboxEvent(account, mailbox, "new", (uid,)))
        return True

    async def append(self, account, mailbox, message, flags=(), internaldate=None, origin=None):
        box = self._box(account, mailbox)
        uid = self._add(account, box, message, flags, internaldate)
        self.events.publish(MailboxEvent(account, mailbox, "new", (uid,), origin))
        return box.uidvalidity, uid

    async def open(self, account, name, read_only=False):
        return MemMailbox(self, account, self._box(account, name), read_only)

    async def status(self, account, name):
        box = self._box(account, name)
        mark = self.recent_mark(account, name, box.uidvalidity)
        return {"MESSAGES": len(box.msgs), "RECENT": sum(1 for u in box.msgs if u > mark), "UIDNEXT": box.uidnext,
                "UIDVALIDITY": box.uidvalidity,
                "UNSEEN": sum(1 for m in box.msgs.values() if "\\Seen" not in m[1]),
                "SIZE": sum(len(m[0]) for m in box.msgs.values()),
                "DELETED": sum(1 for m in box.msgs.values() if "\\Deleted" in m[1])}

    async def list_mailboxes(self, account):
        boxes = self._acct(account)
        names = sorted(boxes, key=lambda n: (n != "INBOX", n))
        return [MailboxInfo(n, boxes[n].special, boxes[n].subscribed,
                            any(o.startswith(n + "/") for o in boxes)) for n in names]

    async def create_mailbox(self, account, name, special_use=None):
        boxes = self._acct(account)
        if name in boxes:
            raise MailboxExists("mailbox exists")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            n = "/".join(parts[:i])
            if n not in boxes:
                self._v += 1
                boxes[n] = _Box(n, self._v)

    async def delete_mailbox(self, account, name):
        boxes = self._acct(account)
        self._box(account, name)
        if name == "INBOX":
            raise StoreError("cannot delete INBOX")
        del boxes[name]
        self.events.publish(MailboxEvent(account, name, "deleted"))

    async def rename_mailbox(self, account, old, new):
        boxes = self._acct(account)
        box = self._box(account, old)
        if new in boxes:
            raise MailboxExists("target exists")
        if old == "INBOX":
            await self.create_mailbox(account, new)
            nb = boxes[new]
            for uid in sorted(box.msgs):
                self._add(account, nb, *box.msgs[uid][:1], box.msgs[uid][1], box.msgs[uid][2])
            box.msgs.clear()
            return
        for n in [n for n in boxes if n == old or n.startswith(old + "/")]:
            b = boxes.pop(n)
            b.name = new + n[len(old):]
            boxes[b.name] = b

    async def subscribe(self, account, name, subscribed):
        self._box(account, name).subscribed = subscribed


class MemMailbox(Mailbox):
    def __init__(self, store, account, box, read_only):
        self.store, self.account, self.box = store, account, box
        self.name = box.name
        self.uidvalidity = box.uidvalidity
        self.read_only = read_only
        self.messages = self._snapshot()
        self.uidnext = box.uidnext

    def _snapshot(self):
        return [MessageInfo(uid, set(f), len(d), t, str(uid)) for uid, (d, f, t) in sorted(self.box.msgs.items())]

    async def refresh(self):
        old = {m.uid: m for m in self.messages}
        cur = self._snapshot()
        curd = {m.uid: m for m in cur}
        ch = Changes()
        ch.expunged = [u for u in old if u not in curd]
        ch.new = [m for m in cur if m.uid not in old]
        ch.flags = [m for m in cur if m.uid in old and old[m.uid].flags != m.flags]
        self.messages = cur
        self.uidnext = self.box.uidnext
        return ch

    async def read(self, uid):
        try:
            return self.box.msgs[uid][0]
        except KeyError:
            raise StoreError("expunged") from None

    async def read_range(self, uid, start, length):
        return (await self.read(uid))[start:start + length]

    def path(self, uid):
        return None

    async def store_flags(self, uids, flags, mode, origin=None):
        changed = []
        for uid in uids:
            if uid not in self.box.msgs:
                continue
            d, f, t = self.box.msgs[uid]
            new = f | set(flags) if mode == "+" else f - set(flags) if mode == "-" else set(flags)
            if new != f:
                self.box.msgs[uid] = (d, new, t)
                changed.append(uid)
        for m in self.messages:
            if m.uid in self.box.msgs:
                m.flags = set(self.box.msgs[m.uid][1])
        if changed:
            self.store.events.publish(MailboxEvent(self.account, self.name, "flags", tuple(changed), origin))
        return [m for m in self.messages if m.uid in changed]

    async def expunge(self, uids=None, origin=None, flagged_only=True):
        want = None if uids is None else set(uids)
        gone = [u for u, (d, f, t) in self.box.msgs.items()
                if ("\\Deleted" in f or not flagged_only and want is not None) and (want is None or u in want)]
        for u in gone:
            del self.box.msgs[u]
        self.messages = [m for m in self.messages if m.uid not in gone]
        if gone:
            self.store.events.publish(MailboxEvent(self.account, self.name, "expunge", tuple(gone), origin))
        return gone

    async def copy(self, uids, dest, origin=None):
        db = self.store._box(self.account, dest)
        pairs = []
        for uid in uids:
            d, f, t = self.box.msgs[uid]
            pairs.append((uid, self.store._add(self.account, db, d, f, t)))
        self.store.events.publish(MailboxEvent(self.account, dest, "new", tuple(p[1] for p in pairs), origin))
        return pairs

    async def cache_get(self, uid):
        return self.box.cache.get(uid)

    async def cache_put(self, entries):
        self.box.cache.update(entries)

    def derived(self):  # shared by the mailbox's views, as the Maildir store's
        return self.box.__dict__.setdefault("derived", {})

    async def close(self):
        pass
