"""NOTIFY (RFC 5465): unsolicited news about the mailboxes a client watches.

`parse_notify` is the grammar (a cursor over the framed command in, a `NotifySpec` out, no
I/O).  `NotifyCommands` is mixed into IMAPSession: NOTIFY SET/NONE, and the delivery of
what the in-process event bus (events.py) reports for the account:

- a mailbox other than the selected one: `* STATUS` with the items Dovecot sends: MESSAGES
  UIDNEXT UIDVALIDITY UNSEEN after new messages, MESSAGES UIDNEXT UNSEEN after expunges,
  UNSEEN after flag changes;
- the selected mailbox, with a `selected` filter: EXISTS/EXPUNGE/FETCH FLAGS at once (the
  session's sync), and for MessageNew a FETCH of the requested items;
- MailboxName: `* LIST` for a created mailbox, `(\\NonExistent)` for a deleted one, the new
  name with ("OLDNAME" (old)) for a renamed one; SubscriptionChange: `* LIST` with or
  without \\Subscribed.

When: as soon as the session is not in a command (between commands, and during IDLE),
as Dovecot and mox do.  `selected-delayed` leaves the selected mailbox as without NOTIFY
(changes told at command completion and in IDLE).  Where this differs from the RFC: with
no selected filter the selected mailbox still gets the RFC 3501 responses at command
completion (the RFC would suppress them), so a client never holds stale sequence numbers.

Bounds: at most MAX_NAMED mailbox names in a NOTIFY command (NO [NOTIFICATIONOVERFLOW], as
Dovecot answers); pending news is coalesced per mailbox and capped (MAX_PENDING): beyond
that the session says `* OK [NOTIFICATIONOVERFLOW]` and stops notifying, as RFC 5465 5.8
asks, and the client re-syncs with STATUS/LIST.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ..events import MailboxEvent
from ..store.base import MailboxNotFound, StoreError
from . import response
from .parser import Command, FetchAtt, SequenceSet, _fetch_atts
from .states import AUTH, READ_SIZE, SELECTED

log = logging.getLogger("mailstack.imap")

MAX_NAMED = 1000  # mailbox names in one NOTIFY command
MAX_PENDING = 2000  # mailboxes, LIST lines and new UIDs waiting to be told

# The events this server can report; RFC 5465 6: the others get NO [BADEVENT (these)].
SUPPORTED = ("MessageNew", "MessageExpunge", "FlagChange", "MailboxName", "SubscriptionChange")
KNOWN = SUPPORTED + ("AnnotationChange", "MailboxMetadataChange", "ServerMetadataChange")
MESSAGE_EVENTS = ("MessageNew", "MessageExpunge", "FlagChange", "AnnotationChange")
_CANON = {e.lower(): e for e in KNOWN}
FILTERS = ("selected", "selected-delayed", "inboxes", "personal", "subscribed", "subtree", "mailboxes")

# what a store event (events.py MailboxEvent.kind) means in RFC 5465 terms
_EVENT_OF_KIND = {"new": "MessageNew", "expunge": "MessageExpunge", "flags": "FlagChange",
                  "created": "MailboxName", "deleted": "MailboxName", "renamed": "MailboxName",
                  "subscribed": "SubscriptionChange", "unsubscribed": "SubscriptionChange"}


@dataclass(frozen=True)
class EventGroup:
    filter: str  # one of FILTERS
    mailboxes: tuple[str, ...] = ()  # for subtree / mailboxes
    events: tuple[str, ...] = ()  # canonical names; () is NONE
    fetch_atts: tuple[FetchAtt, ...] = ()  # MessageNew's items (selected filters only)


@dataclass(frozen=True)
class NotifySpec:
    groups: tuple[EventGroup, ...] = ()
    status: bool = False  # SET STATUS: a STATUS for each watched mailbox at once

    @property
    def selected(self) -> EventGroup | None:
        return next((g for g in self.groups if g.filter in ("selected", "selected-delayed")), None)


# ------------------------------------------------------------------------------ grammar

def parse_notify(c) -> dict:
    """`NOTIFY NONE` / `NOTIFY SET [STATUS] event-group *(SP event-group)` (RFC 5465 8)."""
    c.sp()
    word = c.atom("SET or NONE").upper()
    if word == "NONE":
        return {"spec": None, "refused": None}
    if word != "SET":
        raise c.error("expected SET or NONE")
    c.sp()
    status = False
    if c.peek() != 0x28:
        if c.atom("STATUS or an event group").upper() != "STATUS":
            raise c.error("expected STATUS or an event group")
        status = True
        c.sp()
    groups = [_event_group(c)]
    while c.maybe_sp():
        groups.append(_event_group(c))
    spec = NotifySpec(tuple(groups), status)
    return {"spec": spec, "refused": _check(c, spec)}


def _event_group(c) -> EventGroup:
    c.expect(b"(")
    flt = c.atom("mailbox filter").lower()
    if flt not in FILTERS:
        raise c.error(f"unknown mailbox filter {flt}"[:80])
    mailboxes: list[str] = []
    if flt in ("subtree", "mailboxes"):
        c.sp()
        if c.peek() == 0x28:
            c.pos += 1
            mailboxes.append(c.mailbox())
            while c.maybe_sp():
                mailboxes.append(c.mailbox())
            c.expect(b")")
        else:
            mailboxes.append(c.mailbox())
    c.sp()
    events: list[str] = []
    fetch_atts: tuple[FetchAtt, ...] = ()
    if c.peek() == 0x28:
        c.pos += 1
        while True:
            raw = c.atom("event")
            name = _CANON.get(raw.lower(), raw)  # an unknown one is refused by _check (NO)
            events.append(name)
            if name == "MessageNew" and c.peek() == 0x20 and c.line[c.pos + 1:c.pos + 2] == b"(":
                c.pos += 1
                fetch_atts = tuple(_no_seen(c, a) for a in _fetch_atts(c))
            if c.peek() == 0x29:
                c.pos += 1
                break
            c.sp()
    elif c.atom("event list or NONE").upper() != "NONE":
        raise c.error("expected an event list or NONE")
    c.expect(b")")
    return EventGroup(flt, tuple(mailboxes), tuple(events), fetch_atts)


def _no_seen(c, att: FetchAtt) -> FetchAtt:
    """RFC 5465 5.2: the FETCH of a notification must not set \\Seen."""
    if att.name == "BODY[]" and not att.peek:
        return FetchAtt("BODY[]", att.section, True, att.partial)
    if att.name in ("RFC822", "RFC822.TEXT"):
        raise c.error(f"{att.name} would set \\Seen; use BODY.PEEK[]")
    return att


def _check(c, spec: NotifySpec) -> tuple[str, str] | None:
    """The rules of RFC 5465 3.1 and 5 that the grammar alone does not carry: a violation
    raises ParseError (BAD); what is well-formed but refused is returned as (code, text)
    for a NO."""
    selected = [g for g in spec.groups if g.filter in ("selected", "selected-delayed")]
    if len(selected) > 1:
        raise c.error("only one selected or selected-delayed filter")
    unsupported: set[str] = set()
    for g in spec.groups:
        ev = set(g.events)
        if g.filter in ("selected", "selected-delayed") and ev - set(MESSAGE_EVENTS):
            raise c.error("selected filters take message events only")
        if g.fetch_atts and g.filter not in ("selected", "selected-delayed"):
            raise c.error("fetch items with MessageNew only for the selected mailbox")
        if ("MessageNew" in ev) != ("MessageExpunge" in ev):
            raise c.error("MessageNew and MessageExpunge go together")
        if ev & {"FlagChange", "AnnotationChange"} and "MessageNew" not in ev:
            raise c.error("FlagChange needs MessageNew and MessageExpunge")
        unsupported |= ev - set(SUPPORTED)
    if unsupported:
        return ("BADEVENT (" + " ".join(SUPPORTED) + ")",
                "Unsupported NOTIFY events: " + " ".join(sorted(unsupported))[:200])
    if sum(len(g.mailboxes) for g in spec.groups) > MAX_NAMED:
        return "NOTIFICATIONOVERFLOW", "Too many mailbox names"
    return None


def matches(spec: NotifySpec, mailbox: str, event: str, selected: str | None,
            subscribed: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether `event` (an RFC 5465 name) in `mailbox` is to be told (RFC 5465 6: the first
    filter that names the mailbox and the event decides; NONE stops the search)."""
    is_message = event in MESSAGE_EVENTS
    for g in spec.groups:
        if g.filter in ("selected", "selected-delayed"):
            if mailbox == selected and is_message:
                return event in g.events
            continue
        if mailbox == selected and is_message:
            continue  # message events of the selected mailbox only through a selected filter
        if g.filter == "personal":
            hit = True
        elif g.filter == "inboxes":  # where mail is delivered: INBOX (Sieve may file anywhere)
            hit = mailbox == "INBOX" or mailbox.startswith("INBOX/")
        elif g.filter == "subscribed":
            hit = mailbox in subscribed
        elif g.filter == "subtree":
            hit = any(mailbox == m or mailbox.startswith(m + "/") for m in g.mailboxes)
        else:  # mailboxes
            hit = mailbox in g.mailboxes
        if not hit:
            continue
        if not g.events:
            return False
        if event in g.events:
            return True
    return False


