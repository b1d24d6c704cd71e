"""The queue manager: takes accepted messages up, delivers them, retries, bounces.

Life of a message (compare Postfix's qmgr):

    incoming/ --take up--> active/ --deliver--> removed          (all targets final)
                              |                  + DSN enqueued   (some bounced, sender not null)
                              +--> deferred/ --next try due--> active/ ...
                              +--> hold/ (operator) --release--> active/

Nothing polls: a new message wakes the manager through spool.on_enqueue, deferred
messages wait on one timer for the earliest retry, and the maildrop of `sendmail` is
picked up when the control socket says so (and scanned every few seconds as a fallback).

An Entry is "busy" while a coroutine of the manager owns its file (renaming it or
delivering it).  Operator actions (delete, hold) on a busy entry are remembered and
carried out at the next safe point, so the file is never pulled from under a delivery.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from dataclasses import dataclass, field

from ..fsutil import fsync_dir
from ..store.base import MessageSource
from .bounce import Failure, build_dsn
from .local import LocalTransport, Target
from .spool import CorruptQueueFile, Spool, read_envelope
from .types import QueuedMessage, RecipientResult

log = logging.getLogger("mailstack.queue")

MAILDROP_SCAN_INTERVAL = 5.0
STRAY_AGE = 60.0  # seconds before an unannounced file in incoming/ is taken up by the scan
NOT_CONFIGURED = "451 4.4.0 outbound delivery not configured"


@dataclass
class Entry:
    qid: str
    state: str  # the directory its file is in: incoming | active | deferred
    msg: QueuedMessage | None = None  # None while deferred (read back when due)
    targets: list[Target] | None = None  # None until expanded
    attempts: int = 0  # delivery passes that ended deferred
    next_try: float = 0.0
    busy: bool = False
    action: str | None = None  # "delete" | "hold", waiting for the entry to stop being busy
    gone: bool = False  # removed from the manager (deleted/held) while queued
    started: float = field(default_factory=time.time)
    # (kind, address) already delivered: remote successes recorded in done/ right after the
    # remote 250, and targets final before a requeue.  Never delivered again.
    finals: set = field(default_factory=set)

    def status_json(self) -> dict:
        return {"qid": self.qid, "attempts": self.attempts, "next_try": self.next_try,
                "targets": [t.to_json() for t in self.targets or []]}


async def _wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait for `event` at most `timeout` seconds. (Not asyncio.wait_for: on Python 3.11 it
    swallows a cancellation that arrives as the event is set, and stop() would hang.)"""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


