"""Local transport: envelope recipients -> delivery targets, and delivery into the store.

Alias expansion happens when the manager first takes a message up (and is then
remembered in the message's status), so a retry never expands twice and a local
account reached through several recipients gets the message once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from dataclasses import dataclass

from ..directory import normalize_address
from ..filters.prefs import spam_to_inbox
from ..store.base import MailboxNotFound, MessageSource, StoreError
from ..store.quota import QuotaExceeded
from .types import QueuedMessage, RecipientResult

log = logging.getLogger("mailstack.queue")

JUNK = "Junk"  # the \Junk special-use folder every account is made with


@dataclass
class Target:
    """One place a message must reach: a local account or a remote address.

    orig is the envelope recipient it came from (differs after alias expansion).
    status: "pending" | "deferred" | "sent" | "bounced".
    """

    addr: str
    kind: str  # "local" | "remote" | "unknown"
    orig: str
    status: str = "pending"
    attempts: int = 0
    reply: str = ""
    relay: str = "none"
    last_try: float = 0.0
    history: list | None = None  # [[time, status, reply], ...], newest last, bounded

    HISTORY = 10

    def record(self, status: str, reply: str, relay: str, when: float) -> None:
        self.status, self.reply, self.relay, self.last_try = status, reply, relay, when
        self.attempts += 1
        self.history = ((self.history or []) + [[round(when, 3), status, reply]])[-self.HISTORY:]

    def to_json(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_json(cls, d: dict) -> "Target":
        return cls(**{k: d[k] for k in ("addr", "kind", "orig", "status", "attempts", "reply", "relay",
                                        "last_try", "history") if k in d})


def final_delivery(message: "bytes | MessageSource", sender: str, account: str) -> "bytes | MessageSource":
    """The message with the lines final delivery puts on top (RFC 5321 section 4.4: the
    envelope sender as Return-Path; as Postfix's local and virtual agents and Dovecot's LDA
    do, the account as Delivered-To, which sieve's redirect and people use to see loops)."""
    head = f"Return-Path: <{sender}>\r\nDelivered-To: {account}\r\n".encode("utf-8")
    if isinstance(message, MessageSource):
        return dataclasses.replace(message, prefix=head + message.prefix)
    return head + message


def delivery_id(qid: str, account: str) -> str:
    """Stable per (message, account): a second delivery after a crash is a no-op in the store."""
    return f"{qid}.{hashlib.sha256(account.encode('utf-8')).hexdigest()[:12]}"


class LocalTransport:
    def __init__(self, services) -> None:
        # services.directory is re-read by the server when its files change: no file access here
        self.services = services

    def expand(self, recipients: list[str]) -> list[Target]:
        """Envelope recipients -> targets, de-duplicated: each local account once, each remote
        address once; a local address that leads nowhere is an "unknown" target (it bounces)."""
        directory = self.services.directory
        seen: set[tuple[str, str]] = set()
        out: list[Target] = []

        def add(addr: str, kind: str, orig: str) -> None:
            if (kind, addr) not in seen:
                seen.add((kind, addr))
                out.append(Target(addr=addr, kind=kind, orig=orig))

        for rcpt in recipients:
            res = directory.resolve(rcpt)
            if res.kind == "remote":
                add(normalize_address(rcpt) if "@" in rcpt else rcpt, "remote", rcpt)
                continue
            local, remote = directory.expand(rcpt)
            if not local and not remote:
                add(normalize_address(rcpt), "unknown", rcpt)
            for account in local:
                add(account, "local", rcpt)
            for addr in remote:
                add(addr, "remote", rcpt)
        return out

    async def deliver(self, message: QueuedMessage, accounts: list[str]) -> list[RecipientResult]:
        """Deliver to local accounts; one result per account, in order. Never raises for delivery
        problems. Several accounts of one message are written in parallel (bounded)."""
        if len(accounts) == 1:  # the usual case: no task of its own (one loop cycle less per message)
            return [await self._deliver_one(message, accounts[0])]
        results: list[RecipientResult | None] = [None] * len(accounts)
        for start in range(0, len(accounts), self.PARALLEL):
            batch = range(start, min(start + self.PARALLEL, len(accounts)))
            done = await asyncio.gather(*(self._deliver_one(message, accounts[i]) for i in batch))
            for i, r in zip(batch, done):
                results[i] = r
        return results  # type: ignore[return-value]

    PARALLEL = 8

    async def _deliver_one(self, message: QueuedMessage, account: str) -> RecipientResult:
        if not self.services.directory.account_exists(account):
            return RecipientResult(account, "bounced", f"550 5.1.1 <{account}>: user unknown", "local")
        # A check at SMTP time (DMARC quarantine, a spam filter) may have judged it junk.
        mailbox = JUNK if message.meta.get("junk") else "INBOX"
        if mailbox == JUNK and await spam_to_inbox(self.services.config.data_dir, account):
            mailbox = "INBOX"  # the user's choice (`mailstack user prefs ADDRESS --spam-folder inbox`)
        did = delivery_id(message.qid, account)
        try:
            if self.services.config.sieve.enabled:  # the user's filters decide where it goes
                if message.data is not None:  # still in memory from SMTP: no read of the queue file
                    message = dataclasses.replace(message, source=message.data, data=None)
                status, reply = await self._sieve().deliver(message, account, did, mailbox)
                return RecipientResult(account, status, reply, "local")
            source = message.data if message.data is not None else message.source
            mailbox, added = await self._store(account, source, did, mailbox, sender=message.sender)
        except QuotaExceeded as e:  # full: kept and retried (until queue.max_lifetime); too big: bounced
            if e.permanent:
                return RecipientResult(account, "bounced", f"552 5.2.2 <{account}>: {e}", "local")
            return RecipientResult(account, "deferred", f"452 4.2.2 <{account}>: {e}", "local")
        except StoreError as e:
            return RecipientResult(account, "deferred", f"452 4.2.0 <{account}>: {e}", "local")
        except OSError as e:
            return RecipientResult(account, "deferred",
                                   f"451 4.3.0 <{account}>: local delivery failed: {e.strerror or e}", "local")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the store must not lose the message: retry later
            log.exception("store.deliver failed", extra={"qid": message.qid})
            return RecipientResult(account, "deferred", f"451 4.3.0 <{account}>: local delivery failed: {e}",
                                   "local")
        where = "" if mailbox == "INBOX" else f" folder {mailbox}"
        return RecipientResult(account, "sent",
                               f"delivered to maildir{where}" if added else "delivered to maildir (duplicate)",
                               "local")

    def _sieve(self):
        from ..sieve.deliver import SieveDelivery  # sieve sits above the queue: imported on first use
        if self._sieve_delivery is None:
            self._sieve_delivery = SieveDelivery(self.services, self._store)
        return self._sieve_delivery

    _sieve_delivery = None

    async def _store(self, account: str, message, did: str, mailbox: str, flags=(),
                     fallback: bool = True, *, sender: str) -> tuple[str, bool]:
        """Into `mailbox`; when it is gone (the user deleted Junk) into INBOX unless fallback is
        off (sieve decides then).  Returns (mailbox used, added)."""
        store = self.services.store
        message = final_delivery(message, sender, account)
        try:
            return mailbox, await store.deliver(account, message, did, mailbox=mailbox, flags=flags)
        except MailboxNotFound:
            if mailbox == "INBOX" or not fallback:
                raise
            # the user deleted that folder: never lose the message over it
            return "INBOX", await store.deliver(account, message, did, flags=flags)
