"""Mailbox quotas at the server's level: where the limits come from, the SMTP check, the
warning mail and the `mailstack user quota` / `user list` output.

Usage tracking and enforcement in the store live in store/quota.py (Maildir++ maildirsize);
this module connects it to the directory (each account's own limits, the `quotas` file),
the configuration (`[quota]` defaults) and SMTP:

* RCPT to a local account (not an alias: its other targets may take the message) that is
  full already, or that SIZE= (RFC 1870) says the message would overfill, gets
  `452 4.2.2 Mailbox full` (senders retry); when the message is bigger than the whole
  limit, `552 5.2.2` (it can never fit).
* At the end of DATA (the size is known now) the same checks run for every recipient.
  SMTP has one reply for DATA, so: when EVERY recipient is a local account that cannot take
  the message, the reply is 552 5.2.2 if none of them ever could, else 452 4.2.2; when at
  least one recipient can take it, "250" and the queue delivers per recipient: an account
  that is full defers (kept and retried until queue.max_lifetime, then bounced, as Dovecot's
  LDA with quota_full_tempfail), one that can never fit bounces at once with 5.2.2.
"""
from __future__ import annotations

import email.utils
import logging
import time
from pathlib import Path

from .smtp.hooks import Verdict
from .store import names
from .store.quota import Limits, Quota, Usage, format_size, load, parse_size, percent, refusal

log = logging.getLogger("mailstack.quota")


_defaults: tuple = (None, None, Limits())  # (default_storage, default_messages, their Limits)


def _default_limits(quota) -> Limits:
    """The `[quota]` defaults as Limits, made again only when they change (a reload): SMTP
    asks for an account's limits six times a message, and most accounts have none of their own."""
    global _defaults
    storage, messages, limits = _defaults
    if storage != quota.default_storage or messages != quota.default_messages:
        storage, messages = quota.default_storage, quota.default_messages
        limits = Limits(parse_size(storage), messages)
        _defaults = (storage, messages, limits)
    return limits


def limits_for(directory, cfg, account: str) -> Limits:
    """The account's own limits (directory's quotas file), else the `[quota]` defaults."""
    own = directory.quotas.get(account.lower())
    if own is None:
        return _default_limits(cfg.quota)
    storage = own.get("storage")
    if storage is None:
        storage = parse_size(cfg.quota.default_storage)
    messages = own.get("messages")
    if messages is None:
        messages = cfg.quota.default_messages
    return Limits(storage, messages)


def install(services) -> None:
    """Give the server's store its Quota (tracking, enforcement, warnings)."""
    store = services.store
    if not hasattr(store, "account_dir"):
        return
    store.quota = Quota(store.account_dir,
                        lambda account: limits_for(services.directory, services.config, account),
                        lambda: services.config.quota.warn_percent,
                        lambda account, usage, limits: send_warning(services, account, usage, limits))


# --------------------------------------------------------------------------- the warning mail

