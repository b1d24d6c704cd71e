"""LIST and LSUB: RFC 3501's basic LIST, LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819),
SPECIAL-USE selection and return options (RFC 6154 section 5), and CREATE-SPECIAL-USE.

`select_mailboxes` is pure (mailboxes, subscriptions and the parsed request in, the rows to
answer out); `ListCommands` is the session mixin that gathers the facts and writes the
responses.  Where the RFCs leave room, this follows Dovecot (compared side by side in
tests/test_imap_list_extended.py):

* basic LIST (no selection option, one pattern, no RETURN) answers as before: children
  attributes (CHILDREN, RFC 3348) and special-use attributes always, and a parent that does
  not exist is \\Noselect;
* extended LIST returns children attributes only for RETURN (CHILDREN), special-use only
  for RETURN (SPECIAL-USE) or the SPECIAL-USE selection, and a name that does not exist is
  \\NonExistent (RFC 5258 section 3.4), exactly as RFC 5258's examples show.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import re
from dataclasses import dataclass, field

from ..store.base import MailboxInfo, StoreError
from . import response
from .parser import Command

log = logging.getLogger("mailstack.imap")

# RFC 6154 attributes a real folder can carry; \All and \Flagged name virtual mailboxes
# (every message / every flagged message), which this store does not have.
CREATABLE_USES = {"\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash"}
KNOWN_USES = CREATABLE_USES | {"\\All", "\\Flagged"}


def canonical_use(attr: str) -> str:
    """\\archive -> \\Archive (attributes are case-insensitive, RFC 3501 section 9)."""
    return "\\" + attr[1:].capitalize()


MAX_WILDCARDS = 32  # per LIST pattern: a bound on the work one LIST may ask for


class ListPattern:
    """A LIST pattern: `*` matches anything, `%` anything but the hierarchy separator.

    Matched segment by segment, keeping the set of places each literal segment can end:
    time grows with (wildcards x name length), never exponentially, whereas a regex of
    ".*a.*a.*a.*b" backtracks for seconds over a 500-character name (a client could stall
    the event loop with one LIST)."""

    __slots__ = ("segments", "wildcards")

    def __init__(self, pattern: str) -> None:
        if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] in "/*%"):
            pattern = "INBOX" + pattern[5:]  # INBOX is case-insensitive (RFC 3501 5.1)
        self.segments: list[str] = []
        self.wildcards: list[str] = []  # "*" or "%" between segments i and i+1
        for i, piece in enumerate(re.split(r"([*%]+)", pattern)):
            if i % 2:  # a run of wildcards: "*" if any of them crosses the separator
                self.wildcards.append("*" if "*" in piece else "%")
            else:
                self.segments.append(piece)

    def match(self, name: str) -> bool:
        segs, wilds = self.segments, self.wildcards
        if not wilds:
            return name == segs[0]
        if not name.startswith(segs[0]) or sum(map(len, segs)) > len(name):
            return False
        slashes = [0]  # slashes[i]: how many "/" in name[:i]
        for ch in name:
            slashes.append(slashes[-1] + (ch == "/"))
        ends = [len(segs[0])]  # ascending: where the segments so far can end
        last = len(wilds)
        for i, wild in enumerate(wilds, 1):
            seg = segs[i]
            if i == last:  # the final segment sits at the end of the name
                start = len(name) - len(seg)
                if not name.endswith(seg) or start < ends[0]:
                    return False
                if wild == "*":
                    return True
                p = ends[bisect.bisect_right(ends, start) - 1]
                return slashes[start] == slashes[p]
            new: list[int] = []
            q = name.find(seg, ends[0])
            while q >= 0:
                # "%": the skipped text, from the latest end before q, holds no "/"
                if wild == "*" or slashes[q] == slashes[ends[bisect.bisect_right(ends, q) - 1]]:
                    new.append(q + len(seg))
                q = name.find(seg, q + 1)
            if not new:
                return False
            ends = new
        return False  # not reached


def list_pattern(pattern: str) -> ListPattern:
    return ListPattern(pattern)


def full_pattern(reference: str, pattern: str) -> str:
    """The reference and the pattern joined (RFC 3501 6.3.8), one separator between."""
    if reference.endswith("/") and pattern.startswith("/"):
        return reference + pattern[1:]
    return reference + pattern


@dataclass
class Row:
    """One `* LIST` answer."""

    name: str
    attrs: list[str] = field(default_factory=list)
    childinfo: list[str] = field(default_factory=list)  # CHILDINFO extended data (RFC 5258 3.5)
    selectable: bool = False  # exists and can be selected: gets a STATUS under LIST-STATUS


def _parents(name: str):
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def select_mailboxes(boxes: list[MailboxInfo], subscribed: set[str], patterns: list[ListPattern],
                     selection: set[str], returns: set[str]) -> list[Row]:
    """The rows of an extended LIST (RFC 5258 section 3), INBOX first, then by name."""
    by_name = {b.name: b for b in boxes}
    existing = {b.name for b in boxes if b.selectable}
    # every name that exists, is subscribed, or is a parent of either: what can be listed
    universe = set(by_name) | subscribed
    for n in list(universe):
        universe.update(_parents(n))
    children: set[str] = set()  # names with an existing mailbox below them
    for n in existing:
        children.update(_parents(n))
    want_sub = "SUBSCRIBED" in selection
    want_special = "SPECIAL-USE" in selection
    has_criteria = want_sub or want_special

    def special(n: str) -> str | None:
        b = by_name.get(n)
        return b.special_use if b is not None and b.selectable else None

    def meets(n: str) -> bool:
        if not has_criteria:
            return n in by_name
        return (not want_sub or n in subscribed) and (not want_special or special(n) is not None)

    def matches(n: str) -> bool:
        return any(rx.match(n) for rx in patterns)

    # RECURSIVEMATCH: a listed name whose descendant meets the criteria but matches no
    # pattern gets CHILDINFO (RFC 5258 section 3.5, its example 8: "Foo2", "Eps2")
    childinfo_for: set[str] = set()
    if "RECURSIVEMATCH" in selection:
        for n in universe:
            if meets(n) and not matches(n):
                childinfo_for.update(_parents(n))
    tags = [t for t in ("SUBSCRIBED", "SPECIAL-USE") if t in selection]
    rows = []
    for n in universe:
        if not matches(n):
            continue
        recursive = n in childinfo_for
        if not meets(n) and not recursive:
            continue
        # RFC 5819 section 3: no STATUS for a name listed only for its CHILDINFO
        row = Row(n, selectable=n in existing and meets(n))
        if n not in existing:
            row.attrs.append("\\NonExistent")
        if n in subscribed and (want_sub or "SUBSCRIBED" in returns):
            row.attrs.append("\\Subscribed")
        if "CHILDREN" in returns:
            if n in children:
                row.attrs.append("\\HasChildren")
            elif n in existing:
                row.attrs.append("\\HasNoChildren")
        if (want_special or "SPECIAL-USE" in returns) and special(n):
            row.attrs.append(special(n))
        if recursive:
            row.childinfo = tags
        rows.append(row)
    rows.sort(key=lambda r: (r.name != "INBOX", r.name))
    return rows


def basic_rows(boxes: list[MailboxInfo], rx: ListPattern, lsub: bool = False) -> list[Row]:
    """RFC 3501 LIST / LSUB (one pattern, no options), as mailstack always answered them."""
    names = {b.name: b for b in boxes}
    lines: dict[str, list[str]] = {}
    for b in boxes:
        if lsub and not b.subscribed:
            continue
        if rx.match(b.name):
            attrs = []
            if not b.selectable:
                attrs.append("\\Noselect")
            if not lsub:
                has_children = b.has_children or any(n.startswith(b.name + "/") for n in names)
                attrs.append("\\HasChildren" if has_children else "\\HasNoChildren")
                if b.special_use:
                    attrs.append(b.special_use)
            lines[b.name] = attrs
        # a parent that does not exist (or, for LSUB, is not subscribed) but matches "%".
        # RFC 3501 6.3.9: only where "%" stopped at the parent; LSUB "" "x*" lists the
        # subscribed "x/y" itself, not its unsubscribed parent "x".
        parts = b.name.split("/")
        if lsub and (not b.subscribed or rx.match(b.name)):
            parts = []
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in lines or not rx.match(parent):
                continue
            if parent in names and (not lsub or names[parent].subscribed):
                continue
            lines[parent] = ["\\Noselect"] + ([] if lsub else ["\\HasChildren"])
    order = sorted(lines, key=lambda n: (n != "INBOX", n))
    return [Row(n, lines[n], selectable=n in names and names[n].selectable) for n in order]


class ListCommands:
    """Mixed into IMAPSession (session.py) before MailboxCommands: LIST, LSUB, and the
    special-use part of CREATE."""

    @property
    def utf8_names(self) -> bool:
        """Mailbox names go both ways in UTF-8 (RFC 6855 section 3, RFC 9051 section 5.1)."""
        return "UTF8=ACCEPT" in self.enabled or "IMAP4REV2" in self.enabled

    def note_extension(self, name: str) -> None:
        """Log once per session which extension a client used (the real-client matrix)."""
        used = self.__dict__.setdefault("_extensions_used", set())
        if name not in used:
            used.add(name)
            log.info("IMAP %s used", name, extra={"client": self.peer_ip})

    async def cmd_list(self, cmd: Command, lsub: bool = False) -> None:
        args = cmd.args
        word = b"* LSUB" if lsub else b"* LIST"
        patterns = args.get("patterns", [args["pattern"]])
        ref = args["reference"]
        extended = args.get("extended", False)
        if extended:
            self.note_extension("LIST-EXTENDED")
            if args["status_items"]:
                self.note_extension("LIST-STATUS")
        valid = [p for p in patterns if p is not None] if ref is not None else []
        if not extended and valid == [""]:  # the hierarchy delimiter and root (RFC 3501 6.3.8)
            self.send(word + b' (\\Noselect) "/" ""')
            return await self.done(cmd, f"{cmd.name} completed")
        matchers = [list_pattern(full_pattern(ref, p)) for p in valid]
        if any(len(m.wildcards) > MAX_WILDCARDS for m in matchers):
            return self.tagged(cmd, "BAD", f"more than {MAX_WILDCARDS} wildcards in a pattern")
        rows: list[Row] = []
        if matchers:
            boxes = await self.services.store.list_mailboxes(self.account)
            # matching thousands of names against several patterns is CPU work: off the loop
            if extended:
                subscribed = set(await self.services.store.subscriptions(self.account))
                rows = await asyncio.to_thread(select_mailboxes, boxes, subscribed, matchers,
                                               args["selection"], args["returns"])
            else:
                rows = await asyncio.to_thread(basic_rows, boxes, matchers[0], lsub)
                if "IMAP4REV2" in self.enabled and not lsub:  # RFC 9051 7.3.1: what does not exist
                    for row in rows:
                        row.attrs = ["\\NonExistent" if a == "\\Noselect" else a for a in row.attrs]
        items = args.get("status_items") or []
        utf8 = self.utf8_names
        for row in rows:
            line = word + b" (" + " ".join(row.attrs).encode() + b') "/" ' + response.mailbox(row.name, utf8)
            if row.childinfo:
                line += b' ("CHILDINFO" (' + " ".join(f'"{t}"' for t in row.childinfo).encode() + b"))"
            self.send(line)
            if items and row.selectable:
                # RFC 5819: a STATUS after the LIST of each selectable mailbox; one that
                # vanished meanwhile gets none (it is gone, the LIST stands)
                try:
                    st = await self.services.store.status(self.account, row.name)
                except StoreError:  # gone meanwhile: its STATUS may be dropped (RFC 5819 section 2)
                    continue
                self.send(self.status_response(row.name, items, st))
            await self.maybe_flush()
        await self.done(cmd, f"{cmd.name} completed")

    async def cmd_lsub(self, cmd: Command) -> None:
        await self.cmd_list(cmd, lsub=True)

    def status_response(self, name: str, items: list[str], st: dict) -> bytes:
        """`* STATUS name (ITEM n ...)`, items in the order asked."""
        if "SIZE" in items:
            self.note_extension("STATUS=SIZE")
        if "APPENDLIMIT" in items:  # RFC 7889: the same for every mailbox
            st = {**st, "APPENDLIMIT": self.appendlimit()}
        values = " ".join(f"{item} {int(st.get(item, 0))}" for item in items)
        return b"* STATUS " + response.mailbox(name, self.utf8_names) + b" (" + values.encode() + b")"

    async def special_use_refusal(self, uses: list[str]) -> str | None:
        """Why CREATE ... (USE (...)) cannot give these uses (the text of NO [USEATTR]), or None."""
        uses = [canonical_use(u) for u in uses]
        unknown = [u for u in uses if u not in KNOWN_USES]
        if unknown:
            return f"{unknown[0]} is not a special use"
        virtual = [u for u in uses if u not in CREATABLE_USES]
        if virtual:
            return f"{virtual[0]} mailboxes are virtual; this server has none"
        if len(set(uses)) > 1:
            return "one special use per mailbox"
        use = uses[0]
        for box in await self.services.store.list_mailboxes(self.account):
            if box.special_use == use and box.selectable:
                return f"{use} is already the special use of {box.name}"
        return None
