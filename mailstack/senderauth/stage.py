"""The sender-authentication stage of an SMTP session (see smtp/hooks.py).

  MAIL   SPF of the MAIL FROM identity and of HELO, concurrently; refused only when
         senderauth.spf_reject is on (550 5.7.23 fail, 451 4.7.24 temperror).
  DATA   DKIM and ARC (dkimpy in a thread, keys prefetched through the async resolver)
         together with the DMARC record lookup; then the DMARC verdict and its policy:
         reject -> 550 5.7.1 before "250", quarantine -> meta["junk"] (Junk folder).
         Authentication-Results is added, forged ones with our authserv-id removed, the
         verdicts kept in meta["authres"] (for aggregate reports) and the log line.

Only mail received on port 25 from untrusted clients is judged; submission gets
`auth=pass smtp.auth=<user>`; trusted networks get results but no enforcement.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re

from email.utils import getaddresses

from .. import dns as dns_mod
from ..nexthop import to_alabel
from . import authresults, dkim, dmarc, reports, spf

log = logging.getLogger("mailstack.senderauth")

NAME = "senderauth"
# Messages up to this size (with at most two keys to check) are verified on the event loop:
# with dkimpy's hot spots replaced (dkim.py) that is ~0.3 ms of CPU, less than the hand-over
# to a worker thread costs.  Bigger ones (canonicalisation grows with size) go to a thread.
INLINE_VERIFY_BYTES = 32 * 1024


class SenderAuthStage:
    name = NAME

    def __init__(self, cfg, resolver) -> None:
        self.cfg = cfg
        self.settings = cfg.senderauth
        self.hostname = cfg.server.hostname
        self.resolver = resolver
        self.allow_domains: set[str] = set()
        self.allow_networks: list = []
        for item in self.settings.allow:
            try:
                self.allow_networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.allow_domains.add(item.lower().rstrip("."))
        self.arc_trusted = {d.lower().rstrip(".") for d in self.settings.arc_trusted}
        self.verdicts = reports.VerdictLog(cfg.data_dir)

    # --- helpers ---------------------------------------------------------------------
    @staticmethod
    def _judged(conn) -> bool:
        return conn.listener == "smtp" and conn.auth_user is None

    def _allowed(self, conn, *domains: str) -> bool:
        if conn.trusted:
            return True
        try:
            ip = ipaddress.ip_address(conn.ip)
            if any(ip in net for net in self.allow_networks):
                return True
        except ValueError:
            pass
        for domain in domains:
            domain = (domain or "").lower().rstrip(".")
            while domain:
                if domain in self.allow_domains:
                    return True
                domain = domain.partition(".")[2]
        return False

    async def _spf(self, conn, mail_from: str) -> dict[str, spf.Result]:
        """SPF of MAIL FROM (unless null) and of HELO, bounded by dns_timeout together."""
        helo = (conn.helo or "").strip()
        checks = {}
        if mail_from:
            domain = mail_from.rpartition("@")[2]
            checks["mailfrom"] = spf.check_host(self.resolver, conn.ip, domain, mail_from, helo, self.hostname)
        if helo and not helo.startswith("[") and spf.valid_domain(helo):
            checks["helo"] = spf.check_host(self.resolver, conn.ip, helo, f"postmaster@{helo}", helo, self.hostname)
        out: dict[str, spf.Result] = {}
        tasks = {k: asyncio.ensure_future(c) for k, c in checks.items()}
        if tasks:
            done, pending = await asyncio.wait(tasks.values(), timeout=self.settings.dns_timeout)
            for task in pending:
                task.cancel()
            for key, task in tasks.items():
                out[key] = task.result() if task in done and not task.exception() \
                    else spf.Result("temperror", "DNS lookups took too long")
        if "helo" not in out:
            out["helo"] = spf.Result("none", "no usable HELO name", domain=helo)
        if "mailfrom" not in out:
            out["mailfrom"] = out["helo"]  # the null sender: HELO is the identity (RFC 7208 2.4)
        return out

    # --- SMTP events --------------------------------------------------------------------
    async def mail(self, conn, txn) -> str | None:
        if not self._judged(conn):
            return None
        try:
            results = await self._spf(conn, txn.mail_from)
        except Exception:  # a bug here must not cost the sender its mail: record nothing
            log.exception("SPF check failed")
            return None
        txn.state[NAME] = results
        res = results["mailfrom"]
        if not self.settings.spf_reject or self._allowed(conn, res.domain):
            return None
        if res.result == "fail":
            # The explanation is the sender domain's text: no line breaks into our reply.
            text = re.sub(r"[\x00-\x1f\x7f]+", " ", res.explanation or spf.DEFAULT_EXPLANATION)[:200]
            return f"550 5.7.23 SPF: {conn.ip} is not allowed to send mail from {res.domain}: {text}"
        if res.result == "temperror":
            return f"451 4.7.24 SPF: temporary DNS error checking {res.domain}, try again later"
        return None

    async def data(self, conn, txn, message: bytes):
        try:
            return await self._data(conn, txn, message)
        except Exception:  # a bug here must not refuse or lose mail: accept unjudged, say so
            from ..smtp.hooks import Verdict
            log.exception("sender authentication failed")
            stripped = authresults.strip_ours(message, self.hostname)
            return Verdict(message=stripped, headers=[("Authentication-Results", authresults.header_value(
                self.hostname, [authresults.method("dmarc", "temperror", "internal error")]))])

    async def _data(self, conn, txn, message: bytes):
        from ..smtp.hooks import Verdict

        stripped = authresults.strip_ours(message, self.hostname)
        verdict = Verdict(message=stripped)
        if conn.auth_user is not None:
            value = authresults.header_value(self.hostname, [
                authresults.method("auth", "pass", smtp_auth=conn.auth_user)])
            verdict.headers.append(("Authentication-Results", value))
            verdict.meta["authres"] = {"auth": "pass"}
            return verdict
        if conn.listener != "smtp":
            return verdict
        results = txn.state.get(NAME) or await self._spf(conn, txn.mail_from)
        spf_res = results["mailfrom"]
        helo_res = results["helo"]
        fields = dkim.header_fields(message)
        head_from = _from_domain(fields)
        names = dkim.key_names(message, fields)
        # Warm answers (the big senders' keys and records) are taken from the resolver's
        # memory: no task, no timer, the same answers records() would give.
        keys = dkim.cached_keys(self.resolver, names)
        found = (dmarc.cached_record(self.resolver, head_from) if head_from else (None, "")) \
            if keys is not None else None
        if found is None:
            keys, found = await self._lookups(names, head_from)
        if len(message) <= INLINE_VERIFY_BYTES and len(names) <= 2:
            # dkimpy over a small message costs ~0.3 ms: less than handing it to a thread.
            dkim_results, arc_res = dkim.verify_both(message, keys, self.settings.dkim_min_rsa_bits)
        else:
            dkim_results, arc_res = await asyncio.to_thread(
                dkim.verify_both, message, keys, self.settings.dkim_min_rsa_bits)
        if head_from is None:
            dm = dmarc.Verdict("permerror", reason="no single From: address")
        elif isinstance(found, BaseException):
            dm = dmarc.Verdict("temperror", head_from, reason=str(found))
        else:
            record, where = found
            dm = dmarc.judge(record, where, head_from, spf_res.domain, spf_res.result, dkim_results)
        return self._finish(conn, txn, verdict, spf_res, helo_res, dkim_results, arc_res, dm)

    async def _lookups(self, names: set[str], head_from: str | None) -> tuple[dict, object]:
        """Every lookup of the message at once (key records, the DMARC record), bounded
        together: (keys for dkim.verify_both, find_record's answer or the DnsError)."""
        record_task = asyncio.ensure_future(dmarc.find_record(self.resolver, head_from)) if head_from else None
        keys: dict = {}
        found: object = (None, "")
        try:
            async with asyncio.timeout(self.settings.dns_timeout):
                if names:
                    keys = await dkim.prefetch_keys(self.resolver, names)
                if record_task is not None:
                    found = await record_task
        except TimeoutError:
            keys = {n: keys.get(n, dkim.KEY_TEMPFAIL) for n in names}
            found = dns_mod.DnsError("DNS lookups took too long", temporary=True)
        except dns_mod.DnsError as e:
            found = e
        finally:
            if record_task is not None and not record_task.done():
                record_task.cancel()
        return keys, found

    def _finish(self, conn, txn, verdict, spf_res, helo_res, dkim_results, arc_res, dm):
        override = ""
        if dm.result == "fail" and dm.disposition != "none":
            if arc_res.result == "pass" and (arc_res.sealer in self.arc_trusted
                                             or dmarc.org_domain(arc_res.sealer) in self.arc_trusted):
                override = f"trusted ARC seal of {arc_res.sealer}"
            elif self._allowed(conn, dm.from_domain, spf_res.domain):
                override = "allow-listed"
            elif self.settings.dmarc_policy == "monitor":
                override = "monitor only"
        action = "none" if override else dm.disposition
        if action == "reject" and self.settings.dmarc_policy == "quarantine":
            action = "quarantine"

        methods = [
            authresults.method("spf", spf_res.result, _spf_comment(conn.ip, spf_res, txn.mail_from),
                               **({"smtp_mailfrom": txn.mail_from} if txn.mail_from
                                  else {"smtp_helo": conn.helo or ""})),
        ]
        if txn.mail_from and helo_res.result != "none":
            methods.append(authresults.method("spf", helo_res.result, "HELO identity", smtp_helo=conn.helo or ""))
        if dkim_results:
            for r in dkim_results:
                methods.append(authresults.method("dkim", r.result, r.reason, header_d=r.domain, header_s=r.selector,
                                                  header_i=r.identity, header_b=r.b))
        else:
            methods.append(authresults.method("dkim", "none", "message not signed"))
        methods.append(authresults.method("arc", arc_res.result, arc_res.reason))
        dmarc_reason = (f"p={dm.policy.upper()} dis={action.upper()}" if dm.result in ("pass", "fail")
                        else dm.reason)
        if override:
            dmarc_reason += f"; policy not applied: {override}"
        methods.append(authresults.method("dmarc", dm.result, dmarc_reason, header_from=dm.from_domain))
        verdict.headers.append(("Authentication-Results", authresults.header_value(self.hostname, methods)))
        verdict.meta["authres"] = {
            "spf": spf_res.result, "spf_domain": spf_res.domain, "helo": helo_res.result,
            "dkim": [{"result": r.result, "d": r.domain, "s": r.selector} for r in dkim_results],
            "arc": arc_res.result, "arc_sealer": arc_res.sealer,
            "dmarc": dm.as_dict() | {"action": action, "override": override},
        }
        verdict.log.update({"spf": spf_res.result,
                            "dkim": ",".join(f"{r.result}:{r.domain}" for r in dkim_results) or "none",
                            "dmarc": dm.result + (f"({action})" if action != "none" else ""),
                            "arc": arc_res.result})
        if dm.result in ("pass", "fail"):  # the domain publishes a policy: a report row
            self.verdicts.record({
                "ip": conn.ip, "header_from": dm.from_domain, "envelope_from": spf_res.domain,
                "policy_domain": dm.record_domain, "p": dm.policy, "pct": dm.pct, "dmarc": dm.result,
                "disposition": action, "override": override, "spf": spf_res.result,
                "spf_aligned": dm.spf_aligned, "dkim_aligned": dm.dkim_aligned,
                "dkim": [{"d": r.domain, "s": r.selector, "result": r.result} for r in dkim_results]})
        if action == "reject":
            verdict.reply = f"550 5.7.1 Email rejected per DMARC policy for {dm.from_domain}"
        elif action == "quarantine":
            verdict.meta["junk"] = f"DMARC quarantine policy of {dm.from_domain}"
        return verdict


_PLAIN_FROM = re.compile(r'^[^"(),;:\\@<>]*<?([^"(),;:\\@<>\s]+@[A-Za-z0-9.\-]+)>?\s*$')


def _from_domain(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Domain (A-label) of the single From: address (RFC 7489 6.6.1), or None."""
    values = [v for n, v in fields if n.lower() == b"from"]
    if len(values) != 1:  # none, or several: no single author domain to judge
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    plain = _PLAIN_FROM.match(text)  # "Name <a@b>" / "a@b": no quoting to get wrong, no parser needed
    addrs = [plain.group(1)] if plain else [a for _, a in getaddresses([text]) if "@" in a]
    if len(addrs) != 1:
        return None
    try:
        return to_alabel(addrs[0].rpartition("@")[2]).lower()
    except ValueError:
        return None


def _spf_comment(ip: str, res: spf.Result, mail_from: str) -> str:
    who = mail_from or f"postmaster@{res.domain}"
    return {
        "pass": f"{res.domain}: domain of {who} designates {ip} as permitted sender",
        "fail": f"{res.domain}: domain of {who} does not designate {ip} as permitted sender",
        "softfail": f"{res.domain}: transitioning domain of {who} does not designate {ip} as permitted sender",
        "neutral": f"{res.domain}: {ip} is neither permitted nor denied by domain of {who}",
        "none": f"{res.domain}: domain of {who} does not publish SPF",
    }.get(res.result, res.reason)


def build(services) -> list:
    """The stage for services.config (none when senderauth.enabled is off)."""
    cfg = services.config
    if not cfg.senderauth.enabled:
        return []
    dmarc.org_domain("example.com")  # load the Public Suffix List now, not in the first session
    return [SenderAuthStage(cfg, dns_mod.shared(cfg))]
