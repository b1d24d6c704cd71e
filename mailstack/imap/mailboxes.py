"""IMAP commands on mailboxes as a whole (authenticated state): CREATE, DELETE, RENAME,
(UN)SUBSCRIBE, LIST, LSUB, STATUS, APPEND, NAMESPACE, ENABLE."""
from __future__ import annotations

import logging
import re

from ..store.base import MailboxNotFound
from . import response
from .parser import Command

log = logging.getLogger("mailstack.imap")

def check_mailbox_name(name: str) -> str | None:
    """Why a mailbox name is refused, or None.  Names must stay inside the user's Maildir."""
    if not name:
        return "empty mailbox name"
    if len(name) > 512:
        return "mailbox name too long"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "mailbox name contains a control character"
    if name.startswith("/") or name.startswith("~"):
        return "mailbox name must not be an absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "mailbox name has an empty, '.' or '..' component"
    if any(p.startswith(".") for p in parts):
        return "mailbox name components must not start with '.'"
    if "\\" in name or "*" in name or "%" in name:
        return "mailbox name contains a reserved character"
    if len(parts) > 32:
        return "mailbox hierarchy too deep"
    return None


def list_pattern(pattern: str) -> re.Pattern:
    """LIST wildcards: * matches anything, % anything but the hierarchy separator."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch))
    rx = "".join(out)
    if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] in "/*%"):
        rx = "INBOX" + "".join(out[5:])
    return re.compile(rx + r"\Z", re.S)


class MailboxCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    def _bad_name(self, cmd: Command, name: str) -> bool:
        reason = check_mailbox_name(name)
        if reason:
            self.tagged(cmd, "NO", f"[CANNOT] {reason}")
            return True
        return False

    async def cmd_create(self, cmd: Command) -> None:
        name = cmd.args["mailbox"].rstrip("/") or cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        if name.upper() == "INBOX":
            return self.tagged(cmd, "NO", "[ALREADYEXISTS] INBOX exists always")
        await self.services.store.create_mailbox(self.account, name)
        await self.done(cmd, "CREATE completed")

    async def cmd_delete(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        if name == "INBOX":
            return self.tagged(cmd, "NO", "[CANNOT] INBOX cannot be deleted")
        if self.mbox is not None and self.mbox.name == name:
            await self.unselect()
        await self.services.store.delete_mailbox(self.account, name)
        await self.done(cmd, "DELETE completed")

    async def cmd_rename(self, cmd: Command) -> None:
        old, new = cmd.args["old"], cmd.args["new"]
        if self._bad_name(cmd, old) or self._bad_name(cmd, new):
            return
        if new.upper() == "INBOX":
            return self.tagged(cmd, "NO", "[ALREADYEXISTS] INBOX exists always")
        await self.services.store.rename_mailbox(self.account, old, new)
        await self.done(cmd, "RENAME completed")

    async def cmd_subscribe(self, cmd: Command, subscribed: bool = True) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        await self.services.store.subscribe(self.account, name, subscribed)
        await self.done(cmd, f"{cmd.name} completed")

    async def cmd_unsubscribe(self, cmd: Command) -> None:
        await self.cmd_subscribe(cmd, subscribed=False)

    async def cmd_list(self, cmd: Command, lsub: bool = False) -> None:
        ref, pattern = cmd.args["reference"], cmd.args["pattern"]
        word = b"* LSUB" if lsub else b"* LIST"
        if ref is None or pattern is None:  # not valid modified UTF-7: no mailbox has that name
            return await self.done(cmd, f"{cmd.name} completed")
        if pattern == "":
            self.send(word + b' (\\Noselect) "/" ""')
            return await self.done(cmd, f"{cmd.name} completed")
        full = ref + pattern if not ref.endswith("/") or not pattern.startswith("/") else ref + pattern[1:]
        rx = list_pattern(full)
        boxes = await self.services.store.list_mailboxes(self.account)
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
        for n in order:
            self.send(word + b" (" + " ".join(lines[n]).encode() + b') "/" ' + response.mailbox(n))
        await self.done(cmd, f"{cmd.name} completed")

    async def cmd_lsub(self, cmd: Command) -> None:
        await self.cmd_list(cmd, lsub=True)

    async def cmd_status(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        st = await self.services.store.status(self.account, name)
        if "HIGHESTMODSEQ" in cmd.args["items"]:
            self.enable_condstore("STATUS")  # RFC 7162 3.1: a CONDSTORE-enabling command
        items = []
        for item in cmd.args["items"]:
            items.append(f"{item} {int(st.get(item, 0))}")
        self.send(b"* STATUS " + response.mailbox(name) + b" (" + " ".join(items).encode() + b")")
        await self.done(cmd, "STATUS completed")

    async def cmd_append(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        message = cmd.args["message"]
        if not message:
            return self.tagged(cmd, "NO", "Cannot append an empty message")
        try:
            uidvalidity, uid = await self.services.store.append(
                self.account, name, message, cmd.args["flags"], cmd.args["date"], origin=self)
        except MailboxNotFound:
            return self.tagged(cmd, "NO", "[TRYCREATE] Mailbox does not exist")
        if self.mbox is not None and self.mbox.name == name:
            self.dirty = True
        await self.done(cmd, f"[APPENDUID {uidvalidity} {uid}] APPEND completed")

    async def cmd_namespace(self, cmd: Command) -> None:
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        await self.done(cmd, "NAMESPACE completed")

    async def cmd_enable(self, cmd: Command) -> None:
        from .session import ENABLEABLE
        # RFC 5161: unknown names are ignored; the answer lists only what this command
        # newly enabled.
        new = [c for c in dict.fromkeys(cmd.args["capabilities"]) if c in ENABLEABLE and c not in self.enabled]
        had_condstore = self.condstore
        self.enabled.update(new)
        self.send(" ".join(["* ENABLED"] + new).encode())
        if "QRESYNC" in new:
            log.info("IMAP enable QRESYNC", extra={"client": self.peer_ip})
        if not had_condstore and ("QRESYNC" in new or "CONDSTORE" in new):  # QRESYNC implies it (RFC 7162 3.2.3)
            self.enabled.discard("CONDSTORE")
            self.enable_condstore("ENABLE")
        await self.done(cmd, "ENABLE completed")
