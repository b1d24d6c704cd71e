"""Prometheus metrics: counted on the hot path as plain dict adds, rendered at scrape time.

The protocol modules and the queue manager bump counters in `services.metrics` (a
`Counter[key] += 1`: no locks, no formatting); everything that can be read off the
running server instead (open sessions, queue sizes) is read when Prometheus asks.
`GET /metrics` is served by a tiny HTTP/1.0-style server (one request per connection,
bounded head, short timeout) when `metrics.listen` is set.

TLS handshakes are counted by the SSLObject class of each listener's own SSLContext
(see TLSContexts.for_listener): asyncio and uvloop both drive the handshake through
`SSLObject.do_handshake()`, for implicit TLS and STARTTLS alike, so one hook sees
every handshake and the error the TLS library raised, with no change to the
protocol code.  A client that hangs up mid-handshake (or times out) raises nothing
there: it shows as started minus completed minus failed.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import platform
import ssl
import time
from bisect import bisect_left
from collections import Counter

log = logging.getLogger("mailstack.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192  # request line + headers; a scraper sends a few hundred bytes
REQUEST_TIMEOUT = 5.0  # seconds for the whole request head, and for writing the answer
MAX_CLIENTS = 16  # concurrent scrapes; more are closed at once

IMPLICIT_TLS_LISTENERS = frozenset({"submissions", "imaps", "pop3s"})
PROTOCOL_OF = {"smtp": "smtp", "submission": "smtp", "submissions": "smtp", "imap": "imap", "imaps": "imap",
               "pop3": "pop3", "pop3s": "pop3"}

# SMTP refusals by the first 9 characters of the reply ("554 5.7.1"): unambiguous for the
# policy refusals of MAIL and RCPT (see smtp/policy.py), so no reason string is threaded
# through the policy functions.
REJECT_REASONS = {
    "530 5.7.0": "auth_required",
    "552 5.3.4": "size",
    "553 5.6.7": "smtputf8_required",
    "553 5.7.1": "sender_not_owned",
    "550 5.1.1": "unknown_user",
    "452 4.5.3": "too_many_recipients",
}
# "554 5.7.1" is shared by the relay refusal and every stage's policy refusal (DNSBL,
# spam, milter): told apart by the words the replies carry.
POLICY_REFUSALS = (("Relay access denied", "relay_denied"), ("blocked using", "blocklisted"),
                   ("pam", "spam"))
# DataReader.error -> reason
DATA_REJECT_REASONS = {"size": "size", "line": "line_too_long", "bare": "bare_lf", "resources": "resources"}
SMTP_REJECT_REASONS = ("auth_required", "relay_denied", "blocklisted", "spam", "policy", "unknown_user", "sender_not_owned", "size",
                       "bare_lf", "line_too_long", "too_many_recipients", "smtputf8_required", "resources",
                       "too_many_errors", "other")

DELIVERY_STATUSES = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced", "expired": "expired"}

# Delivery latency: local delivery takes milliseconds, remote seconds, retries hours.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, 900.0, 3600.0, 14400.0, 86400.0)


class Histogram:
    """A Prometheus histogram: per-bucket counts, cumulated only when rendered."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds=LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the smallest "le" bucket it falls in
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_num(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class Metrics:
    """Counters shared by every module (`services.metrics`)."""

    def __init__(self) -> None:
        self.start_time = time.time()
        self.connections_refused: Counter[str] = Counter()  # listener (connection limits)
        self.received: Counter[str] = Counter()  # listener, or "sendmail" (maildrop)
        self.smtp_rejected: Counter[str] = Counter()  # reason
        self.deliveries: Counter[tuple[str, str]] = Counter()  # (status, transport)
        self.auth_failures: Counter[str] = Counter()  # protocol
        self.tls_started: Counter[str] = Counter()  # listener
        self.tls_completed: Counter[str] = Counter()
        self.tls_failed: Counter[str] = Counter()
        self.defense: Counter[tuple[str, str]] = Counter()  # (check, reason): mailstack/defense
        self.latency = {"local": Histogram(), "remote": Histogram()}
        self._sslobject_classes: dict[str, type[ssl.SSLObject]] = {}
        # Other packages' families (e.g. filters/chain.py): callables returning exposition lines.
        self.extra_families: list = []

    # --- hot-path helpers (one dict add or two) ----------------------------------------------
    def smtp_reject(self, reply: str) -> None:
        """Count a MAIL/RCPT policy refusal by its reply."""
        code = reply[:9]
        if code == "554 5.7.1":
            reason = next((r for words, r in POLICY_REFUSALS if words in reply), "policy")
        else:
            reason = REJECT_REASONS.get(code, "other")
        self.smtp_rejected[reason] += 1

    def delivery(self, status: str, relay: str, seconds: float) -> None:
        """One recipient's delivery result (queue manager); latency for delivered ones."""
        transport = "local" if relay == "local" else "remote"
        self.deliveries[(status, transport)] += 1
        if status == "sent":
            self.latency[transport].observe(seconds)

    def sslobject_class(self, listener: str) -> type[ssl.SSLObject]:
        """An SSLObject subclass that counts the handshakes of `listener` (TLSContexts hook)."""
        cls = self._sslobject_classes.get(listener)
        if cls is not None:
            return cls
        started, completed, failed = self.tls_started, self.tls_completed, self.tls_failed

        class CountingSSLObject(ssl.SSLObject):
            _counted = False  # set once the first do_handshake() call has been seen

            def do_handshake(self) -> None:
                if not self._counted:
                    self._counted = True
                    started[listener] += 1
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise  # in progress: asyncio calls again when more bytes arrive
                except ssl.SSLError as e:
                    failed[listener] += 1
                    log.debug("TLS handshake on %s failed: %s", listener, e)
                    raise
                completed[listener] += 1

        cls = self._sslobject_classes[listener] = CountingSSLObject
        return cls

    # --- exposition --------------------------------------------------------------------------
    def render(self, services, snapshot: dict | None = None) -> str:
        """The text exposition format 0.0.4 of every metric. `snapshot` is what `read_snapshot`
        read from disk in a worker thread (queue directories, certificate)."""
        snapshot = snapshot if snapshot is not None else {}
        out: list[str] = []
        listeners = [name for name, addrs in services.config.listen.as_dict().items() if addrs]
        sessions = services.sessions

        def family(name: str, kind: str, help_text: str, samples) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_num(value)}")

        family("mailstack_start_time_seconds", "gauge", "When the server started, in seconds since the epoch.",
               [((), self.start_time)])
        from . import __version__
        family("mailstack_build_info", "gauge", "Always 1; the labels say which mailstack runs on what.",
               [((("version", __version__), ("python", platform.python_version()),
                  ("event_loop", type(asyncio.get_event_loop()).__module__.split(".")[0])), 1)])
        opened = getattr(sessions, "opened", Counter())
        family("mailstack_connections_total", "counter", "Connections accepted into a session, per listener.",
               [((("listener", n),), opened[n]) for n in _keys(listeners, opened)])
        family("mailstack_connections_refused_total", "counter",
               "Connections refused because a connection limit was reached, per listener.",
               [((("listener", n),), self.connections_refused[n]) for n in _keys(listeners, self.connections_refused)])
        per_listener = sessions.per_listener
        family("mailstack_sessions", "gauge", "Sessions open now, per listener.",
               [((("listener", n),), max(0, per_listener[n])) for n in _keys(listeners, per_listener)])

        smtp_listeners = [n for n in listeners if PROTOCOL_OF.get(n) == "smtp"]
        family("mailstack_messages_received_total", "counter",
               "Messages accepted (\"250 queued\"), per SMTP listener; \"sendmail\" for local submission.",
               [((("listener", n),), self.received[n]) for n in _keys(smtp_listeners + ["sendmail"], self.received)])
        family("mailstack_smtp_rejected_total", "counter",
               "SMTP refusals by reason (per refused command: a message refused for two recipients counts twice).",
               [((("reason", r),), self.smtp_rejected[r]) for r in _keys(SMTP_REJECT_REASONS, self.smtp_rejected)])

        keys = _keys([(s, t) for s in ("sent", "deferred", "bounced", "expired") for t in ("local", "remote")],
                     self.deliveries)
        family("mailstack_deliveries_total", "counter",
               "Delivery results per recipient: delivered, deferred (will be retried), bounced, expired.",
               [((("status", DELIVERY_STATUSES.get(s, s)), ("transport", t)), self.deliveries[(s, t)])
                for s, t in keys])
        queue = services.queue
        stats = getattr(queue, "stats", {}) or {}
        family("mailstack_bounces_sent_total", "counter", "Non-delivery notifications queued.",
               [((), stats.get("bounces_sent", 0))])

        delivering = len(getattr(queue, "_deliveries", ())) if queue is not None else 0
        counts, oldest = snapshot.get("queue", {}), snapshot.get("oldest", {})
        family("mailstack_queue_messages", "gauge",
               "Messages in the queue now, per state (the files of each queue folder; hold included).",
               [((("state", s),), counts.get(s, 0)) for s in QUEUE_STATES])
        family("mailstack_queue_oldest_message_age_seconds", "gauge",
               "Age of the oldest message in each queue state (0 when the state is empty).",
               [((("state", s),), oldest.get(s, 0.0)) for s in QUEUE_STATES])
        family("mailstack_queue_delivering", "gauge", "Delivery passes in progress now.", [((), delivering)])

        family("mailstack_auth_failures_total", "counter", "Failed logins, per protocol.",
               [((("protocol", p),), self.auth_failures[p]) for p in _keys(("smtp", "imap", "pop3"),
                                                                           self.auth_failures)])

        family("mailstack_defense_total", "counter",
               "Defence actions per check and reason (login: bad_password/blocked/parallel/block; dnsbl, "
               "pregreet, helo, rdns, greylist, rate limits, connections: stress_timeout/evicted).",
               [((("check", c), ("reason", r)), n) for (c, r), n in sorted(self.defense.items())])

        tls_listeners = _keys(listeners, self.tls_started)

        def tls_samples(counter: Counter) -> list:
            return [((("listener", n), ("mode", "implicit" if n in IMPLICIT_TLS_LISTENERS else "starttls")),
                     counter[n]) for n in tls_listeners]

        family("mailstack_tls_handshakes_started_total", "counter",
               "TLS handshakes begun (a connection to an implicit-TLS listener, or STARTTLS), per listener; "
               "mode is implicit or starttls.",
               tls_samples(self.tls_started))
        family("mailstack_tls_handshakes_total", "counter", "TLS handshakes completed, per listener.",
               tls_samples(self.tls_completed))
        family("mailstack_tls_handshake_failures_total", "counter",
               "TLS handshakes refused by the TLS library (bad ClientHello, no common version or cipher, "
               "client alert), per listener. Hang-ups, timeouts and port probes: started - completed - failures.",
               tls_samples(self.tls_failed))

        family("mailstack_tls_certificate_expiry_days", "gauge",
               "Days until each certificate in use expires (negative once expired).",
               [((("cert", path),), days) for path, days in snapshot.get("certificates", {}).items()])

        name = "mailstack_delivery_latency_seconds"
        out.append(f"# HELP {name} Seconds from arrival (\"250 queued\") to delivery, per transport.")
        out.append(f"# TYPE {name} histogram")
        for transport, hist in self.latency.items():
            for le, n in hist.cumulative():
                out.append(f'{name}_bucket{{transport="{transport}",le="{le}"}} {n}')
            out.append(f'{name}_sum{{transport="{transport}"}} {_num(hist.sum)}')
            out.append(f'{name}_count{{transport="{transport}"}} {hist.count}')
        for extra in self.extra_families:
            out += extra()
        out.append("")
        return "\n".join(out)


