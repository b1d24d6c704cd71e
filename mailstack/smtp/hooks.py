"""Checks that run inside an SMTP session: the contract between the session and the
defence, sender-authentication and content-filter stages.

A stage is an object with a `name` and any of the async methods of `Stage` below; the
session calls every configured stage, in order, at each point of the conversation and
applies what it answers.  Stages never write to the client themselves: they return
facts and verdicts and the session does the talking (so pipelining, error counting and
logging stay in one place).

  connect(conn)            -> reply | None   refuse right after accept ("554 ..."/"421 ...")
  helo(conn)               -> reply | None   after HELO/EHLO was accepted (conn.helo is set)
  mail(conn, txn)          -> reply | None   after MAIL FROM passed the session's own checks
  rcpt(conn, txn, rcpt)    -> reply | None   after the recipient passed the relay policy
  data(conn, txn, message) -> Verdict        the whole message (our Received: not yet added)
  close(conn)              -> None           the connection is gone (release per-session state)
  rcpt_refused(conn, rcpt, reply) -> reply | None   the session refused a recipient as unknown
                           (550 5.1.1); a 421 answer replaces that reply and ends the session

Replies are whole SMTP reply lines ("550 5.7.1 ..."); 4xx means "try later".  The first
stage that refuses wins: later stages are not asked for that event.  Per-connection and
per-transaction scratch state lives in `conn.state[stage.name]` / `txn.state[stage.name]`.

Stages are built by server.py from the configuration and handed to every session as
`services.stages` (a tuple; a reload builds a new tuple, sessions keep theirs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol


@dataclass
class Connection:
    """What is known about one SMTP connection.  Sessions update it as they go."""

    ip: str
    listener: str  # "smtp" | "submission" | "submissions"
    hostname: str  # our server.hostname
    tls: bool = False
    helo: str | None = None
    auth_user: str | None = None
    trusted: bool = False  # client in smtp.trusted_networks
    rdns: str | None = None  # reverse name, once known (may stay None)
    # Before the banner: wait up to `seconds` for the client to talk first (pregreet test);
    # returns what it sent (b"" = it hung up) or None if it stayed silent.  What it sent is
    # kept for the command loop.  None when the session cannot offer it.
    early_talk: Callable[[float], Awaitable[bytes | None]] | None = None
    # The client sent a command while an earlier one was unanswered before PIPELINING was
    # offered (after HELO, or before the EHLO reply): a bot's shortcut (RFC 2920).
    pipelined: bool = False
    state: dict = field(default_factory=dict)


@dataclass
class Transaction:
    """One MAIL FROM … DATA transaction."""

    mail_from: str  # "" is the null sender
    rcpts: list[str] = field(default_factory=list)  # accepted so far
    qid: str | None = None  # the queue id the message will get (known from DATA on)
    size: int | None = None  # MAIL FROM's SIZE= (RFC 1870), when the client gave it
    state: dict = field(default_factory=dict)


@dataclass
class Verdict:
    """What a data stage decided.  The default is "accept, change nothing".

    reply      refuse with this line (4xx tempfail, 5xx reject) before "250" is said
    discard    say "250" and drop the message (a milter's discard); logged
    hold       accept into the hold queue with this reason (a milter's quarantine)
    headers    (name, value) pairs prepended to the message, in this order, above ours
    message    the whole message replaced (a milter's header edits / body replacement);
               later stages see the replacement
    meta       merged into the queue file's meta; keys the local side reads:
                 "junk": str     deliver into the recipient's Junk folder; the value says why
                 "spam": {"score": float, "threshold": float, "is_spam": bool}
                 "virus": str    name of the virus found (only with an accept verdict)
                 "authres": dict  sender-authentication results (spf/dkim/dmarc/arc)
    add_rcpts / del_rcpts / sender   envelope changes (milter actions)
    log        fields for the per-message log line, e.g. {"spf": "pass", "rspamd": "4.1"}
    """

    reply: str | None = None
    discard: bool = False
    hold: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    message: bytes | None = None
    meta: dict = field(default_factory=dict)
    add_rcpts: list[str] = field(default_factory=list)
    del_rcpts: list[str] = field(default_factory=list)
    sender: str | None = None
    log: dict = field(default_factory=dict)


class Stage(Protocol):
    name: str

    async def connect(self, conn: Connection) -> str | None: ...
    async def helo(self, conn: Connection) -> str | None: ...
    async def mail(self, conn: Connection, txn: Transaction) -> str | None: ...
    async def rcpt(self, conn: Connection, txn: Transaction, rcpt: str) -> str | None: ...
    async def data(self, conn: Connection, txn: Transaction, message: bytes) -> Verdict: ...
    def close(self, conn: Connection) -> None: ...


def header_lines(headers: list[tuple[str, str]]) -> bytes:
    """(name, value) pairs -> header lines with CRLF; a value may already hold folded lines."""
    out = []
    for name, value in headers:
        value = value.replace("\r\n", "\n").replace("\n", "\r\n")
        out.append(f"{name}: {value}\r\n".encode("utf-8"))
    return b"".join(out)


async def ask(stages, event: str, *args) -> str | None:
    """Run `event` (connect/helo/mail/rcpt) on every stage that has it; the first refusal wins."""
    for stage in stages:
        method = getattr(stage, event, None)
        if method is None:
            continue
        reply = await method(*args)
        if reply:
            return reply
    return None


async def judge(stages, conn: Connection, txn: Transaction, message: bytes) -> tuple[Verdict, bytes]:
    """Run every stage's data() in order and fold the verdicts into one.

    Returns (verdict, message): the message as the last replacement left it.  A refusal,
    discard or hold stops the chain (later stages are not asked)."""
    total = Verdict()
    for stage in stages:
        method = getattr(stage, "data", None)
        if method is None:
            continue
        v = await method(conn, txn, message)
        if v.message is not None:
            message = v.message
        if fold(total, v):
            break
    return total, message


def fold(total: Verdict, v: Verdict) -> bool:
    """Add verdict `v` to `total` (a later replacement wins); True when `v` ends the chain
    (a refusal, discard or hold)."""
    if v.message is not None:
        total.message = v.message
    total.headers.extend(v.headers)
    total.meta.update(v.meta)
    total.log.update(v.log)
    total.add_rcpts.extend(v.add_rcpts)
    total.del_rcpts.extend(v.del_rcpts)
    if v.sender is not None:
        total.sender = v.sender
    if v.reply or v.discard or v.hold:
        total.reply, total.discard, total.hold = v.reply, v.discard, v.hold
        return True
    return False


def close_all(stages, conn: Connection) -> None:
    for stage in stages:
        method = getattr(stage, "close", None)
        if method is not None:
            method(conn)
