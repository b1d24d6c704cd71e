"""Sieve at local delivery: run the global-before, user's and global-after scripts for one
account, then carry the actions out on the store (fileinto, flags) and the queue (redirect,
vacation, reject as a bounce).

Never loses mail: a script that fails to compile or fails while running delivers to the
default mailbox (INBOX, or Junk when a filter judged the message junk) and writes one log
line naming the account and the reason.  Script loading, message reading and evaluation
happen in a worker thread; the store and the spool are used from the loop.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import time
from dataclasses import dataclass, field

from ..keyedlocks import KeyedLocks
from ..store.base import MailboxExists, MailboxNotFound, StoreError
from . import vacation as vac
from .checker import Script
from .interpreter import Action, Context, Host, Limits, Result, evaluate
from .message import SieveMessage
from .parser import SieveSyntaxError
from .scripts import Memory, ScriptStore, load_compiled

log = logging.getLogger("mailstack.sieve")

MEMORY_FILE = "memory.json"
DONE_SECONDS = 7 * 86400  # how long "this redirect/vacation of this delivery was sent" is remembered


def limits_from(cfg) -> Limits:
    s = cfg.sieve
    return Limits(max_steps=s.max_steps, max_actions=s.max_actions, max_redirects=s.max_redirects,
                  max_include_depth=s.max_include_depth)


_stores: dict[tuple, ScriptStore] = {}


def script_store(cfg) -> ScriptStore:
    """One ScriptStore per (data dir, limits): made once, not per delivery."""
    key = (cfg.server.data_dir, cfg.sieve.max_scripts, cfg.sieve.max_script_size)  # a str: no Path per call
    store = _stores.get(key)
    if store is None:
        if len(_stores) > 16:
            _stores.clear()
        store = _stores[key] = ScriptStore(*key)
    return store


class DeliveryHost(Host):
    def __init__(self, cfg, account: str, mailboxes: set[str] | None, memory: Memory | None):
        self.cfg, self.account, self.mailboxes, self.memory = cfg, account, mailboxes, memory

    @property
    def store(self) -> ScriptStore:
        return script_store(self.cfg)

    def load_include(self, name: str, is_global: bool) -> Script | None:
        return self.store.global_include(name) if is_global else self.store.personal_include(self.account, name)

    def mailbox_exists(self, name: str) -> bool:
        if self.mailboxes is None:
            return name.upper() == "INBOX"
        return name in self.mailboxes or (name.upper() == "INBOX")

    def duplicate_seen(self, key: str) -> bool:
        return self.memory is not None and self.memory.seen("duplicate", key)


def environment(cfg, meta: dict) -> dict:
    """RFC 5183 items."""
    return {
        "domain": cfg.server.hostname.partition(".")[2] or cfg.server.hostname,
        "host": cfg.server.hostname or socket.gethostname(),
        "location": "MDA",
        "name": "mailstack",
        "phase": "during",
        "remote-host": meta.get("client_helo") or "",
        "remote-ip": meta.get("client_ip") or "",
        "version": "1",
    }


def load_scripts(cfg, store: ScriptStore, account: str) -> tuple[list[Script], str | None]:
    """[before, user's, after] (those that exist) and the first error met (a script that does
    not compile is skipped; the others still run)."""
    scripts: list[Script] = []
    error = None
    generation, began = store.no_scripts.generation, time.monotonic()  # before the reads: see NoScripts
    for label, path in (("sieve.before", cfg.sieve.before), ("active script", None), ("sieve.after", cfg.sieve.after)):
        try:
            if path is None:
                s = store.active_script(account)
            elif path:
                s = load_compiled(path, cfg.sieve.max_script_size)
            else:
                s = None
        except (SieveSyntaxError, OSError) as e:
            error = error or f"{label}: {e}"
            continue
        if s is not None:
            scripts.append(s)
    if not scripts and error is None and not cfg.sieve.before and not cfg.sieve.after:
        store.no_scripts.note(account, generation, began)
    return scripts, error


def known_no_scripts(cfg, store: ScriptStore, account: str) -> tuple | None:
    """On the loop: what load_scripts would return, when it is known without reading
    (the account had no script a moment ago and nothing changed since: scripts.NoScripts);
    else None.  Global before/after scripts are files edited by hand: with any configured,
    the account's scripts are always read."""
    if cfg.sieve.before or cfg.sieve.after or not store.no_scripts.known(account):
        return None
    return [], None


class LoadedHandoff:
    """The scripts the SMTP stage (stage.py) read for (qid, account) — at RCPT, for the
    DATA-time reject — handed to this message's delivery a moment later: one worker-thread
    load per message instead of two, and the delivery runs the very scripts the message was
    judged with.  Bounded; an entry not taken within MAX_AGE seconds (the message was
    queued) is ignored."""

    MAX_ENTRIES = 4096
    MAX_AGE = 30.0

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[float, tuple]] = {}

    def put(self, qid: str | None, account: str, loaded: tuple) -> None:
        if qid is None:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()  # rare (messages all queued): they load their scripts again
        self._entries[(qid, account)] = (time.monotonic(), loaded)

    def take(self, qid: str, account: str) -> tuple | None:
        got = self._entries.pop((qid, account), None)
        if got is None or time.monotonic() - got[0] > self.MAX_AGE:
            return None
        return got[1]