# ------------------------------------------------------------------------------ session side

@dataclass
class _Pending:
    """What happened since the client was last told, coalesced."""

    status: dict[str, set[str]] = field(default_factory=dict)  # mailbox -> the message events seen
    lists: list[tuple[str, str, str | None]] = field(default_factory=list)  # (kind, name, old name)
    new_after: tuple[object, int] | None = None  # (selected Mailbox, its highest UID) before arrivals

    def size(self) -> int:
        return len(self.status) + len(self.lists)


class NotifyCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    notify_spec: NotifySpec | None = None
    _notify_unsub = None
    _notify_pending: _Pending | None = None
    _notify_wake: asyncio.Event | None = None
    _notify_subscribed: set[str] | None = None
    _notify_unseen: dict[str, int] | None = None

    async def cmd_notify(self, cmd: Command) -> None:
        if self.state < AUTH:
            return self.tagged(cmd, "BAD", "Not authenticated")
        spec: NotifySpec | None = cmd.args["spec"]
        if cmd.args["refused"]:  # the NOTIFY in force stays as it was
            code, text = cmd.args["refused"]
            return self.tagged(cmd, "NO", f"[{code}] {text}")
        self.notify_stop()
        if spec is None:
            return await self.done(cmd, "NOTIFY completed")
        self._notify_unseen = {}  # mailbox -> UNSEEN last told
        if any(g.filter == "subscribed" for g in spec.groups):
            self._notify_subscribed = {b.name for b in await self.services.store.list_mailboxes(self.account)
                                       if b.subscribed}
        if spec.status:  # RFC 5465 3.1: the state of each watched mailbox, now
            for b in await self.services.store.list_mailboxes(self.account):
                if b.selectable and (self.mbox is None or b.name != self.mbox.name) and \
                        matches(spec, b.name, "MessageNew", None, self._notify_subscribed or ()):
                    await self._send_status(b.name, {"MessageNew"})
        self.notify_spec = spec
        self._notify_pending = _Pending()
        self._notify_wake = asyncio.Event()
        self._notify_unsub = self.services.events.subscribe_account(self.account, self._notify_event)
        log.info("IMAP NOTIFY on", extra={"client": self.peer_ip})
        await self.done(cmd, "NOTIFY completed")

    def notify_stop(self) -> None:
        if self._notify_unsub is not None:
            self._notify_unsub()
        self._notify_unsub = None
        self.notify_spec = None
        self._notify_pending = None
        self._notify_wake = None

    def _notify_event(self, ev: MailboxEvent) -> None:
        """Event bus callback: note it (cheap, never raises); told when the session may speak."""
        spec, pending = self.notify_spec, self._notify_pending
        event = _EVENT_OF_KIND.get(ev.kind)
        if spec is None or pending is None or event is None:
            return
        if ev.origin is self and event in MESSAGE_EVENTS:
            return  # the client's own APPEND/COPY/STORE: it knows
        if event == "SubscriptionChange" and self._notify_subscribed is not None:
            (self._notify_subscribed.add if ev.kind == "subscribed" else self._notify_subscribed.discard)(ev.mailbox)
        if pending.size() > MAX_PENDING:  # the session is not keeping up: notify_push says overflow
            self._notify_wake.set()
            return
        selected = self.mbox.name if self.mbox is not None else None
        if not matches(spec, ev.mailbox, event, selected, self._notify_subscribed or ()):
            return
        if ev.mailbox == selected and event in MESSAGE_EVENTS:
            group = spec.selected
            if group is None or group.filter != "selected":
                return  # selected-delayed: told at command completion, as without NOTIFY
            if event == "MessageNew" and group.fetch_atts and pending.new_after is None:
                msgs = self.mbox.messages  # what the client knows of: the rest is new
                pending.new_after = (self.mbox, msgs[-1].uid if msgs else 0)
        elif event in MESSAGE_EVENTS:
            pending.status.setdefault(ev.mailbox, set()).add(event)
        else:
            pending.lists.append((ev.kind, ev.mailbox, ev.old_name))
        self._notify_wake.set()
        if self.wake is not None:  # in IDLE: wake it
            self.wake.set()

    async def read_or_notify(self) -> bytes:
        """Read from the client; while waiting, tell what NOTIFY asks for as it happens."""
        if self.notify_spec is None:
            return await self.reader.read(READ_SIZE)
        read_task = asyncio.ensure_future(self.reader.read(READ_SIZE))
        try:
            while True:
                wake = self._notify_wake
                if wake is None:  # NOTIFY went off (overflow)
                    return await read_task
                if wake.is_set():
                    await self.notify_push()
                    continue
                wake_task = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait({read_task, wake_task}, return_when=asyncio.FIRST_COMPLETED)
                wake_task.cancel()
                if read_task in done:
                    return read_task.result()
        finally:
            if not read_task.done():
                read_task.cancel()

    async def notify_push(self) -> None:
        """Send what is pending (between commands and in IDLE), then flush."""
        spec, pending = self.notify_spec, self._notify_pending
        if spec is None or pending is None:
            return
        self._notify_wake.clear()
        if pending.size() > MAX_PENDING:
            self.notify_stop()
            self.send(b"* OK [NOTIFICATIONOVERFLOW] Too many changes at once: NOTIFY is off")
            return await self.flush()
        self._notify_pending = _Pending()
        group = spec.selected
        if self.state == SELECTED and group is not None and group.filter == "selected" and self.dirty:
            await self.sync(allow_expunge=True)
        if pending.new_after is not None and pending.new_after[0] is self.mbox and group is not None:
            await self._fetch_new(pending.new_after[1], group.fetch_atts)
        for name, events in pending.status.items():
            if self.mbox is None or name != self.mbox.name:
                await self._send_status(name, events)
        if pending.lists:
            await self._send_lists(pending.lists)
        await self.flush()

    async def _send_status(self, name: str, events: set[str]) -> None:
        try:
            st = await self.services.store.status(self.account, name)
        except (MailboxNotFound, StoreError):
            return  # gone meanwhile: MailboxName tells it, if asked for
        # the items Dovecot sends for each kind of change
        if "MessageNew" in events:
            items: tuple[str, ...] = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
        elif "MessageExpunge" in events:
            items = ("MESSAGES", "UIDNEXT", "UNSEEN")
        else:
            items = ("UNSEEN",)
            if self._notify_unseen.get(name) == st.get("UNSEEN"):
                return  # e.g. \Deleted set: nothing a STATUS shows changed (Dovecot is as quiet)
        if len(self._notify_unseen) >= MAX_PENDING:
            self._notify_unseen.clear()
        self._notify_unseen[name] = st.get("UNSEEN")
        self.send(b"* STATUS " + response.mailbox(name) + b" (" +
                  " ".join(f"{i} {int(st.get(i, 0))}" for i in items).encode() + b")")

    async def _send_lists(self, lists) -> None:
        boxes = {b.name: b for b in await self.services.store.list_mailboxes(self.account)}
        renamed_from = {old for kind, _, old in lists if kind == "renamed"}
        for kind, name, old in lists:
            if kind == "deleted" and name in renamed_from:
                continue  # a RENAME: told once, as the new name with OLDNAME
            b = boxes.get(name)
            attrs = []
            if b is None or not b.selectable:
                attrs.append("\\NonExistent" if b is None else "\\Noselect")
            if kind == "subscribed" or (kind != "unsubscribed" and b is not None and b.subscribed):
                attrs.append("\\Subscribed")  # also for a name that is not a mailbox (RFC 3501 allows it)
            line = b"* LIST (" + " ".join(attrs).encode() + b') "/" ' + response.mailbox(name)
            if kind == "renamed" and old is not None:
                line += b' ("OLDNAME" (' + response.mailbox(old) + b"))"
            self.send(line)

    async def _fetch_new(self, after: int, atts: tuple[FetchAtt, ...]) -> None:
        """RFC 5465 5.2: a FETCH of the requested items for each new message (after its EXISTS)."""
        msgs = self.mbox.messages
        if not msgs or msgs[-1].uid <= after:
            return
        cmd = Command("*", "FETCH", True, {"set": SequenceSet([(after + 1, msgs[-1].uid)]), "atts": list(atts)})
        # cmd_fetch ends with the tagged reply of a real FETCH: this one has none
        self.tagged = lambda *args: None
        saved, self.uid_cmd = self.uid_cmd, True
        try:
            await self.cmd_fetch(cmd)
        finally:
            del self.tagged
            self.uid_cmd = saved
