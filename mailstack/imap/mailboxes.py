"""IMAP commands on mailboxes as a whole (authenticated state): CREATE, DELETE, RENAME,
(UN)SUBSCRIBE, LIST, LSUB, STATUS, NAMESPACE, ENABLE (APPEND: appending.py)."""
from __future__ import annotations

import logging

from . import response
from .listing import canonical_use
from .parser import Command

log = logging.getLogger("mailstack.imap")
_SPELLING = {"IMAP4REV2": "IMAP4rev2"}  # ENABLED echoes a capability as it is registered

def check_mailbox_name(name: str) -> str | None:
    """Why a mailbox name is refused, or None.  Names must stay inside the user's Maildir."""
    if not name:
        return "empty mailbox name"
    if len(name) > 512:
        return "mailbox name too long"
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u2028\u2029" for ch in name):  # RFC 6855 3
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
        special_use = None
        if cmd.args.get("use"):  # CREATE-SPECIAL-USE (RFC 6154 section 3; listing.py)
            refusal = await self.special_use_refusal(cmd.args["use"])
            if refusal:
                return self.tagged(cmd, "NO", f"[USEATTR] {refusal}")
            special_use = canonical_use(cmd.args["use"][0])
            self.note_extension("CREATE-SPECIAL-USE")
        await self.services.store.create_mailbox(self.account, name, special_use)
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

    async def cmd_status(self, cmd: Command) -> None:
        name = cmd.args["mailbox"]
        if self._bad_name(cmd, name):
            return
        st = await self.services.store.status(self.account, name)
        if "HIGHESTMODSEQ" in cmd.args["items"]:
            self.enable_condstore("STATUS")  # RFC 7162 3.1: a CONDSTORE-enabling command
        self.send(self.status_response(name, cmd.args["items"], st))  # listing.py
        await self.done(cmd, "STATUS completed")

    async def cmd_namespace(self, cmd: Command) -> None:
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        await self.done(cmd, "NAMESPACE completed")

    async def cmd_enable(self, cmd: Command) -> None:
        from .session import ENABLEABLE
        # RFC 5161: unknown names are ignored; the answer lists only what this command
        # newly enabled.
        new = [c for c in dict.fromkeys(cmd.args["capabilities"]) if c in ENABLEABLE and c not in self.enabled]
        if self.mbox is not None:  # these change the wire format: before SELECT only (RFC 6855 3)
            new = [c for c in new if c not in ("UTF8=ACCEPT", "IMAP4REV2")]
        had_condstore = self.condstore
        self.enabled = self.enabled.union(new)  # a frozenset: rebound (states.EMPTY)
        for c in new:
            if c != "CONDSTORE":  # enable_condstore() below says how CONDSTORE came on
                log.info("IMAP enable %s", c, extra={"client": self.peer_ip})
        self.send(" ".join(["* ENABLED"] + [_SPELLING.get(c, c) for c in new]).encode())
        if not had_condstore and ("QRESYNC" in new or "CONDSTORE" in new):  # QRESYNC implies it (RFC 7162 3.2.3)
            self.enabled = self.enabled - {"CONDSTORE"}
            self.enable_condstore("ENABLE")
        await self.done(cmd, "ENABLE completed")