handoff = LoadedHandoff()


@dataclass
class Plan:
    result: Result | None
    data: bytes
    error: str | None = None
    memory: Memory | None = None
    scripts: int = 0
    timings: dict = field(default_factory=dict)


def evaluate_for(cfg, account: str, raw: bytes, sender: str, recipient: str, meta: dict,
                 mailboxes: set[str] | None = None, memory: Memory | None = None,
                 now: dt.datetime | None = None, loaded: tuple | None = None) -> Plan:
    """Compile (cached) and run the account's scripts on a message.  Blocking; pure apart from
    reading scripts.  Never raises for script problems: Plan.error says what went wrong."""
    scripts, error = loaded if loaded is not None else load_scripts(cfg, script_store(cfg), account)
    if not scripts:
        return Plan(None, raw, error, memory)
    env = environment(cfg, meta) if any({"environment", "include"} & s.uses for s in scripts) else {}
    ctx = Context(SieveMessage(raw), envelope_from=sender, envelope_to=recipient, account=account, meta=meta,
                  environment=env, now=now, limits=limits_from(cfg), separator=cfg.delivery.plus_separator,
                  host=DeliveryHost(cfg, account, mailboxes, memory))
    result = evaluate(scripts, ctx)
    return Plan(result, raw, error or result.error, memory, len(scripts))


