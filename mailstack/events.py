"""In-process notifications: a new message, changed flags, an expunge.

Publishers (queue delivery, IMAP/POP3 sessions) and subscribers (IDLE sessions,
other sessions on the same mailbox) live in the same event loop, so delivery is a
direct callback: no polling, no sockets.  Callbacks must be cheap and must not
raise; they typically set an asyncio.Event or append to a list.
"""
from __future__ import annotations

import logging
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
    # Subscribers of one key are a dict keyed by a token of their own (insertion-ordered, so
    # callbacks run in subscription order): an unsubscribe is one deletion.  A list made it
    # a scan comparing bound methods, O(sessions) per session that ends: 10,000 IDLE sessions
    # on one mailbox that drop together cost the loop O(sessions^2).
    def __init__(self) -> None:
        self._subs: dict[Hashable, dict[object, Callback]] = {}
        self._account_subs: dict[str, dict[object, Callback]] = {}

    def subscribe(self, account: str, mailbox: str, callback: Callback) -> Callable[[], None]:
        """Call `callback` for every event on (account, mailbox). Returns an unsubscribe function."""
        return _add(self._subs, (account.lower(), mailbox), callback)

    def subscribe_account(self, account: str, callback: Callback) -> Callable[[], None]:
        """Call `callback` for every event of every mailbox of `account` (IMAP NOTIFY)."""
        return _add(self._account_subs, account.lower(), callback)

    def publish(self, event: MailboxEvent) -> None:
        # copied: a callback may unsubscribe (itself or another) while they run
        callbacks = list(self._subs.get((event.account.lower(), event.mailbox), {}).values())
        callbacks += self._account_subs.get(event.account.lower(), {}).values()
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break delivery
                log.exception("event subscriber failed for %s/%s", event.account, event.mailbox)

    def subscribers(self, account: str, mailbox: str) -> int:
        return len(self._subs.get((account.lower(), mailbox), ()))


def _add(table: dict, key: Hashable, callback: Callback) -> Callable[[], None]:
    token = object()  # not the callback: the same one may subscribe twice
    table.setdefault(key, {})[token] = callback

    def unsubscribe() -> None:
        subs = table.get(key)
        if subs is not None and subs.pop(token, None) is not None and not subs:
            del table[key]

    return unsubscribe
