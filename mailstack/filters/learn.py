"""Learning from the user: a message moved (or copied) into Junk is reported as spam, one
moved out of Junk to anywhere but Trash as ham — to rspamd's controller (/learnspam,
/learnham) or spamd (TELL), as [filters] learn says.

The IMAP command only drops a small job on a bounded queue (`moved`, synchronous, no I/O)
and answers at once; one background task per process reads the messages from the store
and reports them, retrying a bounded number of times with growing pauses.  A full queue
drops the job with a warning: learning is best effort, the mail itself is never touched.
"""
from __future__ import annotations

import asyncio
import logging

from ..store.base import StoreError

log = logging.getLogger("mailstack.filters")

QUEUE_SIZE = 1000  # pending jobs (each one a mailbox and its UIDs)
MAX_UIDS = 1000  # messages reported per move; a bigger move teaches little more
MAX_MESSAGE = 10 * 1024 * 1024
JUNK, TRASH = "\\Junk", "\\Trash"
KEY = "filters.learner"


def backend(services):
    """The learner to report to under the current config, or None (learning off)."""
    cfg = services.config.filters
    choice = cfg.learn
    if choice == "auto":
        choice = "rspamd" if cfg.rspamd_controller else "spamd" if cfg.spamd_address else "off"
    if choice == "rspamd" and cfg.rspamd_controller:
        from .rspamd import Rspamd
        return Rspamd(cfg.rspamd_url or cfg.rspamd_controller, cfg.rspamd_controller, cfg.rspamd_password,
                      cfg.rspamd_timeout)
    if choice == "spamd" and cfg.spamd_address:
        from .chain import _address
        from .spamd import Spamd
        host, port, path = _address(cfg.spamd_address)
        return Spamd(host, port, path, cfg.spamd_timeout, 0.0, cfg.spamd_user)
    return None


def moved(services, account: str, source: str, dest: str, pairs) -> None:
    """IMAP COPY/MOVE from `source` to `dest` gave (old uid, new uid) `pairs`: queue a learn
    job if it crossed the Junk boundary.  Never raises, never waits."""
    try:
        cfg = services.config.filters
        if not pairs or cfg.learn == "off" or not (cfg.rspamd_controller or cfg.spamd_address):
            return
        learner = services.extra.get(KEY)
        if learner is None:
            learner = services.extra[KEY] = Learner(services)
        learner.submit(account, source, dest, [new for _, new in pairs][:MAX_UIDS])
    except Exception:  # learning must never break the IMAP command
        log.exception("queueing a learn job failed")


class Learner:
    def __init__(self, services) -> None:
        self.services = services
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self.task: asyncio.Task | None = None

    def submit(self, account: str, source: str, dest: str, uids: list[int]) -> None:
        try:
            self.queue.put_nowait((account, source, dest, uids))
        except asyncio.QueueFull:
            log.warning("learn queue full: move of %d message(s) by %s not reported", len(uids), account)
            return
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.queue.empty():
            job = self.queue.get_nowait()
            try:
                await self._job(*job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("learn job failed")

    async def _kind(self, account: str, source: str, dest: str) -> tuple[str | None, bool]:
        """("spam" | "ham" | None, whether the move touched Junk at all)."""
        special = {}
        for info in await self.services.store.list_mailboxes(account):
            if info.special_use:
                special[info.name] = info.special_use
        into, out_of = special.get(dest) == JUNK, special.get(source) == JUNK
        if into and not out_of:
            return "spam", True
        if out_of and not into and special.get(dest) != TRASH:
            return "ham", True
        return None, into or out_of

    async def _job(self, account: str, source: str, dest: str, uids: list[int]) -> None:
        kind, junk = await self._kind(account, source, dest)
        if kind is None:
            if junk:  # say why nothing was reported (from Junk to Trash: the user just deletes spam)
                log.info("%s moved %d message(s) from %s to %s: nothing to learn", account, len(uids), source,
                         dest)
            return
        target = backend(self.services)
        if target is None:
            return
        from .chain import metrics_of
        metrics = metrics_of(self.services)
        mbox = await self.services.store.open(account, dest, read_only=True)
        try:
            for uid in uids:
                try:
                    message = await mbox.read(uid)
                except StoreError:
                    continue  # moved on or expunged since: nothing to teach
                if len(message) > MAX_MESSAGE:
                    continue
                result = await self._report(target, kind, message, account, uid)
                metrics.learned[(kind, result)] += 1
        finally:
            await mbox.close()

    async def _report(self, target, kind: str, message: bytes, account: str, uid: int) -> str:
        from .base import FilterUnavailable, LearnRefused
        retries = self.services.config.filters.learn_retries
        for attempt in range(1, retries + 1):
            try:
                await target.learn(kind, message)
                log.info("learned %s from %s (uid %d) via %s", kind, account, uid, target.name)
                return "ok"
            except LearnRefused as e:  # the learner answered and said no: asking again won't help
                log.warning("%s from %s (uid %d) not learned by %s: %s", kind, account, uid, target.name, e)
                return "refused"
            except FilterUnavailable as e:
                if attempt == retries:
                    log.warning("learning %s from %s (uid %d) via %s failed after %d attempts: %s", kind,
                                account, uid, target.name, attempt, e)
                    return "failed"
                await asyncio.sleep(2 ** (attempt - 1))
        return "failed"
