"""QUOTA (RFC 9208): GETQUOTAROOT, GETQUOTA, SETQUOTA, with the STORAGE and MESSAGE resources.

One quota root per account, named "" (as the RFC's own examples): every mailbox of the
account belongs to it, so MOVE inside the account changes nothing and COPY/APPEND count.
A resource is listed only when it has a limit; an account without any limit has no quota
root (QUOTAROOT lists none, GETQUOTA "" answers NO), as the RFC's grammar has no
"unlimited".  STORAGE is in units of 1024 octets, rounded up (as Dovecot reports it).
Limits are set by the administrator (`mailstack user quota`), never by a user: SETQUOTA
is refused, as Dovecot without a quota admin does.  Over-quota APPEND/COPY answer
NO [OVERQUOTA] (session.dispatch maps store/quota.py's QuotaExceeded).
"""
from __future__ import annotations

import logging

from ..store.quota import Limits, Usage
from . import response
from .parser import Command

log = logging.getLogger("mailstack.imap")

ROOT = ""


def quota_list(usage: Usage, limits: Limits) -> str:
    """The resources of a QUOTA response: "STORAGE used limit MESSAGE used limit"."""
    items = []
    if limits.storage:
        items.append(f"STORAGE {-(-usage.storage // 1024)} {-(-limits.storage // 1024)}")
    if limits.messages:
        items.append(f"MESSAGE {usage.messages} {limits.messages}")
    return " ".join(items)


class QuotaCommands:
    """Mixed into IMAPSession (session.py)."""

    async def _quota(self) -> tuple[Usage, Limits]:
        if not getattr(self, "_quota_logged", False):
            self._quota_logged = True
            log.info("IMAP QUOTA used", extra={"client": self.peer_ip})
        quota = getattr(self.services.store, "quota", None)
        if quota is None:
            return Usage(), Limits()
        return await quota.usage(self.account, fresh=True)

    def _send_quota(self, usage: Usage, limits: Limits) -> None:
        self.send(b"* QUOTA " + response.string(ROOT) + f" ({quota_list(usage, limits)})".encode())

    async def cmd_getquotaroot(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        await self.services.store.status(self.account, name)  # NO [NONEXISTENT] when there is none
        usage, limits = await self._quota()
        roots = b"" if limits.unlimited else b" " + response.string(ROOT)
        self.send(b"* QUOTAROOT " + response.mailbox(name) + roots)
        if not limits.unlimited:
            self._send_quota(usage, limits)
        await self.done(cmd, "GETQUOTAROOT completed")

    async def cmd_getquota(self, cmd: Command) -> None:
        usage, limits = await self._quota()
        if cmd.args["root"] != ROOT or limits.unlimited:
            return self.tagged(cmd, "NO", "[NONEXISTENT] No such quota root")
        self._send_quota(usage, limits)
        await self.done(cmd, "GETQUOTA completed")

    async def cmd_setquota(self, cmd: Command) -> None:
        self.tagged(cmd, "NO", "[NOPERM] Quotas are set by the administrator (mailstack user quota)")
