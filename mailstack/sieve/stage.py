"""The DATA-time part of Sieve: reject/ereject refused in the SMTP session itself.

When a message has a single recipient and it leads to exactly one local account, that
account's scripts are evaluated at DATA (without side effects: no redirect, vacation or
duplicate memory) and a reject/ereject becomes the 550 reply, so no bounce is ever sent
(RFC 5429 2.1).  Otherwise delivery runs them and a reject becomes a DSN.

The scripts are read when the recipient is accepted (RCPT), in a worker thread, while the
client sends the message; DATA and the delivery at accept time use that same read (no
thread hop of their own).  A script changed between a message's RCPT and its delivery
applies from the next message on.  An account known to have no script (scripts.NoScripts:
most accounts, forgotten at once when ManageSieve or the CLI changes its scripts) needs no
read at all.
"""
from __future__ import annotations

import asyncio
import logging

from ..smtp.hooks import Verdict
from .deliver import evaluate_for, handoff, known_no_scripts, load_scripts, script_store

log = logging.getLogger("mailstack.sieve")


class SieveRejectStage:
    name = "sieve"

    def __init__(self, services) -> None:
        self.services = services

    def _account(self, rcpt: str) -> str | None:
        """The one local account `rcpt` leads to, else None (no DATA-time evaluation)."""
        directory = self.services.directory
        try:
            local, remote = directory.expand(rcpt)
        except Exception:
            return None
        if len(local) != 1 or remote or not directory.account_exists(local[0]):
            return None
        return local[0]

    async def rcpt(self, conn, txn, rcpt: str) -> None:
        """The first recipient's scripts are read now, in a worker thread, while the client
        sends the message: at DATA they are at hand without another thread hop."""
        txn.state.pop(self.name, None)
        if txn.rcpts:  # a second recipient: nothing is evaluated at DATA
            return None
        account = self._account(rcpt)
        if account is not None:
            cfg = self.services.config
            store = script_store(cfg)
            loaded = known_no_scripts(cfg, store, account)  # most accounts: no read at all
            if loaded is None:
                loaded = asyncio.ensure_future(asyncio.to_thread(load_scripts, cfg, store, account))
                loaded.add_done_callback(_retrieve)
            txn.state[self.name] = (rcpt, account, loaded)
        return None

    async def data(self, conn, txn, message: bytes) -> Verdict:
        if len(txn.rcpts) != 1:
            return Verdict()
        rcpt = txn.rcpts[0]
        account = self._account(rcpt)
        if account is None:
            return Verdict()
        cfg = self.services.config
        try:
            early = txn.state.pop(self.name, None)
            if early is not None and early[:2] == (rcpt, account):
                loaded = early[2] if isinstance(early[2], tuple) else await early[2]
            else:
                store = script_store(cfg)
                loaded = (known_no_scripts(cfg, store, account)
                          or await asyncio.to_thread(load_scripts, cfg, store, account))
            handoff.put(txn.qid, account, loaded)  # the delivery right after uses these
            if not any({"reject", "ereject", "include"} & s.uses for s in loaded[0]):
                return Verdict()  # nothing in these scripts can refuse the message
            meta = {"client_ip": conn.ip, "client_helo": conn.helo, "auth_user": conn.auth_user}
            plan = await asyncio.to_thread(evaluate_for, cfg, account, message, txn.mail_from, rcpt, meta,
                                           loaded=loaded)
        except Exception:  # accept: delivery runs the scripts again and keeps the message if they fail
            log.exception("sieve: account=<%s>: DATA-time evaluation failed", account)
            return Verdict()
        if plan.result is None or plan.error:
            return Verdict()
        for action in plan.result.actions:
            if action.kind in ("reject", "ereject"):
                reason = " ".join(action.arg.split())[:400] or "rejected"
                log.info("sieve: account=<%s>: %s at DATA: %s", account, action.kind, reason)
                return Verdict(reply=f"550 5.7.1 {reason}", log={"sieve": action.kind})
        return Verdict()


def _retrieve(task: "asyncio.Future") -> None:
    """A read started at RCPT whose transaction went no further: its error is not news."""
    if not task.cancelled():
        task.exception()


def stages(services) -> list:
    if not services.config.sieve.enabled:
        return []
    return [SieveRejectStage(services)]