def warning_message(account: str, usage: Usage, limits: Limits, hostname: str, now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    domain = account.rpartition("@")[2]
    fill = percent(usage, limits)
    lines = [f"Your mailbox {account} is {fill:.0f}% full:", ""]
    if limits.storage:
        lines.append(f"  storage:  {format_size(usage.storage)} of {format_size(limits.storage)} "
                     f"({100 * usage.storage / limits.storage:.0f}%)")
    if limits.messages:
        lines.append(f"  messages: {usage.messages} of {limits.messages} "
                     f"({100 * usage.messages / limits.messages:.0f}%)")
    lines += ["", "When it is full, new mail for you is held back by the senders' servers and is",
              "returned to them if there is still no room after some days.",
              "Delete messages you no longer need (and empty the Trash) to make room.", "",
              f"-- the postmaster of {domain}"]
    header = [
        f"From: Postmaster <postmaster@{domain}>",
        f"To: <{account}>",
        f"Subject: Your mailbox is {fill:.0f}% full",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: {email.utils.make_msgid('quota', domain=hostname or domain)}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(header) + "\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode("utf-8")


async def send_warning(services, account: str, usage: Usage, limits: Limits) -> None:
    """Into the account's INBOX straight away (not through the queue: it must get in even
    though the mailbox is nearly full; store/quota.py exempts it)."""
    message = warning_message(account, usage, limits, services.config.server.hostname)
    await services.store.deliver(account, message, f"quota-warning-{time.time_ns()}", "INBOX")
    log.info("quota: %s is %.0f%% full: warning delivered", account, percent(usage, limits))


# --------------------------------------------------------------------------- SMTP

REPLY_FULL = "452 4.2.2 <{}>: Mailbox full"
REPLY_TOO_BIG = "552 5.2.2 <{}>: Message too large for the recipient's mailbox quota"


class QuotaStage:
    """RCPT and end-of-DATA checks (see the module's doc)."""

    name = "quota"

    def __init__(self, services) -> None:
        self.services = services

    async def _refusal(self, rcpt: str, size: int):
        """Why the recipient's account cannot take `size` bytes now (None when it can, or when
        the recipient is not one local account)."""
        quota = getattr(self.services.store, "quota", None)
        if quota is None:
            return None
        res = self.services.directory.resolve(rcpt)
        if res.kind != "local" or res.account is None:
            return None
        limits = quota.limits_of(res.account)
        if limits.unlimited:
            return None
        usage, limits = await quota.usage(res.account)
        return refusal(usage, limits, max(size, 1), 1)

    async def rcpt(self, conn, txn, rcpt: str) -> str | None:
        refused = await self._refusal(rcpt, getattr(txn, "size", None) or 0)
        if refused is None:
            return None
        return (REPLY_TOO_BIG if refused.permanent else REPLY_FULL).format(rcpt)

    async def data(self, conn, txn, message: bytes) -> Verdict:
        refusals = []
        for rcpt in txn.rcpts:
            refused = await self._refusal(rcpt, len(message))
            if refused is None:
                return Verdict()  # someone takes it: the queue handles the others
            refusals.append((rcpt, refused))
        if not refusals:
            return Verdict()
        if all(r.permanent for _, r in refusals):
            reply = REPLY_TOO_BIG.format(refusals[0][0])
        else:
            reply = REPLY_FULL.format(next(rcpt for rcpt, r in refusals if not r.permanent))
        return Verdict(reply=reply, log={"quota": "full"})


def stages(services) -> list:
    return [QuotaStage(services)]


# --------------------------------------------------------------------------- CLI

def account_usage(cfg, directory, account: str) -> tuple[Usage, Limits]:
    """Blocking, for the CLI: the account's usage from its maildirsize (counted when that is
    missing or stale, without writing: the server owns the file)."""
    limits = limits_for(directory, cfg, account)
    domain, local = names.account_parts(account)
    usage, _ = load(Path(cfg.mail_dir) / domain / local, limits, write=False)
    return usage, limits


def describe(usage: Usage, limits: Limits) -> str:
    """"12.5M of 1G (1%), 42 messages" — the usage and limits of one account in one line."""
    storage = format_size(usage.storage)
    if limits.storage:
        storage += f" of {format_size(limits.storage)} ({100 * usage.storage / limits.storage:.0f}%)"
    else:
        storage += " (no limit)"
    messages = f"{usage.messages} messages"
    if limits.messages:
        messages = f"{usage.messages} of {limits.messages} messages ({100 * usage.messages / limits.messages:.0f}%)"
    return f"{storage}, {messages}"


def list_lines(cfg, directory) -> list[str]:
    """`mailstack user list`: one account a line, its usage and limits after it."""
    accounts = sorted(directory.accounts)
    width = max((len(a) for a in accounts), default=0)
    out = []
    for account in accounts:
        usage, limits = account_usage(cfg, directory, account)
        own = "" if account in directory.quotas else " [default]"
        out.append(f"{account.ljust(width)}  {describe(usage, limits)}{own}")
    return out


def parse_quota_args(size: str, messages: str | None) -> tuple[int | None, int | None]:
    """`user quota USER SIZE [--messages N]` -> (storage, messages) for Directory.set_quota.
    SIZE "none" removes the account's own limits (the defaults apply again).  ValueError
    with a one-line reason for anything else."""
    if size.strip().lower() == "none":
        if messages is not None:
            raise ValueError("\"none\" removes both limits; leave out --messages")
        return None, None
    storage = parse_size(size)
    count = None
    if messages is not None:
        if not messages.isdigit():
            raise ValueError(f"--messages {messages!r}: expected a number of messages (0 = no limit)")
        count = int(messages)
    return storage, count