def _fmt_delay(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 100 else f"{seconds:.0f}"


class QueueManager:
    def __init__(self, services, spool: Spool, local_transport: LocalTransport | None = None,
                 remote=None) -> None:
        self.services = services
        self.spool = spool
        self.local = local_transport or LocalTransport(services)
        self.remote = remote
        self.entries: dict[str, Entry] = {}
        self._heap: list[tuple[float, str]] = []
        self._ready: asyncio.Queue[Entry] | None = None
        self._incoming: list[Entry] = []
        self._incoming_event: asyncio.Event | None = None
        self._timer_event: asyncio.Event | None = None
        self._maildrop_event: asyncio.Event | None = None
        self._local_slots: asyncio.Semaphore | None = None
        self._remote_slots: asyncio.Semaphore | None = None
        self._loops: list[asyncio.Task] = []
        self._deliveries: set[asyncio.Task] = set()
        self.running = False
        self.last_error: str | None = None  # the latest deferral/bounce reason, for `mailstack status`
        self.stats = {"sent": 0, "deferred": 0, "bounced": 0, "removed": 0, "bounces_sent": 0}

    @property
    def cfg(self):
        return self.services.config

    def reconfigure(self, cfg) -> None:
        """After a reload: retry times and lifetime are read at use; concurrency needs a restart."""
        if self._local_slots is not None and cfg.queue.local_concurrency != self._concurrency:
            log.warning("queue.local_concurrency changes take effect at the next restart")

    # --- start / stop ------------------------------------------------------------------
    async def start(self) -> None:
        self._ready = asyncio.Queue()
        self._incoming_event = asyncio.Event()
        self._timer_event = asyncio.Event()
        self._maildrop_event = asyncio.Event()
        qcfg = self.cfg.queue
        self._concurrency = qcfg.local_concurrency
        self._local_slots = asyncio.Semaphore(qcfg.local_concurrency)
        self._remote_slots = asyncio.Semaphore(getattr(qcfg, "remote_concurrency", 20))
        # Listeners may already accept mail while we read the spool: hold those messages back
        # until recovery is done (one may also be found by the directory scan: same qid, once).
        early: dict[str, QueuedMessage] = {}
        self.spool.on_enqueue = lambda m: early.__setitem__(m.qid, m)
        await asyncio.to_thread(self.spool.setup)
        recovered = await asyncio.to_thread(self._recover)
        self.running = True
        self.spool.on_enqueue = self._on_enqueue
        for entry in recovered:
            if entry.state == "deferred":
                self._schedule(entry)
            else:
                self._make_ready(entry)
        for qid, msg in early.items():
            if qid not in self.entries:
                self._on_enqueue(msg)
        self._loops = [asyncio.create_task(coro, name=f"queue-{coro.__name__}") for coro in
                       (self._dispatch_loop(), self._takeup_loop(), self._timer_loop(), self._maildrop_loop())]
        self._maildrop_event.set()
        log.info("queue manager started: %d active, %d deferred",
                 sum(e.state != "deferred" for e in recovered), sum(e.state == "deferred" for e in recovered))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking up work; give deliveries in progress `grace` seconds, then cancel them
        (a cancelled message stays in active/ and is delivered again, idempotently, at next start)."""
        if not self.running:
            return
        self.running = False
        if self.spool.on_enqueue == self._on_enqueue:
            self.spool.on_enqueue = None
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._deliveries:
            _, pending = await asyncio.wait(set(self._deliveries), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        if self.remote is not None:
            try:
                await self.remote.close()
            except Exception:
                log.exception("closing the remote transport failed")
        log.info("queue manager stopped")

    def _recover(self) -> list[Entry]:
        """Blocking: read what a previous run left behind (runs before the loops start)."""
        spool = self.spool
        for qid in spool.orphan_status():
            try:
                os.unlink(spool.status_path(qid))
            except OSError:
                pass
        for qid in spool.orphan_done():
            try:
                os.unlink(spool.done_path(qid))
            except OSError:
                pass
        out: list[Entry] = []
        for state in ("incoming", "active"):
            for qid in spool.ids(state):
                if state == "incoming" and qid in set(spool.writing):
                    continue  # being written by a session now: announced when it is durable
                path = spool.path(state, qid)
                try:
                    msg = read_envelope(path, qid)
                except FileNotFoundError:
                    continue
                except CorruptQueueFile as e:
                    # Even a write the crash cut short (never acknowledged: "250" comes after the
                    # fsync) is kept in corrupt/ for a person to look at, never deleted.
                    self._quarantine(state, qid, str(e))
                    continue
                if state == "incoming":
                    path = spool.move(qid, "incoming", "active")
                    msg.source = MessageSource(str(path), msg.source.offset, msg.source.size)
                entry = Entry(qid, "active", msg)
                self._apply_status(entry, spool.read_status(qid))
                entry.finals |= {("remote", a) for a in spool.read_done(qid)}
                out.append(entry)
        now = time.time()
        for qid in spool.ids("deferred"):
            entry = Entry(qid, "deferred")
            status = spool.read_status(qid)
            self._apply_status(entry, status)
            entry.next_try = float(status.get("next_try", now)) if status else now
            out.append(entry)
        return out

    def _quarantine(self, state: str, qid: str, reason: str) -> None:
        try:
            self.spool.move(qid, state, "corrupt")
        except OSError:
            pass
        log.error("moved to corrupt/: %s", reason, extra={"qid": qid})

    @staticmethod
    def _apply_status(entry: Entry, status: dict | None) -> None:
        if not status:
            return
        try:
            entry.attempts = int(status.get("attempts", 0))
            entry.next_try = float(status.get("next_try", 0))
            entry.targets = [Target.from_json(t) for t in status.get("targets", [])] or None
            entry.finals |= {(str(k), str(a).lower()) for k, a in status.get("finals", [])}
        except (TypeError, ValueError):
            entry.targets = None

    def _skip_finals(self, entry: Entry) -> None:
        """Targets delivered before a crash (done/) or before a requeue are not delivered again."""
        if not entry.finals:
            return
        for t in entry.targets:
            if t.status in ("pending", "deferred") and (t.kind, t.addr.lower()) in entry.finals:
                t.status, t.reply = "sent", "final before a restart or requeue (not tried again)"

    # --- intake ----------------------------------------------------------------------------
    def _on_enqueue(self, msg: QueuedMessage) -> None:
        if not self.running:
            self.spool.forget_data(msg)
            return  # stays in incoming/, taken up at next start
        entry = Entry(msg.qid, "incoming", msg)
        entry.busy = True  # owned by the take-up loop until it is in active/
        self.entries[msg.qid] = entry
        self._incoming.append(entry)
        self._incoming_event.set()

    async def _takeup_loop(self) -> None:
        """Move newly accepted messages incoming/ -> active/, many per worker-thread call."""
        while True:
            await self._incoming_event.wait()
            self._incoming_event.clear()
            batch, self._incoming = self._incoming, []
            if not batch:
                continue

            def rename_all(batch=batch) -> list[Exception | None]:
                out = []
                for entry in batch:
                    try:
                        self.spool.move(entry.qid, "incoming", "active")
                        out.append(None)
                    except OSError as e:
                        out.append(e)
                return out

            results = await asyncio.to_thread(rename_all)
            for entry, err in zip(batch, results):
                if err is not None:
                    log.error("cannot take up: %s", err, extra={"qid": entry.qid})
                    self.spool.forget_data(entry.msg)
                    self.entries.pop(entry.qid, None)
                    continue
                entry.state = "active"
                m = entry.msg
                m.source = MessageSource(str(self.spool.path("active", entry.qid)), m.source.offset, m.source.size)
                log.info("from=<%s>, size=%d, nrcpt=%d (queue active)", m.sender, m.source.size,
                         len(m.recipients), extra={"qid": entry.qid})
                entry.busy = False
                if not await self._pending_action(entry):
                    self._make_ready(entry)

    def _make_ready(self, entry: Entry) -> None:
        self.entries[entry.qid] = entry
        entry.state = "active"
        self._ready.put_nowait(entry)

    async def _dispatch_loop(self) -> None:
        while True:
            await self._local_slots.acquire()
            try:
                entry = await self._ready.get()
            except BaseException:
                self._local_slots.release()
                raise
            if entry.gone or entry.busy or self.entries.get(entry.qid) is not entry:
                self._local_slots.release()
                continue
            entry.busy = True
            task = asyncio.create_task(self._deliver(entry))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    # --- delivery --------------------------------------------------------------------------
    def _record(self, entry: Entry, target: Target, result: RecipientResult, now: float) -> None:
        target.record(result.status, result.reply, result.relay, now)
        if result.status != "sent":
            self.last_error = f"{entry.qid}: to=<{target.addr}>: {result.reply}"
        self.stats[result.status] = self.stats.get(result.status, 0) + 1
        self.services.metrics.delivery(result.status, result.relay, now - entry.msg.arrival)
        orig = f", orig_to=<{target.orig}>" if target.orig.lower() != target.addr.lower() else ""
        level = logging.INFO if result.status != "bounced" else logging.WARNING
        log.log(level, "to=<%s>%s, relay=%s, delay=%s, status=%s (%s)", target.addr, orig, result.relay,
                _fmt_delay(now - entry.msg.arrival), result.status, result.reply, extra={"qid": entry.qid})

    def record_direct(self, msg: QueuedMessage, targets: list[Target], results: list[RecipientResult]) -> None:
        """Log and count a delivery made at accept time (queue/direct.py) as a queue pass would;
        accounts not "sent" are queued by the caller and recorded by their own pass."""
        entry = Entry(msg.qid, "direct", msg)
        now = time.time()
        for t, r in zip(targets, results):
            if r.status == "sent":
                self._record(entry, t, r, now)
        if all(r.status == "sent" for r in results):
            self.stats["removed"] += 1
            log.info("removed", extra={"qid": msg.qid})

    async def _deliver(self, entry: Entry) -> None:
        """One delivery pass over every target not yet final. Holds a local slot until the local
        part is done; the remote part runs under the remote limit."""
        msg = entry.msg
        slot_held = True
        try:
            if entry.targets is None:
                entry.targets = self.local.expand(msg.recipients)
            self._skip_finals(entry)
            todo = [t for t in entry.targets if t.status in ("pending", "deferred")]
            now = time.time()
            for t in todo:
                if t.kind == "unknown":
                    self._record(entry, t, RecipientResult(t.addr, "bounced",
                                                           f"550 5.1.1 <{t.addr}>: user unknown", "local"), now)
            local = [t for t in todo if t.kind == "local"]
            if local:
                results = await self.local.deliver(msg, [t.addr for t in local])
                now = time.time()
                for t, r in zip(local, results):
                    self._record(entry, t, r, now)
            self.spool.forget_data(msg)  # remote delivery and retries read the queue file
            self._local_slots.release()
            slot_held = False
            remote = [t for t in todo if t.kind == "remote"]
            if remote:
                await self._deliver_remote(entry, remote)
            await self._finish(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not lose the message: it stays in active/ and is retried at next start.
            log.exception("delivery pass failed; message left in the queue", extra={"qid": entry.qid})
            entry.busy = False
            self.entries.pop(entry.qid, None)
        finally:
            if slot_held:
                self.spool.forget_data(msg)
                self._local_slots.release()

    async def _deliver_remote(self, entry: Entry, targets: list[Target]) -> None:
        msg = entry.msg
        if self.remote is None:
            now = time.time()
            for t in targets:
                self._record(entry, t, RecipientResult(t.addr, "deferred", NOT_CONFIGURED, "none"), now)
            return
        async with self._remote_slots:
            try:
                results = await self.remote.deliver(msg, [t.addr for t in targets])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("remote transport failed", extra={"qid": entry.qid})
                results = [RecipientResult(t.addr, "deferred", f"451 4.4.0 remote delivery failed: {e}", "none")
                           for t in targets]
        by_addr = {}
        for r in results:
            by_addr.setdefault(r.recipient.lower(), r)
        now = time.time()
        for t in targets:
            r = by_addr.get(t.addr.lower()) or RecipientResult(t.addr, "deferred",
                                                               "451 4.4.0 no result from the remote transport")
            if r.status not in ("sent", "deferred", "bounced"):
                r = RecipientResult(t.addr, "deferred", f"451 4.4.0 bad status {r.status!r}: {r.reply}", r.relay)
            self._record(entry, t, r, now)

    async def _finish(self, entry: Entry) -> None:
        """After a pass: remove, defer, hold or bounce, as the targets' states say."""
        msg = entry.msg
        now = time.time()
        pending = [t for t in entry.targets if t.status in ("pending", "deferred")]
        qcfg = self.cfg.queue
        if pending and entry.action != "delete" and now - msg.arrival >= qcfg.max_lifetime:
            days = qcfg.max_lifetime / 86400
            for t in pending:
                t.status = "expired"
                self.services.metrics.deliveries[("expired", "local" if t.kind == "local" else "remote")] += 1
                log.warning("to=<%s>, relay=%s, delay=%s, status=expired (message expired after %.3g days in "
                            "queue; last error: %s)", t.addr, t.relay, _fmt_delay(now - msg.arrival), days,
                            t.reply, extra={"qid": entry.qid})
            pending = []
        if entry.action == "delete":
            await self._remove(entry, "deleted by the operator")
            return
        if pending:
            await self._defer(entry, now)
            return
        failed = [t for t in entry.targets if t.status in ("bounced", "expired")]
        if failed:
            try:
                await self._bounce(entry, failed)
            except Exception as e:
                # The notification could not be queued (disk full?): keep the message and try
                # again later; with no target left to deliver, the next pass only bounces.
                log.error("cannot queue the non-delivery notification: %s", e, extra={"qid": entry.qid})
                await self._defer(entry, now)
                return
        await self._remove(entry)

    async def _defer(self, entry: Entry, now: float) -> None:
        qcfg = self.cfg.queue
        entry.attempts += 1
        delay = min(qcfg.retry_max, qcfg.retry_min * 2 ** (entry.attempts - 1))
        entry.next_try = now + delay
        dst = "hold" if entry.action == "hold" else "deferred"
        await asyncio.to_thread(self._persist_and_move, entry, dst)
        entry.busy = False
        self.stats["deferred_messages"] = self.stats.get("deferred_messages", 0) + 1
        if dst == "hold":
            self.entries.pop(entry.qid, None)
            entry.action = None
            entry.gone = True
            log.info("held by the operator", extra={"qid": entry.qid})
        else:
            entry.state = "deferred"
            entry.msg = None
            entry.targets = None
            self._schedule(entry)

    def _persist_and_move(self, entry: Entry, dst: str) -> None:
        self.spool.write_status(entry.qid, entry.status_json())
        self.spool.move(entry.qid, entry.state, dst)
        entry.state = dst

    async def _remove(self, entry: Entry, why: str = "") -> None:
        self.entries.pop(entry.qid, None)
        entry.gone = True
        await asyncio.to_thread(self.spool.remove, entry.qid, entry.state)
        self.stats["removed"] += 1
        log.info("removed%s", f" ({why})" if why else "", extra={"qid": entry.qid})

    # --- bounces ---------------------------------------------------------------------------
    async def _bounce(self, entry: Entry, failed: list[Target]) -> None:
        msg = entry.msg
        qid = entry.qid
        meta = msg.meta or {}
        if meta.get("double_bounce"):
            log.error("undeliverable postmaster notification discarded", extra={"qid": qid})
            return
        postmaster_copy = False
        if msg.sender == "":
            if not meta.get("bounce_of"):
                log.info("no notification to the null sender; discarded", extra={"qid": qid})
                return
            domains = sorted(self.services.directory.domains)
            if not domains:
                log.error("undeliverable bounce discarded: no local domain for postmaster", extra={"qid": qid})
                return
            rcpt = f"postmaster@{domains[0]}"
            postmaster_copy = True
            new_meta = {"double_bounce": True, "bounce_of": qid}
        else:
            rcpt = msg.sender
            new_meta = {"bounce_of": qid}
        failures = []
        for t in failed:
            if t.status == "expired":
                failures.append(Failure(t.addr, t.orig, f"{t.reply} (message expired in queue)" if t.reply
                                        else "message expired in queue", t.relay, status="4.4.7",
                                        last_try=t.last_try))
            else:
                failures.append(Failure(t.addr, t.orig, t.reply, t.relay, last_try=t.last_try))
        try:
            headers = await asyncio.to_thread(self.spool.read_headers, msg.source)
        except OSError:
            headers = b""
        hostname = self.cfg.server.hostname
        dsn = build_dsn(hostname=hostname, qid=qid, sender=msg.sender, rcpt_to=rcpt, arrival=msg.arrival,
                        failures=failures, original_headers=headers, postmaster_copy=postmaster_copy)
        new_qid = await self.spool.enqueue("", [rcpt], [dsn], new_meta)
        self.stats["bounces_sent"] += 1
        what = "postmaster non-delivery notification" if postmaster_copy else "sender non-delivery notification"
        log.info("%s: %s", what, new_qid, extra={"qid": qid})

    # --- deferred messages -----------------------------------------------------------------
    def _schedule(self, entry: Entry) -> None:
        entry.state = "deferred"
        self.entries[entry.qid] = entry
        heapq.heappush(self._heap, (entry.next_try, entry.qid))
        self._timer_event.set()

    async def _timer_loop(self) -> None:
        while True:
            now = time.time()
            due: list[Entry] = []
            while self._heap and self._heap[0][0] <= now:
                t, qid = heapq.heappop(self._heap)
                entry = self.entries.get(qid)
                # Stale heap items (flushed, deleted, rescheduled) are skipped here.
                if entry is None or entry.state != "deferred" or entry.busy or entry.next_try != t:
                    continue
                entry.busy = True
                due.append(entry)
            if due:
                await self._load_due(due)
                continue
            timeout = max(0.0, self._heap[0][0] - now) if self._heap else None
            self._timer_event.clear()
            await _wait_event(self._timer_event, timeout)

    def _load_deferred(self, entry: Entry) -> Entry | None:
        """Blocking: deferred/ -> active/, read envelope and status back."""
        try:
            path = self.spool.move(entry.qid, entry.state, "active")
        except FileNotFoundError:
            return None
        entry.state = "active"
        try:
            entry.msg = read_envelope(path, entry.qid)
        except CorruptQueueFile as e:
            self._quarantine("active", entry.qid, str(e))
            return None
        self._apply_status(entry, self.spool.read_status(entry.qid))
        entry.finals |= {("remote", a) for a in self.spool.read_done(entry.qid)}
        return entry

    async def _load_due(self, due: list[Entry]) -> None:
        loaded = await asyncio.to_thread(lambda: [self._load_deferred(e) for e in due])
        for entry, ok in zip(due, loaded):
            entry.busy = False
            if ok is None:
                self.entries.pop(entry.qid, None)
                continue
            if not await self._pending_action(entry):
                self._make_ready(entry)

    def flush(self, qids: set[str] | None = None) -> int:
        """Try every deferred message (or those of `qids`) now. Returns how many."""
        now = time.time()
        n = 0
        for entry in list(self.entries.values()):
            if entry.state == "deferred" and not entry.busy and (qids is None or entry.qid in qids):
                entry.next_try = now
                heapq.heappush(self._heap, (now, entry.qid))
                n += 1
        if self._timer_event is not None:
            self._timer_event.set()
        return n

    # --- maildrop (sendmail) -------------------------------------------------------------------
    def pickup(self) -> None:
        if self._maildrop_event is not None:
            self._maildrop_event.set()

    async def _maildrop_loop(self) -> None:
        while True:
            await _wait_event(self._maildrop_event, MAILDROP_SCAN_INTERVAL)
            self._maildrop_event.clear()
            try:
                msgs = await asyncio.to_thread(self._pickup_files)
                self.services.metrics.received["sendmail"] += len(msgs)
                known = set(self.entries) | {e.qid for e in self._incoming}
                msgs += await asyncio.to_thread(self._stray_incoming, known)
            except OSError as e:
                log.error("maildrop scan failed: %s", e)
                continue
            for msg in msgs:
                self._on_enqueue(msg)

    def _stray_incoming(self, known: set[str], min_age: float = STRAY_AGE) -> list[QueuedMessage]:
        """Blocking: complete files in incoming/ that the manager never heard of (a safety net:
        nothing accepted may wait for a restart). Young files may still be being written."""
        out = []
        now = time.time()
        for qid in self.spool.ids("incoming"):
            if qid in known:
                continue
            path = self.spool.path("incoming", qid)
            try:
                if now - os.stat(path).st_mtime < min_age:
                    continue
                msg = read_envelope(path, qid)
            except (FileNotFoundError, CorruptQueueFile):
                continue
            log.warning("taking up a message found in incoming/", extra={"qid": qid})
            out.append(msg)
        return out

    def _pickup_files(self) -> list[QueuedMessage]:
        """Blocking: maildrop/ -> incoming/ (link + unlink, so an existing id is never overwritten)."""
        spool = self.spool
        out = []
        for qid in spool.ids("maildrop"):
            src = spool.path("maildrop", qid)
            try:
                read_envelope(src, qid)
            except FileNotFoundError:
                continue
            except CorruptQueueFile as e:
                self._quarantine("maildrop", qid, str(e))
                continue
            new = qid
            while True:
                try:
                    os.link(src, spool.path("incoming", new))
                    break
                except FileExistsError:
                    new = spool.new_id()
            os.unlink(src)
            msg = read_envelope(spool.path("incoming", new), new)
            log.info("uid=%s from=<%s> (picked up from maildrop)", msg.meta.get("uid", "?"), msg.sender,
                     extra={"qid": new})
            out.append(msg)
        if out:
            # link + unlink is not one atomic step: make the new name durable before the old one
            # is gone for good, so a crash cannot lose the message (a duplicate is harmless).
            fsync_dir(spool.dir / "incoming")
            fsync_dir(spool.dir / "maildrop")
        return out

    # --- operator actions (control socket) -------------------------------------------------------
    async def _pending_action(self, entry: Entry) -> bool:
        """Carry out an action requested while the entry was busy. True if it consumed the entry."""
        action, entry.action = entry.action, None
        if action == "delete":
            await self._remove(entry, "deleted by the operator")
            return True
        if action == "hold":
            self.entries.pop(entry.qid, None)
            entry.gone = True
            await asyncio.to_thread(self._hold_files, entry)
            log.info("held by the operator", extra={"qid": entry.qid})
            return True
        return False

    def _hold_files(self, entry: Entry) -> None:
        if entry.targets is not None:
            self.spool.write_status(entry.qid, entry.status_json())
        self.spool.move(entry.qid, entry.state, "hold")

    async def delete(self, qid: str) -> dict:
        if qid.upper() == "ALL":
            ids = set(self.entries) | {q for s, q in await asyncio.to_thread(lambda: list(self.spool.entries()))}
            results = [await self.delete(q) for q in sorted(ids)]
            return {"ok": True, "deleted": sum(1 for r in results if r.get("ok"))}
        entry = self.entries.get(qid)
        if entry is not None:
            if entry.busy:
                entry.action = "delete"
                return {"ok": True, "later": True, "message": f"{qid}: will be removed when the current "
                                                              "delivery attempt ends"}
            await self._remove(entry, "deleted by the operator")
            return {"ok": True}
        state = await asyncio.to_thread(self.spool.locate, qid)
        if state is None:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        await asyncio.to_thread(self.spool.remove, qid, state)
        log.info("removed (deleted by the operator)", extra={"qid": qid})
        return {"ok": True}

    async def hold(self, qid: str) -> dict:
        entry = self.entries.get(qid)
        if entry is not None:
            if entry.busy:
                entry.action = "hold"
                return {"ok": True, "later": True, "message": f"{qid}: will be held when the current "
                                                              "delivery attempt ends"}
            self.entries.pop(qid, None)
            entry.gone = True
            await asyncio.to_thread(self._hold_files, entry)
            log.info("held by the operator", extra={"qid": qid})
            return {"ok": True}
        state = await asyncio.to_thread(self.spool.locate, qid)
        if state == "hold":
            return {"ok": True, "message": f"{qid}: already on hold"}
        return {"ok": False, "error": f"{qid}: no such message in the queue"}

    async def release(self, qid: str) -> dict:
        state = await asyncio.to_thread(self.spool.locate, qid, ("hold",))
        if state is None:
            return {"ok": False, "error": f"{qid}: not on hold"}
        entry = Entry(qid, "hold", busy=True)
        self.entries[qid] = entry
        ok = await asyncio.to_thread(self._load_deferred, entry)
        entry.busy = False
        if ok is None:
            self.entries.pop(qid, None)
            return {"ok": False, "error": f"{qid}: could not be released"}
        log.info("released from hold", extra={"qid": qid})
        if not await self._pending_action(entry):
            self._make_ready(entry)
        return {"ok": True}

    async def requeue(self, qid: str) -> dict:
        """postsuper -r: take the message up again as if new (aliases expanded again, tried at once);
        recipients already delivered stay delivered."""
        entry = self.entries.get(qid)
        if entry is not None:
            if entry.busy:
                return {"ok": False, "error": f"{qid}: being delivered right now; requeue it when this "
                                              "attempt ends"}
            self.entries.pop(qid, None)
            entry.gone = True
        state = await asyncio.to_thread(self.spool.locate, qid)
        if state is None:
            return {"ok": False, "error": f"{qid}: no such message in the queue"}
        try:
            msg, finals = await asyncio.to_thread(requeue_files, self.spool, qid, state)
        except (OSError, CorruptQueueFile) as e:
            return {"ok": False, "error": f"{qid}: cannot requeue: {e}"}
        fresh = Entry(qid, "incoming", msg, busy=True, finals=finals)
        self.entries[qid] = fresh
        self._incoming.append(fresh)
        self._incoming_event.set()
        log.info("requeued by the operator (from %s)", state, extra={"qid": qid})
        return {"ok": True}

    def show(self, qid: str) -> dict | None:
        """In-memory view of a message being delivered or waiting in active/ (None otherwise)."""
        entry = self.entries.get(qid)
        if entry is None or entry.msg is None:
            return None
        m = entry.msg
        return {"qid": qid, "state": entry.state, "sender": m.sender, "recipients": m.recipients,
                "arrival": m.arrival, "size": m.source.size, "meta": m.meta, "attempts": entry.attempts,
                "next_try": entry.next_try, "busy": entry.busy,
                "targets": [t.to_json() for t in entry.targets or []]}

    def status(self) -> dict:
        counts: dict[str, int] = {}
        for e in self.entries.values():
            counts[e.state] = counts.get(e.state, 0) + 1
        return {"running": self.running, "delivering": len(self._deliveries), "states": counts,
                "stats": dict(self.stats)}


def requeue_files(spool: Spool, qid: str, state: str) -> tuple[QueuedMessage, set]:
    """Blocking: keep only what was already delivered in the status (as "finals"), move the file
    to incoming/. Used by the manager and, with no server running, by the CLI."""
    status = spool.read_status(qid) or {}
    finals = {(str(k), str(a).lower()) for k, a in status.get("finals", [])}
    for t in status.get("targets") or []:
        if isinstance(t, dict) and t.get("status") in ("sent", "bounced", "expired"):
            finals.add((str(t.get("kind")), str(t.get("addr", "")).lower()))
    finals |= {("remote", a) for a in spool.read_done(qid)}
    spool.write_status(qid, {"qid": qid, "attempts": 0, "next_try": 0, "finals": sorted(finals)})
    path = spool.move(qid, state, "incoming", sync=True)
    return read_envelope(path, qid), finals