def _read_source(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    with open(source.path, "rb") as f:
        f.seek(source.offset)
        return f.read(source.size)


class SieveDelivery:
    """Used by queue/local.py for each local account of a message."""

    def __init__(self, services, store_one) -> None:
        self.services = services
        # store_one(account, message, did, mailbox, flags, sender=) -> (mailbox used, added); raises StoreError;
        # it puts the final delivery's Return-Path and Delivered-To on top
        self.store_one = store_one
        self._lock = KeyedLocks()  # per account

    async def deliver(self, message, account: str, did: str, default_mailbox: str):
        """Returns (status, reply): status "sent" | "bounced"; raises what the store raises."""
        cfg = self.services.config
        store = script_store(cfg)
        loaded = handoff.take(message.qid, account) or known_no_scripts(cfg, store, account)
        if loaded is None:
            loaded = await asyncio.to_thread(load_scripts, cfg, store, account)
        if not loaded[0]:  # no script at all: the plain delivery
            if loaded[1]:
                log.warning("sieve: account=<%s> qid=%s: %s; delivering to %s", account, message.qid, loaded[1],
                            default_mailbox)
            used, added = await self.store_one(account, message.source, did, default_mailbox, (), sender=message.sender)
            return "sent", _delivered(used, added)
        user_dir = store.user_dir(account)
        mailboxes = None
        if any({"mailboxexists", "include"} & s.uses for s in loaded[0]):  # the interpreter asks without I/O
            try:
                mailboxes = {b.name for b in await self.services.store.list_mailboxes(account)}
            except Exception:
                mailboxes = None
        async with self._lock(account):  # the memory file is read, changed and written as one
            def work() -> Plan:
                memory = Memory.load(user_dir / MEMORY_FILE)
                raw = _read_source(message.source)
                return evaluate_for(cfg, account, raw, message.sender, self._original_recipient(message, account),
                                    dict(message.meta), mailboxes, memory, loaded=loaded)
            try:
                plan = await asyncio.to_thread(work)
            except OSError:
                raise  # the spool file could not be read: the queue retries
            except Exception as e:  # a bug in the interpreter must not hold the message back
                log.exception("sieve: account=<%s> qid=%s: evaluation failed", account, message.qid)
                plan = Plan(None, b"", f"internal error: {e!r}")
            if plan.error:
                log.warning("sieve: account=<%s> qid=%s: %s; delivering to %s", account, message.qid, plan.error,
                            default_mailbox)
            if plan.result is None:
                used, added = await self.store_one(account, message.source, did, default_mailbox, (),
                                                   sender=message.sender)
                return "sent", _delivered(used, added)
            return await self._execute(message, account, did, default_mailbox, plan)

    def _original_recipient(self, message, account: str) -> str:
        """The envelope recipient that led to this account (user+detail@, an alias), for
        `envelope "to"`; the account itself when none can be told."""
        directory = self.services.directory
        for rcpt in message.recipients:
            if rcpt.lower() == account:
                return rcpt
        for rcpt in message.recipients:
            try:
                local, _ = directory.expand(rcpt)
            except Exception:
                continue
            if account in local:
                return rcpt
        return account

    async def _execute(self, message, account: str, did: str, default_mailbox: str, plan: Plan):
        result, memory = plan.result, plan.memory
        msg = result.message
        data = msg.as_bytes() if msg.header_edited else message.source
        done: list[str] = []
        for key, seconds in result.duplicate_marks:
            memory.remember("duplicate", key, seconds)
        kinds = {a.kind for a in result.actions}
        if kinds & {"reject", "ereject"}:
            action = next(a for a in result.actions if a.kind in ("reject", "ereject"))
            await asyncio.to_thread(memory.save)
            if not message.sender:
                return "sent", "discarded: sieve reject of a message with the null sender"
            reason = " ".join(action.arg.split())[:400] or "rejected"
            return "bounced", f"550 5.7.1 <{account}>: rejected by the recipient's filter: {reason}"
        for n, action in enumerate(result.actions):
            if action.kind == "keep":  # the default mailbox; INBOX if Junk was deleted, as without sieve
                used, added = await self.store_one(account, data, did, default_mailbox, action.flags,
                                                   sender=message.sender)
                done.append(_delivered(used, added))
            elif action.kind == "fileinto":
                try:
                    used, added = await self._store(account, data, did, action.arg, action, message.sender)
                except StoreError as e:  # no such mailbox (without :create), a name the store refuses
                    log.warning("sieve: account=<%s> qid=%s: fileinto %r: %s; delivering to INBOX",
                                account, message.qid, action.arg, e or "no such mailbox")
                    used, added = await self.store_one(account, data, did, "INBOX", action.flags, sender=message.sender)
                done.append(_delivered(used, added))
            elif action.kind == "redirect":
                sent = await self._redirect(message, account, plan, action, f"{did}.{n}", memory)
                if sent is None:  # a loop: keep it here rather than lose it
                    used, added = await self.store_one(account, data, did, default_mailbox, (), sender=message.sender)
                    sent = f"redirect to <{action.arg}> refused (mail loop); " + _delivered(used, added)
                done.append(sent)
            elif action.kind == "vacation":
                done.append(await self._vacation(message, account, msg, action, memory))
        await asyncio.to_thread(memory.save)
        if not done:
            return "sent", "discarded by sieve"
        return "sent", "; ".join(d for d in done if d)

    async def _store(self, account, data, did, mailbox, action: Action, sender: str):
        try:
            return await self.store_one(account, data, did, mailbox, action.flags, fallback=False, sender=sender)
        except MailboxNotFound:
            if not action.create:
                raise
        try:
            await self.services.store.create_mailbox(account, mailbox)
        except MailboxExists:
            pass
        return await self.store_one(account, data, did, mailbox, action.flags, fallback=False, sender=sender)

    async def _redirect(self, message, account: str, plan: Plan, action: Action, key: str,
                        memory: Memory) -> str | None:
        """Queue the redirect; None when it would loop (this account redirected it before)."""
        msg = plan.result.message
        if any(v.strip().strip("<>").lower() == account.lower() for v in msg.headers("Delivered-To")):
            log.warning("sieve: account=<%s> qid=%s: redirect to <%s> refused: mail loop (Delivered-To)",
                        account, message.qid, action.arg)
            return None
        if memory.seen("duplicate", "done:" + key):
            return f"redirected to <{action.arg}> (already)"
        body = msg.as_bytes() if msg.header_edited else await asyncio.to_thread(_read_source, message.source)
        head = f"Delivered-To: {account}\r\n".encode()
        meta = {"sieve_redirect": account}
        for k in ("client_ip", "auth_user", "smtputf8", "body"):
            if k in message.meta:
                meta[k] = message.meta[k]
        qid = await self.services.spool.enqueue(message.sender, [action.arg], [head, body], meta)
        memory.remember("duplicate", "done:" + key, DONE_SECONDS)
        await asyncio.to_thread(memory.save)
        log.info("sieve: account=<%s> qid=%s: redirected to <%s> as %s", account, message.qid, action.arg, qid)
        return f"redirected to <{action.arg}> as {qid}"

    async def _vacation(self, message, account: str, msg: SieveMessage, action: Action, memory: Memory) -> str:
        cfg = self.services.config
        p = action.params
        sender = message.sender
        mine = [account, self._original_recipient(message, account), *p.get("addresses", [])]
        why = vac.why_not_reply(msg, sender, mine)
        if why is not None:
            log.info("sieve: account=<%s> qid=%s: no vacation reply: %s", account, message.qid, why)
            return ""
        key = vac.memory_key(sender, p["handle"])
        if memory.seen("vacation", key):
            return ""
        period = min(max(float(p["seconds"]), cfg.sieve.vacation_min_period), cfg.sieve.vacation_max_period)
        reply = vac.build_reply(msg, p, sender, account, cfg.server.hostname)
        qid = await self.services.spool.enqueue("", [sender], [reply], {"sieve_vacation": account})
        memory.remember("vacation", key, period)
        await asyncio.to_thread(memory.save)
        log.info("sieve: account=<%s> qid=%s: vacation reply to <%s> as %s", account, message.qid, sender, qid)
        return f"vacation reply to <{sender}>"


def _delivered(mailbox: str, added: bool) -> str:
    where = "" if mailbox == "INBOX" else f" folder {mailbox}"
    return f"delivered to maildir{where}" + ("" if added else " (duplicate)")
