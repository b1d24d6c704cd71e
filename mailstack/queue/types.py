"""What the queue manager hands to a transport, and what it gets back.

Local delivery (Maildir) and remote delivery (SMTP client) are both transports;
the manager owns retries, backoff, expiry and bounces, the transports only try.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..store.base import MessageSource


@dataclass
class QueuedMessage:
    qid: str
    sender: str  # envelope sender; "" is the null sender (bounces)
    recipients: list[str]  # envelope recipients not yet delivered
    source: MessageSource  # the message bytes: spool file, offset, size
    arrival: float  # time.time() when "250 queued" was said
    meta: dict = field(default_factory=dict)
    # The message bytes when still in memory from SMTP (Spool.keep_in_memory): local delivery
    # uses them instead of reading the queue file back.  None otherwise.
    data: bytes | None = field(default=None, repr=False, compare=False)
    # meta keys set by SMTP-in: client_ip, client_helo, auth_user, listener,
    # smtputf8 (bool), body ("7BIT" | "8BITMIME"), envid/notify/orcpt when DSN is supported


@dataclass
class RecipientResult:
    recipient: str
    status: str  # "sent" | "deferred" | "bounced"
    reply: str  # the remote reply or our reason, e.g. "550 5.1.1 <x@y>: user unknown"
    relay: str = "none"  # "local" | "mx.example.com[192.0.2.1]:25" | "none"


class RemoteTransport(Protocol):
    async def deliver(self, message: QueuedMessage, recipients: list[str]) -> list[RecipientResult]:
        """Try to deliver to remote recipients (any number of domains); one result per recipient.
        Must not raise for delivery problems: they are "deferred" or "bounced" results."""

    async def close(self) -> None:
        """Close cached connections."""