QUEUE_STATES = ("incoming", "active", "deferred", "hold", "maildrop")


def read_snapshot(services, now: float | None = None) -> dict:
    """Blocking (a worker thread at scrape time): per queue state, how many files and the age of
    the oldest (a queue file is written once, so its mtime is its arrival); days left on the
    certificate."""
    now = time.time() if now is None else now
    counts: dict[str, int] = {}
    oldest: dict[str, float] = {}
    queue_dir = services.config.queue_dir
    for state in QUEUE_STATES:
        n, first = 0, None
        try:
            with os.scandir(queue_dir / state) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        mtime = e.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue  # delivered or moved while we looked
                    n += 1
                    first = mtime if first is None else min(first, mtime)
        except FileNotFoundError:
            pass
        counts[state] = n
        oldest[state] = round(max(0.0, now - first), 3) if first is not None else 0.0
    certificates = {}
    tls = getattr(services, "tls", None)
    if tls is not None and getattr(tls, "cert", None):
        from .tls import cert_not_after
        expiry = cert_not_after(tls.cert)
        if expiry is not None:
            left = expiry - datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
            certificates[str(tls.cert)] = round(left.total_seconds() / 86400, 3)
    return {"queue": counts, "oldest": oldest, "certificates": certificates}


def _keys(known, counter) -> list:
    """Known label values first (so a series exists from the start, at 0), then any others seen."""
    out = list(known)
    seen = set(out)
    out += [k for k in counter if k not in seen]
    return out


