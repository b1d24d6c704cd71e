"""The defence stage of an SMTP session (see smtp/hooks.py): the first one asked.

  connect  (port 25) connection rate per address (421 4.7.0); DNS list lookups start
           (answered at RCPT); pregreet test during defense.greet_delay (554 5.5.1)
  mail     messages per minute per address / per hour per user (451 4.7.0)
  rcpt     unauthenticated clients: recipients per minute, DNSBL (554 5.7.1 naming the
           list), pipelining without PIPELINING, HELO and reverse-DNS policy,
           greylisting (451 4.7.1);
           authenticated users: recipients per hour (451 4.7.0)
  rcpt_refused   an unknown recipient (550 5.1.1) counts towards the address's failed
           recipients per minute; past the limit the connection ends (421 4.7.0) and
           new connections from the address are refused while the rate stays high.

The per-address checks apply to port 25 only: the submission ports require AUTH and
have the per-user limits.  Refusals of DNSBL/HELO/rDNS come at RCPT, not at connect, so that the sending MTA's log
names the recipient and the reason (Postfix's smtpd_delay_reject).  Clients in
smtp.trusted_networks or defense.exempt_networks skip the per-address checks;
authenticated users skip them too but have their own per-user limits.

Memory shared across sessions and reloads (rates, pregreet passes, greylist state) is
one `Shared` object in services.extra["defense"].
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections import Counter

from ..dns import DnsError, Resolver
from ..nexthop import parse_nameserver
from . import dnsbl
from .greylist import REPLY as GREYLIST_REPLY, Greylist, Settings
from .ratelimit import RateCounter
from .state import SQLiteState

log = logging.getLogger("mailstack.defense")

NAME = "defense"
PREGREET_PASS_TTL = 86400.0  # seconds a client that waited for the banner is not delayed again
MAX_PREGREET_PASSES = 100_000
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]"
                       r"([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")


class Shared:
    """What every defence stage of this process shares (survives a reload)."""

    def __init__(self, services) -> None:
        cfg = services.config
        self.minute = RateCounter(60.0)
        self.hour = RateCounter(3600.0)
        self.pregreet_passed: dict[str, float] = {}
        self.state = SQLiteState(cfg.defense.state_file or cfg.data_dir / "defense.sqlite")
        self.stats: Counter = services.metrics.defense
        self._resolver: Resolver | None = None
        self._resolver_cfg = None

    def resolver(self, cfg) -> Resolver:
        want = (tuple(cfg.dns.nameservers), cfg.defense.dnsbl_timeout)
        if self._resolver is None or self._resolver_cfg != want:
            servers = [parse_nameserver(s) for s in cfg.dns.nameservers]
            self._resolver, self._resolver_cfg = Resolver(servers, cfg.defense.dnsbl_timeout), want
        return self._resolver


def shared(services) -> Shared:
    s = services.extra.get("defense")
    if s is None:
        s = services.extra["defense"] = Shared(services)
    return s


def _in(ip: str, networks) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


class DefenseStage:
    name = NAME

    def __init__(self, services) -> None:
        self.services = services
        self.cfg = services.config
        d = self.cfg.defense
        self.d = d
        self.shared = shared(services)
        self.sites = [dnsbl.parse_site(s) for s in d.dnsbl_sites]
        self.greylist = Greylist(self.shared.state, Settings(d.greylist_delay, d.greylist_max_age,
                                                             d.greylist_pass_ttl, d.greylist_auto_allow))

    def _count(self, check: str, reason: str) -> None:
        self.shared.stats[(check, reason)] += 1

    def _exempt(self, conn) -> bool:
        return conn.trusted or _in(conn.ip, self.d.exempt_networks)

    # --- connect --------------------------------------------------------------------------
    async def connect(self, conn) -> str | None:
        # Per-address checks are for port 25: the submission ports require AUTH and have the
        # per-user limits (and a webmail host logging many users in must not hit them).
        st = conn.state[NAME] = {"exempt": self._exempt(conn) or conn.listener != "smtp"}
        if st["exempt"]:
            return None
        d, sh = self.d, self.shared
        if sh.minute.over(f"badrcpt:{conn.ip}", d.max_failed_recipients_per_minute):
            self._count("rate", "failed_recipients")
            log.warning("rate limit: failed recipients over %d per minute: connection refused",
                        d.max_failed_recipients_per_minute, extra={"client": conn.ip})
            return f"421 4.7.0 {conn.hostname} Error: too many unknown recipients from your address, try again later"
        rate = sh.minute.hit(f"conn:{conn.ip}")
        if d.max_connections_per_minute and rate > d.max_connections_per_minute:
            self._count("rate", "connections")
            log.warning("rate limit: connections %.0f/%d per minute", rate, d.max_connections_per_minute,
                        extra={"client": conn.ip})
            return f"421 4.7.0 {conn.hostname} Error: too many connections from your address, try again later"
        if self.sites:
            st["dnsbl"] = asyncio.ensure_future(
                dnsbl.lookup(sh.resolver(self.cfg), self.sites, conn.ip, d.dnsbl_timeout))
        if d.greet_delay > 0 and conn.early_talk is not None:
            now = time.monotonic()
            if sh.pregreet_passed.get(conn.ip, 0.0) <= now:
                started = time.monotonic()
                early = await conn.early_talk(d.greet_delay)
                if early is not None:
                    self._count("pregreet", "early_talker")
                    log.warning("PREGREET %d after %.2f: %r", len(early), time.monotonic() - started, early[:64],
                                extra={"client": conn.ip})
                    return "554 5.5.1 Error: protocol error, you talked before my greeting"
                if len(sh.pregreet_passed) >= MAX_PREGREET_PASSES:
                    sh.pregreet_passed = {k: t for k, t in sh.pregreet_passed.items() if t > now}
                    if len(sh.pregreet_passed) >= MAX_PREGREET_PASSES:
                        sh.pregreet_passed.clear()
                sh.pregreet_passed[conn.ip] = now + PREGREET_PASS_TTL
        return None

    # --- MAIL -----------------------------------------------------------------------------
    async def mail(self, conn, txn) -> str | None:
        d, sh = self.d, self.shared
        if conn.auth_user:
            rate = sh.hour.hit(f"msg:{conn.auth_user.lower()}")
            if d.user_messages_per_hour and rate > d.user_messages_per_hour:
                self._count("rate", "user_messages")
                log.warning("rate limit: user=<%s> messages %.0f/%d per hour", conn.auth_user, rate,
                            d.user_messages_per_hour, extra={"client": conn.ip})
                return "451 4.7.0 Error: you sent too many messages in the last hour, try again later"
            return None
        if conn.state.get(NAME, {}).get("exempt"):
            return None
        rate = sh.minute.hit(f"msg:{conn.ip}")
        if d.max_messages_per_minute and rate > d.max_messages_per_minute:
            self._count("rate", "messages")
            log.warning("rate limit: messages %.0f/%d per minute", rate, d.max_messages_per_minute,
                        extra={"client": conn.ip})
            return "451 4.7.0 Error: too many messages from your address, try again later"
        return None

    # --- RCPT -----------------------------------------------------------------------------
    async def rcpt(self, conn, txn, rcpt: str) -> str | None:
        d, sh = self.d, self.shared
        if conn.auth_user:
            rate = sh.hour.hit(f"rcpt:{conn.auth_user.lower()}")
            if d.user_recipients_per_hour and rate > d.user_recipients_per_hour:
                self._count("rate", "user_recipients")
                log.warning("rate limit: user=<%s> recipients %.0f/%d per hour", conn.auth_user, rate,
                            d.user_recipients_per_hour, extra={"client": conn.ip})
                return "451 4.7.0 Error: you sent to too many recipients in the last hour, try again later"
            return None
        st = conn.state.get(NAME) or {}
        if st.get("exempt"):
            return None
        rate = sh.minute.hit(f"rcpt:{conn.ip}")
        if d.max_recipients_per_minute and rate > d.max_recipients_per_minute:
            self._count("rate", "recipients")
            log.warning("rate limit: recipients %.0f/%d per minute", rate, d.max_recipients_per_minute,
                        extra={"client": conn.ip})
            return "451 4.7.0 Error: too many recipients from your address, try again later"
        refusal = (await self._dnsbl(conn, st) or self._pipelining(conn, st) or self._helo(conn, st)
                   or await self._rdns(conn, st))
        if refusal:
            return refusal
        if d.greylist and conn.listener == "smtp":
            return await self._greylist(conn, txn, rcpt, st)
        return None

    async def rcpt_refused(self, conn, rcpt: str, reply: str) -> str | None:
        """An unknown recipient: count it; past the limit, end the connection."""
        if conn.auth_user or (conn.state.get(NAME) or {}).get("exempt"):
            return None
        limit = self.d.max_failed_recipients_per_minute
        rate = self.shared.minute.hit(f"badrcpt:{conn.ip}")
        if limit and rate > limit:
            self._count("rate", "failed_recipients")
            log.warning("rate limit: failed recipients %.0f/%d per minute (harvesting?): disconnecting", rate, limit,
                        extra={"client": conn.ip})
            return f"421 4.7.0 {conn.hostname} Error: too many unknown recipients, try again later"
        return None

    async def _dnsbl(self, conn, st: dict) -> str | None:
        task = st.get("dnsbl")
        if task is None:
            return None
        if "dnsbl_result" not in st:
            try:
                st["dnsbl_result"] = await asyncio.shield(task)
            except Exception:  # noqa: BLE001 - a broken list never refuses mail
                log.exception("dnsbl lookup failed", extra={"client": conn.ip})
                st["dnsbl_result"] = dnsbl.Result()
            result = st["dnsbl_result"]
            if result.listed_by or result.allowed_by:
                log.info("dnsbl: score %d/%d: listed by %s%s", result.score, self.d.dnsbl_threshold,
                         ",".join(result.listed_by) or "-",
                         f", allowed by {','.join(result.allowed_by)}" if result.allowed_by else "",
                         extra={"client": conn.ip})
        result = st["dnsbl_result"]
        if result.score >= self.d.dnsbl_threshold and result.listed_by:
            self._count("dnsbl", "listed")
            log.warning("reject: client listed by %s (score %d >= %d)", ",".join(result.listed_by), result.score,
                        self.d.dnsbl_threshold, extra={"client": conn.ip})
            return (f"554 5.7.1 Service unavailable; client [{conn.ip}] blocked using "
                    f"{', '.join(result.listed_by)}")
        return None

    def _pipelining(self, conn, st: dict) -> str | None:
        mode = self.d.pipelining_check
        if mode == "off" or not conn.pipelined:
            return None
        if not st.get("pipelining_logged"):
            st["pipelining_logged"] = True
            self._count("pipelining", mode)
            log.info("COMMAND PIPELINING before PIPELINING was offered%s", " (refused)" if mode == "reject" else "",
                     extra={"client": conn.ip})
        if mode == "reject":
            return "550 5.5.1 Error: protocol error, command pipelining without PIPELINING"
        return None

    def _helo(self, conn, st: dict) -> str | None:
        mode = self.d.helo_check
        if mode == "off":
            return None
        # Judged and logged once per HELO name, not once per recipient.
        if st.get("helo_seen") == conn.helo:
            problem = st.get("helo_problem")
            return self._helo_reply(conn, problem) if problem and mode == "reject" else None
        problem = st["helo_problem"] = helo_problem(conn.helo, conn.hostname)
        st["helo_seen"] = conn.helo
        if problem is None:
            return None
        self._count("helo", mode)
        log.info("helo check: %r %s%s", (conn.helo or "")[:100], problem, " (refused)" if mode == "reject" else "",
                 extra={"client": conn.ip})
        return self._helo_reply(conn, problem) if mode == "reject" else None

    @staticmethod
    def _helo_reply(conn, problem: str) -> str:
        return f"550 5.7.1 <{(conn.helo or '')[:100]}>: Helo command rejected: {problem}"

    async def _rdns(self, conn, st: dict) -> str | None:
        mode = self.d.rdns_check
        if mode == "off":
            return None
        if "rdns_ok" not in st:
            st["rdns_ok"] = await forward_confirmed(self.shared.resolver(self.cfg), conn.ip)
        if st["rdns_ok"]:
            return None
        if not st.get("rdns_logged"):
            st["rdns_logged"] = True
            self._count("rdns", mode)
            log.info("rdns check: no reverse name that resolves back to the client%s",
                     " (refused)" if mode == "reject" else "", extra={"client": conn.ip})
        if mode == "reject":
            return f"450 4.7.25 Client host rejected: cannot find your hostname, [{conn.ip}]"
        return None

    async def _greylist(self, conn, txn, rcpt: str, st: dict) -> str | None:
        d = self.d
        result = st.get("dnsbl_result")
        if result is not None and result.allowed_by:
            return None
        if _in(conn.ip, d.greylist_exempt_networks):
            return None
        # SPF of MAIL FROM, as the senderauth stage left it at MAIL (it runs before RCPT).
        spf = (txn.state.get("senderauth") or {}).get("mailfrom")
        if spf is not None and d.greylist_spf_domains:
            domain = spf.domain or txn.mail_from.rpartition("@")[2]
            if spf.result == "pass" and domain.lower() in {x.lower() for x in d.greylist_spf_domains}:
                return None
        try:
            passes, why = await self.greylist.check(conn.ip, txn.mail_from, rcpt)
        except Exception:  # noqa: BLE001 - the state store failing must not stop mail
            log.exception("greylist state unavailable: accepting", extra={"client": conn.ip})
            return None
        if passes:
            if why == "passed":
                log.info("greylist: triplet passed from=<%s> to=<%s>", txn.mail_from, rcpt, extra={"client": conn.ip})
            return None
        self._count("greylist", why)
        log.info("greylist: %s triplet from=<%s> to=<%s>: 451 4.7.1", why, txn.mail_from, rcpt,
                 extra={"client": conn.ip})
        return GREYLIST_REPLY

    def close(self, conn) -> None:
        st = conn.state.get(NAME) or {}
        task = st.get("dnsbl")
        if task is not None and not task.done():
            task.cancel()


def helo_problem(helo: str | None, our_name: str) -> str | None:
    """Why a HELO name is not acceptable, or None."""
    if not helo:
        return "no HELO"
    if helo.startswith("[") and helo.endswith("]"):
        literal = helo[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
            return None
        except ValueError:
            return "invalid address literal"
    if not _HOSTNAME.match(helo):
        return "need fully-qualified hostname"
    if helo.rstrip(".").lower() == our_name.lower():
        return "that is my own name"
    return None


async def forward_confirmed(resolver: Resolver, ip: str) -> bool:
    """The address has a reverse name whose own addresses include it (FCrDNS)."""
    try:
        names = await resolver.ptr(ip)
    except DnsError:
        return False
    want = ipaddress.ip_address(ip)
    for name in names[:10]:
        try:
            if any(ipaddress.ip_address(a) == want for a in await resolver.addresses(name)):
                return True
        except DnsError:
            continue
    return False
