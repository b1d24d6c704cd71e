"""In-process notifications: a new message, changed flags, an expunge.

Publishers (queue delivery, IMAP/POP3 sessions) and subscribers (IDLE sessions,
other sessions on the same mailbox) live in the same event loop, so delivery is a
direct callback: no polling, no sockets.  Callbacks must be cheap and must not
raise; they typically set an asyncio.Event or append to a list.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable

log = logging.getLogger("mailstack.events")


@dataclass(frozen=True)
class MailboxEvent:
    """Something changed in one mailbox of one account.

    kind: "new" (messages appended/delivered), "flags", "expunge", "deleted" (mailbox gone);
      for NOTIFY (imap/notify.py) also "created", "renamed", "subscribed", "unsubscribed"
    uids: the UIDs concerned (may be empty when unknown: subscribers then rescan).
    origin: an opaque token of the publishing session, so it can skip its own events.
    """

    account: str
    mailbox: str
    kind: str
    uids: tuple[int, ...] = ()
    origin: object = field(default=None, compare=False)
    old_name: str | None = None  # kind "renamed": the name before (mailbox is the new one)


Callback = Callable[[MailboxEvent], None]


class EventBus:
    def __init__(self) -> None:
        self._subs: dict[Hashable, list[Callback]] = defaultdict(list)
        self._account_subs: dict[str, list[Callback]] = defaultdict(list)

    def subscribe(self, account: str, mailbox: str, callback: Callback) -> Callable[[], None]:
        """Call `callback` for every event on (account, mailbox). Returns an unsubscribe function."""
        key = (account.lower(), mailbox)
        self._subs[key].append(callback)

        def unsubscribe() -> None:
            subs = self._subs.get(key)
            if subs and callback in subs:
                subs.remove(callback)
                if not subs:
                    del self._subs[key]

        return unsubscribe

    def subscribe_account(self, account: str, callback: Callback) -> Callable[[], None]:
        """Call `callback` for every event of every mailbox of `account` (IMAP NOTIFY)."""
        key = account.lower()
        self._account_subs[key].append(callback)

        def unsubscribe() -> None:
            subs = self._account_subs.get(key)
            if subs and callback in subs:
                subs.remove(callback)
                if not subs:
                    del self._account_subs[key]

        return unsubscribe

    def publish(self, event: MailboxEvent) -> None:
        callbacks = list(self._subs.get((event.account.lower(), event.mailbox), ()))
        callbacks += self._account_subs.get(event.account.lower(), ())
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break delivery
                log.exception("event subscriber failed for %s/%s", event.account, event.mailbox)

    def subscribers(self, account: str, mailbox: str) -> int:
        return len(self._subs.get((account.lower(), mailbox), ()))
