"""The content-filter stage: which filters run, in which order, for which listeners,
within which time, and what their silence means.

One `FilterStage` is built from [filters] (pipeline.build_stages).  Milters follow the
whole SMTP session (connect … end of DATA); the native filters (clamd, rspamd, spamd)
see the message at the end of DATA.  Every filter is bounded by its timeout; a filter
that gives no verdict gets its default action (`tempfail` -> 451 4.7.1, the sender
retries; `accept` -> the message goes on unscanned by it, logged and counted).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from ..metrics import Histogram
from ..smtp import hooks
from ..smtp.hooks import Connection, Transaction, Verdict
from .base import FilterUnavailable, strip_headers
from .milter.chain import ConnState, MilterChain
from .milter.client import parse_milter

log = logging.getLogger("mailstack.filters")

TEMPFAIL = "451 4.7.1 Service unavailable - try again later"
# Headers only our filters may set: a sender's own copies are removed before scanning.
OUR_HEADERS = {b"x-spam-status", b"x-spam-flag", b"x-spam-score", b"x-spam-report", b"x-spam",
               b"x-spamd-result", b"x-rspamd-action", b"x-virus-scanned"}
FILTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class FilterMetrics:
    """Counters for /metrics (rendered through Metrics.extra_families)."""

    def __init__(self) -> None:
        self.scanned = 0
        self.skipped = 0
        self.spam = 0
        self.virus = 0
        self.errors: Counter[str] = Counter()  # filter name
        self.learned: Counter[tuple[str, str]] = Counter()  # (kind, result)
        self.latency: dict[str, Histogram] = {}

    def observe(self, name: str, seconds: float) -> None:
        hist = self.latency.get(name)
        if hist is None:
            hist = self.latency[name] = Histogram(FILTER_BUCKETS)
        hist.observe(seconds)

    def render(self) -> list[str]:
        out = []

        def family(name, kind, text, samples):
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
                out.append(f"{name}{label} {value}")

        family("mailstack_filter_scanned_total", "counter", "Messages scanned by the content filters.",
               [((), self.scanned)])
        family("mailstack_filter_skipped_total", "counter", "Messages above filters.max_size, not scanned.",
               [((), self.skipped)])
        family("mailstack_filter_spam_total", "counter", "Messages judged spam (rejected or sent to Junk).",
               [((), self.spam)])
        family("mailstack_filter_virus_total", "counter", "Messages refused because a virus was found.",
               [((), self.virus)])
        family("mailstack_filter_errors_total", "counter",
               "Filter failures (down, slow, broken answer), per filter; the default action applied.",
               [((("filter", n),), c) for n, c in sorted(self.errors.items())])
        family("mailstack_filter_learned_total", "counter", "Junk-folder learning reports, per kind and result.",
               [((("kind", k), ("result", r)), c) for (k, r), c in sorted(self.learned.items())])
        name = "mailstack_filter_latency_seconds"
        out.append(f"# HELP {name} Seconds each filter took per message.")
        out.append(f"# TYPE {name} histogram")
        for filt, hist in sorted(self.latency.items()):
            for le, n in hist.cumulative():
                out.append(f'{name}_bucket{{filter="{filt}",le="{le}"}} {n}')
            out.append(f'{name}_sum{{filter="{filt}"}} {hist.sum!r}')
            out.append(f'{name}_count{{filter="{filt}"}} {hist.count}')
        return out


def metrics_of(services) -> FilterMetrics:
    """The one FilterMetrics of this process (kept across reloads), registered with /metrics."""
    m = services.metrics
    fm = getattr(m, "filters", None)
    if fm is None:
        fm = m.filters = FilterMetrics()
        families = getattr(m, "extra_families", None)
        if families is not None:
            families.append(fm.render)
    return fm


class FilterStage:
    name = "filters"

    def __init__(self, cfg, scanners: dict, milters: MilterChain | None, metrics: FilterMetrics) -> None:
        self.order = [n for n in cfg.order if n in scanners or (n == "milters" and milters)]
        self.listeners = frozenset(cfg.listeners)
        self.max_size = cfg.max_size
        self.scanners = scanners  # name -> (filter, timeout, default_action)
        self.milters = milters
        self.metrics = metrics

    def _state(self, conn: Connection) -> ConnState | None:
        if conn.listener not in self.listeners or "milters" not in self.order:
            return None
        return conn.state.setdefault(self.name, ConnState())

    # --- the session's events (milters only) ---------------------------------------------
    async def connect(self, conn: Connection) -> str | None:
        state = self._state(conn)
        return None if state is None else await self.milters.connect(conn, state)

    async def helo(self, conn: Connection) -> str | None:
        state = self._state(conn)
        return None if state is None else await self.milters.helo(conn, state)

    async def mail(self, conn: Connection, txn: Transaction) -> str | None:
        state = self._state(conn)
        return None if state is None else await self.milters.mail(conn, txn, state)

    async def rcpt(self, conn: Connection, txn: Transaction, rcpt: str) -> str | None:
        state = self._state(conn)
        return None if state is None else await self.milters.rcpt(conn, txn, rcpt, state)

    def close(self, conn: Connection) -> None:
        state = conn.state.get(self.name)
        if state is not None and self.milters is not None:
            self.milters.close(state)

    # --- the message -------------------------------------------------------------------------
    async def data(self, conn: Connection, txn: Transaction, message: bytes) -> Verdict:
        if conn.listener not in self.listeners:
            return Verdict()
        total = Verdict()
        if len(message) > self.max_size:
            self.metrics.skipped += 1
            total.log["filters"] = "skipped"
            state = conn.state.get(self.name)
            if state is not None:
                await self.milters.data(conn, txn, message, state, skip=True)
            return total
        self.metrics.scanned += 1
        stripped = strip_headers(message, OUR_HEADERS)
        if stripped is not message:
            message = total.message = stripped
        for name in self.order:
            started = time.monotonic()
            if name == "milters":
                state = conn.state.get(self.name)
                if state is None:
                    continue
                errors = state.errors
                v = await self.milters.data(conn, txn, message, state)
                self.metrics.errors["milter"] += state.errors - errors
            else:
                v = await self._scan(name, conn, txn, message)
            self.metrics.observe(name, time.monotonic() - started)
            if v.message is not None:
                message = v.message
            if hooks.fold(total, v):
                break
        if total.meta.get("virus"):
            self.metrics.virus += 1
        spam = total.meta.get("spam")
        if total.meta.get("junk") or (isinstance(spam, dict) and spam.get("is_spam")):
            self.metrics.spam += 1
        return total

    async def _scan(self, name: str, conn: Connection, txn: Transaction, message: bytes) -> Verdict:
        scanner, timeout, default = self.scanners[name]
        try:
            # Each client bounds itself; this is the backstop for a daemon that trickles.
            async with asyncio.timeout(timeout + 1.0):
                return await scanner.scan(conn, txn, message)
        except (FilterUnavailable, TimeoutError) as e:
            self.metrics.errors[name] += 1
            reason = str(e) or f"no answer within {timeout:g}s"
            log.warning("%s: no verdict (%s); default action %s", name, reason, default,
                        extra={"qid": txn.qid, "client": conn.ip})
            v = Verdict(log={name: "error"})
            if default == "tempfail":
                v.reply = TEMPFAIL
            return v


def build(services) -> FilterStage | None:
    """The stage for services.config, or None when no filter is configured."""
    cfg = services.config.filters
    scanners: dict = {}
    if cfg.clamd_address:
        from .clamd import Clamd
        host, port, path = _address(cfg.clamd_address)
        scanners["clamd"] = (Clamd(host, port, path, cfg.clamd_timeout), cfg.clamd_timeout, cfg.clamd_default_action)
    if cfg.rspamd_url:
        from .rspamd import Rspamd
        scanners["rspamd"] = (Rspamd(cfg.rspamd_url, cfg.rspamd_controller, cfg.rspamd_password, cfg.rspamd_timeout),
                              cfg.rspamd_timeout, cfg.rspamd_default_action)
    if cfg.spamd_address:
        from .spamd import Spamd
        host, port, path = _address(cfg.spamd_address)
        scanners["spamd"] = (Spamd(host, port, path, cfg.spamd_timeout, cfg.spamd_reject_score, cfg.spamd_user),
                             cfg.spamd_timeout, cfg.spamd_default_action)
    milters = None
    if cfg.milters:
        defaults = {"default_action": cfg.milter_default_action, "connect_timeout": cfg.milter_connect_timeout,
                    "command_timeout": cfg.milter_command_timeout, "content_timeout": cfg.milter_content_timeout}
        milters = MilterChain([parse_milter(spec, defaults) for spec in cfg.milters])
    if not scanners and milters is None:
        return None
    return FilterStage(cfg, scanners, milters, metrics_of(services))


def _address(address: str) -> tuple[str, int, str]:
    """"host:port" -> (host, port, ""); "unix:/path" -> ("", 0, "/path") (validated by config)."""
    if address.startswith("unix:"):
        return "", 0, address[5:]
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port), ""
