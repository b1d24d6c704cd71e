"""RemoteDelivery: the queue manager's transport for recipients in other domains.

For one queued message and its remote recipients it
  1. groups the recipients by next hop: a per-domain transport ("[host]:port"),
     else the relayhost, else the recipient domain's MX;
  2. reads the message once in a worker thread, DKIM-signs it, dot-stuffs it;
  3. per next hop (concurrently, within per-destination and global limits) tries
     a cached connection, then the MX hosts' addresses in order, until one takes
     the mail; and
  4. returns one RecipientResult per recipient: "sent", "deferred" or "bounced".
Retries, backoff and bounces are the manager's business, not this module's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..dkim import DKIMSigner
from ..dns import DnsError, Resolver
from ..dns import shared as dns_shared
from ..defense.ratelimit import Pacer
from ..nexthop import NextHop, parse_nexthop, to_alabel
from ..smtp.client import ClientSettings, DataLost, HostError, SMTPConnection, connect
from ..smtp.clientproto import (STREAM_MIN, WireMessage, check_envelope_address, normalize_crlf, prepare,
                                prepare_file)
from .spool import Spool
from .types import QueuedMessage, RecipientResult

log = logging.getLogger("mailstack.delivery")


# --- routing ------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    nexthop: NextHop
    auth: tuple[str, str] | None = None  # relayhost credentials
    configured: bool = False  # from relayhost/transports: a DNS failure there is the operator's, so it defers
    implicit_tls: bool = False  # relayhost on port 465

    @property
    def key(self) -> str:
        # Connections are cached per route; credentials are part of a connection's identity.
        return f"{self.nexthop}|{self.auth[0] if self.auth else ''}|{'tls' if self.implicit_tls else ''}"


class Router:
    """Recipient domain -> Route, from the delivery config (transports, relayhost, MX)."""

    def __init__(self, delivery_cfg) -> None:
        self.transports: dict[str, NextHop] = {}
        for domain, target in delivery_cfg.transports.items():
            domain = domain.strip().lower()
            # ".example.com" matches subdomains, as in Postfix transport maps.
            key = "." + to_alabel(domain[1:]) if domain.startswith(".") else to_alabel(domain)
            self.transports[key] = parse_nexthop(target)
        self.relayhost = parse_nexthop(delivery_cfg.relayhost) if delivery_cfg.relayhost else None
        user = delivery_cfg.relayhost_username
        self.relay_auth = (user, delivery_cfg.relayhost_password) if user else None
        self.relay_implicit_tls = delivery_cfg.relayhost_implicit_tls

    def route(self, domain: str) -> Route:
        domain = to_alabel(domain)
        if domain in self.transports:
            return Route(self.transports[domain], configured=True)
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self.transports:
                return Route(self.transports[parent], configured=True)
        if self.relayhost is not None:
            return Route(self.relayhost, self.relay_auth, configured=True, implicit_tls=self.relay_implicit_tls)
        return Route(NextHop(domain, None, mx=True))


# --- limits and the connection cache --------------------------------------------------
class Limiter:
    """Counts deliveries in progress; acquire() waits while the (live-configured) limit is reached."""

    def __init__(self) -> None:
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self, limit: int) -> None:
        while self.active >= limit:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake_one()  # we were woken but will not take the slot: pass it on
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        # A woken waiter stays in the deque until it runs, so `idle` stays false meanwhile
        # (otherwise the per-destination limiter could be dropped and re-created: limit broken).
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
                break

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._waiters


@dataclass
class _Cached:
    conn: SMTPConnection
    timer: asyncio.TimerHandle


class ConnectionCache:
    """Idle connections per route, each kept `cache_time` seconds (Postfix scache)."""

    def __init__(self) -> None:
        self._idle: dict[str, list[_Cached]] = {}
        self._closing: set[asyncio.Task] = set()

    def take(self, key: str, reuse_time: float) -> SMTPConnection | None:
        entries = self._idle.get(key)
        while entries:
            entry = entries.pop()
            entry.timer.cancel()
            if time.monotonic() - entry.conn.created < reuse_time:
                if not entries:
                    del self._idle[key]
                return entry.conn
            self._quit(entry.conn)
        self._idle.pop(key, None)
        return None

    def put(self, key: str, conn: SMTPConnection, cache_time: float, max_idle: int) -> None:
        if cache_time <= 0 or len(self._idle.get(key, ())) >= max_idle:
            self._quit(conn)
            return
        loop = asyncio.get_running_loop()
        entry = _Cached(conn, loop.call_later(cache_time, self._expire, key, conn))
        self._idle.setdefault(key, []).append(entry)

    def _expire(self, key: str, conn: SMTPConnection) -> None:
        entries = self._idle.get(key, [])
        for entry in entries:
            if entry.conn is conn:
                entries.remove(entry)
                break
        if not entries:
            self._idle.pop(key, None)
        self._quit(conn)

    def _quit(self, conn: SMTPConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        for key in list(self._idle):
            for entry in self._idle.pop(key):
                entry.timer.cancel()
                self._quit(entry.conn)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


# --- the transport ---------------------------------------------------------------------
@dataclass
class _Attempt:
    """Where one next-hop delivery stands."""

    pending: list[str]
    results: dict[str, RecipientResult] = field(default_factory=dict)
    last_error: str = ""
    last_relay: str = "none"
    permanent: bool = False  # the last error was a permanent one (DNS)
    connected: bool = False  # the last error came from a server we talked to
    qid: str | None = None  # for the log lines

    def host_failed(self, e: HostError, relay: str) -> None:
        if self.connected and not e.connected:
            return  # keep the more telling reason of a server that answered
        self.last_error, self.last_relay, self.permanent, self.connected = e.reply, relay, False, e.connected


class RemoteDelivery:
    """RemoteTransport over SMTP. Create one per server (it owns the connection cache)."""

    def __init__(self, services, resolver: Resolver | None = None) -> None:
        self.services = services
        self._resolver = resolver
        self._resolver_cfg: tuple | None = None
        self._router: Router | None = None
        self._router_cfg = None
        self._signer: DKIMSigner | None = None
        self._global = Limiter()
        self._per_route: dict[str, Limiter] = {}
        self._pacer = Pacer()  # per-destination messages per minute (defense/ratelimit.py)
        self.cache = ConnectionCache()
        self.connections_opened = 0  # for tests and stats

    # --- config-derived helpers (re-derived when SIGHUP swaps the config) ---
    @property
    def cfg(self):
        return self.services.config

    def resolver(self) -> Resolver:
        cfg = self.cfg
        want = (tuple(cfg.dns.nameservers), cfg.dns.timeout)
        if self._resolver is None or (self._resolver_cfg is not None and self._resolver_cfg != want):
            self._resolver = dns_shared(cfg)  # the process's one resolver and cache (mailstack/dns.py)
            self._resolver_cfg = want
        return self._resolver

    def router(self) -> Router:
        d = self.cfg.delivery
        stamp = (tuple(sorted(d.transports.items())), d.relayhost, d.relayhost_username, d.relayhost_password,
                 d.relayhost_implicit_tls)
        if self._router is None or self._router_cfg != stamp:
            self._router, self._router_cfg = Router(d), stamp
        return self._router

    def signer(self) -> DKIMSigner | None:
        cfg = self.cfg
        if not cfg.dkim.enabled:
            return None
        if self._signer is None or self._signer.selector != cfg.dkim.selector:
            directory = self.services.directory
            self._signer = DKIMSigner(cfg.data_dir, cfg.dkim.selector,
                                      directory.is_local_domain if directory is not None else None)
        return self._signer

    def forwarder(self):
        from ..senderauth.forward import Forwarder
        cfg = self.cfg
        if getattr(self, "_forwarder", None) is None or self._forwarder.cfg is not cfg:
            self._forwarder = Forwarder(self.services)
        return self._forwarder

    # --- RemoteTransport ---
    async def deliver(self, message: QueuedMessage, recipients: list[str]) -> list[RecipientResult]:
        try:
            results = await self._deliver(message, recipients)
        except Exception as e:  # never raise to the manager: an internal error defers
            log.exception("remote delivery failed", extra={"qid": message.qid})
            results = {r: RecipientResult(r, "deferred", f"451 4.3.0 internal error in remote delivery: {e}")
                       for r in recipients}
        out = [results.get(r) or RecipientResult(r, "deferred", "451 4.3.0 no delivery attempt made")
               for r in recipients]
        for r in out:  # the manager logs each result at info, Postfix style; this is for debugging
            log.debug("to=<%s>, relay=%s, status=%s (%s)", r.recipient, r.relay, r.status, r.reply,
                      extra={"qid": message.qid})
        return out

    async def close(self) -> None:
        await self.cache.close()

    async def _record_done(self, qid: str, recipients: list[str]) -> None:
        """Durably note the recipients a remote server just accepted, before anything else happens to
        the message: after a crash only a delivery in flight at that instant can be repeated."""
        spool = getattr(self.services, "spool", None)
        if not recipients or spool is None:
            return
        try:
            await asyncio.to_thread(spool.record_done, qid, recipients)
        except OSError as e:
            log.error("cannot record the delivery durably (a crash now would repeat it): %s", e,
                      extra={"qid": qid})

    async def _deliver(self, message: QueuedMessage, recipients: list[str]) -> dict[str, RecipientResult]:
        results: dict[str, RecipientResult] = {}
        if check_envelope_address(message.sender):
            return {r: RecipientResult(r, "bounced", "501 5.1.7 bad sender address syntax") for r in recipients}
        router = self.router()
        groups: dict[Route, list[str]] = {}
        for rcpt in recipients:
            local, at, domain = rcpt.rpartition("@")
            if check_envelope_address(rcpt) or not at or not local:
                results[rcpt] = RecipientResult(rcpt, "bounced", "501 5.1.3 bad recipient address syntax")
                continue
            try:
                route = router.route(domain)
            except ValueError as e:
                results[rcpt] = RecipientResult(rcpt, "bounced", f"501 5.1.2 bad destination domain: {e}")
                continue
            groups.setdefault(route, []).append(rcpt)
        if not groups:
            return results
        # Forwarded mail (senderauth/forward.py): SRS envelope sender, ARC seal.
        forwarder = self.forwarder()
        message = forwarder.rewrite(message)
        try:
            wire = await asyncio.to_thread(_read_and_prepare, message, self.signer(), forwarder)
        except OSError as e:
            for rcpts in groups.values():
                for r in rcpts:
                    results[r] = RecipientResult(r, "deferred", f"451 4.3.0 cannot read the queued message: {e}")
            return results
        routes = list(groups.items())
        done = await asyncio.gather(*(self._deliver_route(route, rcpts, message, wire) for route, rcpts in routes),
                                    return_exceptions=True)
        for (route, rcpts), part in zip(routes, done):
            if isinstance(part, asyncio.CancelledError):
                raise part
            if isinstance(part, BaseException):
                # A bug in one destination must not turn the others' "sent" into a retry (duplicates).
                log.error("delivery to %s failed: %r", route.nexthop, part, exc_info=part, extra={"qid": message.qid})
                part = {r: RecipientResult(r, "deferred", f"451 4.3.0 internal error in remote delivery: {part}")
                        for r in rcpts}
            results.update(part)
        return results

    async def _deliver_route(self, route: Route, rcpts: list[str], message: QueuedMessage,
                             wire: WireMessage) -> dict[str, RecipientResult]:
        cfg = self.cfg
        d = cfg.delivery
        # Be a good neighbour: at most defense.outbound_messages_per_minute to one destination.
        wait = self._pacer.reserve(str(route.key), cfg.defense.outbound_messages_per_minute)
        if wait is None:
            log.info("delivery to %s deferred: over %d messages per minute", route.nexthop,
                     cfg.defense.outbound_messages_per_minute, extra={"qid": message.qid})
            return {r: RecipientResult(r, "deferred", "451 4.7.0 destination rate limit reached, will retry")
                    for r in rcpts}
        if wait:
            await asyncio.sleep(wait)
        limiter = self._per_route.setdefault(route.key, Limiter())
        await limiter.acquire(d.destination_concurrency)
        try:
            await self._global.acquire(d.max_connections)
            try:
                return await self._attempt(route, rcpts, message, wire)
            finally:
                self._global.release()
        finally:
            limiter.release()
            if limiter.idle:
                self._per_route.pop(route.key, None)

    async def _attempt(self, route: Route, rcpts: list[str], message: QueuedMessage,
                       wire: WireMessage) -> dict[str, RecipientResult]:
        cfg = self.cfg
        d = cfg.delivery
        settings = ClientSettings.from_config(cfg, route.auth, route.implicit_tls)
        state = _Attempt(pending=list(rcpts), qid=message.qid)

        # A cached connection first: no DNS, no TCP/TLS handshake, no EHLO.
        while state.pending:
            conn = self.cache.take(route.key, d.connection_reuse_time)
            if conn is None:
                break
            if not await conn.rset():
                conn.abort()
                continue
            await self._use(conn, route, message, wire, state)

        tried = 0
        if state.pending:
            try:
                async with contextlib.aclosing(self._addresses(route.nexthop, state)) as candidates:
                    async for host, ip in candidates:
                        if tried >= d.mx_address_limit:
                            break
                        tried += 1
                        conn = await self._open(host, ip, route.nexthop.port or d.port, settings, state)
                        if conn is None:
                            continue
                        await self._use(conn, route, message, wire, state)
                        if not state.pending:
                            break
            except DnsError as e:
                state.last_error = _dns_reply(e)
                state.last_relay = "none"
                state.permanent = not e.temporary and not route.configured

        for rcpt in state.pending:
            reply = state.last_error or "451 4.4.0 no server for the destination could be tried"
            state.results[rcpt] = RecipientResult(rcpt, "bounced" if state.permanent else "deferred",
                                                  reply, state.last_relay)
        return state.results

    async def _open(self, host: str, ip: str, port: int, settings: ClientSettings,
                    state: _Attempt) -> SMTPConnection | None:
        try:
            self.connections_opened += 1
            return await connect(host, ip, port, settings, use_tls=True)
        except HostError as e:
            if not e.retry_plaintext:
                state.host_failed(e, f"{host}[{ip}]:{port}")
                return None
            log.info("TLS with %s[%s]:%d failed, retrying without TLS (policy may): %s", host, ip, port, e.reply,
                     extra={"qid": state.qid})
        try:  # opportunistic TLS that failed: plaintext is still better than no delivery
            self.connections_opened += 1
            return await connect(host, ip, port, settings, use_tls=False)
        except HostError as e:
            state.host_failed(e, f"{host}[{ip}]:{port}")
            return None

    async def _use(self, conn: SMTPConnection, route: Route, message: QueuedMessage, wire: WireMessage,
                   state: _Attempt) -> None:
        """Run transactions on `conn` for the pending recipients, in batches; cache or close it after."""
        d = self.cfg.delivery
        limit = d.destination_recipient_limit
        smtputf8 = bool(message.meta.get("smtputf8"))
        try:
            while state.pending:
                batch = state.pending[:limit]
                try:
                    outcome = await conn.send(message.sender, batch, wire, smtputf8)
                except DataLost as e:
                    outcome = None
                    for rcpt in batch:
                        state.results[rcpt] = RecipientResult(rcpt, "deferred", str(e), conn.relay)
                    del state.pending[:len(batch)]
                    break
                await self._record_done(message.qid, [res.recipient for res in outcome if res.status == "sent"])
                for res in outcome:
                    state.results[res.recipient] = RecipientResult(res.recipient, res.status, res.reply, conn.relay)
                del state.pending[:len(batch)]
                if not conn.reusable:
                    break
        except HostError as e:
            state.host_failed(e, conn.relay)
            conn.abort()
            return
        except BaseException:  # cancelled (shutdown) or a bug: the connection is in an unknown state
            conn.abort()
            raise
        if conn.reusable and time.monotonic() - conn.created < d.connection_reuse_time:
            self.cache.put(route.key, conn, d.connection_cache_time, d.destination_concurrency)
        else:
            await conn.quit()

    async def _addresses(self, nexthop: NextHop, state: _Attempt) -> AsyncIterator[tuple[str, str]]:
        """(host, ip) pairs to try, resolved lazily: a backup MX is looked up only when needed.
        Raises DnsError when nothing at all can be tried."""
        resolver = self.resolver()
        families = self.cfg.delivery.inet_protocols
        if not nexthop.mx:
            for ip in await resolver.addresses(nexthop.host, families):
                yield nexthop.host, ip
            return
        hosts = await resolver.mx_hosts(nexthop.host)
        hosts = self._drop_self(nexthop.host, hosts)
        errors: list[DnsError] = []
        yielded = False
        for mx in hosts:
            try:
                ips = await resolver.addresses(mx.name, families)
            except DnsError as e:
                errors.append(e)
                continue
            for ip in ips:
                yielded = True
                yield mx.name, ip
        if not yielded and errors:
            temporary = [e for e in errors if e.temporary]
            raise temporary[0] if temporary else errors[0]

    def _drop_self(self, domain: str, hosts: list):
        """RFC 5321 5.1: if we are one of the MX hosts, only better-preference hosts may be used."""
        me = {self.cfg.server.hostname.lower().rstrip("."), (self.cfg.delivery.helo_name or "").lower().rstrip(".")}
        for i, h in enumerate(hosts):
            if h.name in me:
                better = [x for x in hosts[:i] if x.preference < h.preference]
                if not better:
                    raise DnsError(f"mail for {domain} loops back to myself", temporary=False, status="5.4.6")
                return better
        return hosts


def _dns_reply(e: DnsError) -> str:
    code = "451" if e.temporary else ("556" if e.status == "5.1.10" else "550")
    return f"{code} {e.status} {e}"


def _read_and_prepare(message: QueuedMessage, signer: DKIMSigner | None, forwarder=None) -> WireMessage:
    """Read the message text from its spool file, sign and dot-stuff it. Runs in a worker thread."""
    src = message.source
    if src.size >= STREAM_MIN:
        # A big message is sent from its queue file piece by piece.  A DKIM signature or an
        # ARC seal is made from its header section and a body hash computed from the file
        # in bounded pieces (dkimbody.py), so it is never held whole either; only a header
        # section too long to be read in one bounded piece falls back to the whole text.
        raw_header = Spool.read_headers(src)
        header = normalize_crlf(raw_header)
        sign = signer is not None and signer.would_sign(header)
        seal = forwarder is not None and forwarder.would_seal(message.meta)
        if not sign and not seal:
            return prepare_file(src.path, src.offset, src.size)
        if header.endswith(b"\r\n\r\n"):
            from ..dkimbody import body_hash_of_file
            digest = body_hash_of_file(src.path, src.offset + len(raw_header), src.offset + src.size)
            prefix = signer.sign(header, digest) if sign else b""
            if seal:
                prefix = forwarder.seal(header, message.meta, digest) + prefix
            return prepare_file(src.path, src.offset, src.size, prefix)
    with open(src.path, "rb") as f:
        f.seek(src.offset)
        data = f.read(src.size)
    if len(data) != src.size:
        raise OSError(f"{src.path}: expected {src.size} bytes at offset {src.offset}, read {len(data)}")
    data = normalize_crlf(data)
    prefix = signer.sign(data) if signer is not None else b""
    if forwarder is not None:
        prefix = forwarder.seal(data, message.meta) + prefix
    return prepare(data, prefix)
