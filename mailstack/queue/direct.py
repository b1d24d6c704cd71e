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
enough to be held in memory, the queue manager running with a local delivery slot free
and no queued mail waiting for one (so queue.local_concurrency still bounds local
delivery, and a burst beyond it is queued as before).  Everything else (remote or
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


async def deliver_at_accept(services, qid: str, sender: str, recipients: list[str], chunks: list,
                            meta: dict) -> list[str] | None:
    """Deliver now when the message qualifies.  Returns None when it does not (nothing was
    done: queue it as usual), else the recipients still to be queued ([] when every account
    has it).  Never raises for delivery problems."""
    manager = services.queue
    if manager is None or not getattr(manager, "running", False) or not hasattr(manager, "record_direct"):
        return None
    size = sum(len(c) for c in chunks)
    if size > MAX_BYTES:
        return None
    targets = manager.local.expand(recipients)
    if not targets or any(t.kind != "local" for t in targets):
        return None
    if not await manager.take_local_slot():  # local delivery is busy: queue it, as before
        return None
    data = b"".join(chunks)
    msg = QueuedMessage(qid=qid, sender=sender, recipients=list(recipients), source=data,  # type: ignore[arg-type]
                        arrival=time.time(), meta=dict(meta), data=data)
    try:
        results = await manager.local.deliver(msg, [t.addr for t in targets])
    except Exception:  # a bug must not lose the message: the queue delivers it (ids dedupe)
        log.exception("delivery at accept failed; queued instead", extra={"qid": qid})
        return list(recipients)
    finally:
        manager.release_local_slot()
    manager.record_direct(msg, targets, results)
    return [t.addr for t, r in zip(targets, results) if r.status != "sent"]
