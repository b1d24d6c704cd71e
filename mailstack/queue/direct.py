"""Local delivery at accept time: mail for local accounts only goes into the Maildirs
before the "250", without a queue file.

Why: the queue path costs two durable steps per message (the queue file, then the
Maildir file) plus a rename and an unlink, all in the same file-system journal; on a
disk-bound machine that halves the rate.  Delivered at once, the Maildir file (fsynced,
its directory fsynced: the store's deliver()) IS the durable copy, so the guarantee
stays the same: nothing is acknowledged before it is on disk.  A crash before the "250"
loses nothing the client was told about (it sends again; a duplicate is what RFC 5321
section 6.1 allows).

Only the plain case takes this path: every recipient a local account, the message small
enough to be held in memory, the queue manager running, and fewer than
queue.local_concurrency deliveries at accept time under way (a burst beyond it is queued
as before).  The bound is its own, not the queue's local slots: the store writes
concurrent deliveries as one group commit (store/groupwrite.py), so twenty sessions
delivering at once cost one worker call per batch, not twenty; sharing the queue's slots
made a 20-session burst spill into the queue, and once anything was queued every later
message followed it (the old "nothing queued waiting" rule), paying the queue file, its
rename and unlink on top.  Everything else (remote or
unknown recipients, held mail, big messages), and every account whose delivery did not
end "sent" (a full disk, a Sieve reject that needs a bounce), goes through the queue as
before, with the same queue id: the store's delivery ids make a second delivery to an
account that already has the message a no-op.
"""
from __future__ import annotations

import logging
import time

from .types import QueuedMessage

log = logging.getLogger("mailstack.queue")

# Bigger messages are written to the queue first (and streamed from there).
MAX_BYTES = 1024 * 1024
_in_flight = 0  # deliveries at accept time under way (bounded by queue.local_concurrency)


async def deliver_at_accept(services, qid: str, sender: str, recipients: list[str], chunks: list,
                            meta: dict) -> list[str] | None:
    """Deliver now when the message qualifies.  Returns None when it does not (nothing was
    done: queue it as usual), else the recipients still to be queued ([] when every account
    has it).  Never raises for delivery problems."""
    global _in_flight
    manager = services.queue
    if manager is None or not getattr(manager, "running", False) or not hasattr(manager, "record_direct"):
        return None
    if _in_flight >= services.config.queue.local_concurrency:
        return None
    size = sum(len(c) for c in chunks)
    if size > MAX_BYTES:
        return None
    targets = manager.local.expand(recipients)
    if not targets or any(t.kind != "local" for t in targets):
        return None
    data = b"".join(chunks)
    msg = QueuedMessage(qid=qid, sender=sender, recipients=list(recipients), source=data,  # type: ignore[arg-type]
                        arrival=time.time(), meta=dict(meta), data=data)
    _in_flight += 1
    try:
        results = await manager.local.deliver(msg, [t.addr for t in targets])
    except Exception:  # a bug must not lose the message: the queue delivers it (ids dedupe)
        log.exception("delivery at accept failed; queued instead", extra={"qid": qid})
        return list(recipients)
    finally:
        _in_flight -= 1
    manager.record_direct(msg, targets, results)
    return [t.addr for t, r in zip(targets, results) if r.status != "sent"]