def _labels(pairs) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# --- the HTTP side: parsing is a plain function over bytes ----------------------------------------
class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_request_head(head: bytes) -> tuple[str, str]:
    """b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" -> ("GET", "/metrics"). Raises BadRequest."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "Bad Request")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "Bad Request") from None
    if method not in ("GET", "HEAD"):
        raise BadRequest(405, "Method Not Allowed")
    return method, target.partition("?")[0]


def http_response(status: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n")
    if status == 405:
        head += "Allow: GET, HEAD\r\n"
    return head.encode("ascii") + b"\r\n" + (b"" if head_only else body)


async def start_http(services, host: str, port: int) -> asyncio.Server:
    """Serve GET/HEAD /metrics on host:port (one request per connection)."""
    clients = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        if clients >= MAX_CLIENTS:
            writer.transport.abort()
            return
        clients += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    method, path = parse_request_head(head)
                    if path != "/metrics":
                        raise BadRequest(404, "Not Found")
                    snapshot = await asyncio.to_thread(read_snapshot, services)
                    body = services.metrics.render(services, snapshot).encode("utf-8")
                    answer = http_response(200, "OK", body, CONTENT_TYPE, head_only=method == "HEAD")
                except asyncio.LimitOverrunError:
                    answer = http_response(431, "Request Header Fields Too Large", b"request head too large\n")
                except BadRequest as e:
                    answer = http_response(e.status, e.reason, f"{e.reason}\n".encode())
                writer.write(answer)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # a scraper that hung up or stalled: nothing to answer
        except Exception:
            log.exception("metrics request failed")
        finally:
            clients -= 1
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD, reuse_address=True)
    log.info("metrics at http://%s/metrics", _hostport(host, port))
    return server


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
