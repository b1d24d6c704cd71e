"""Vacation replies (RFC 5230) under the rules of RFC 3834: whether to answer, and the answer.

Pure: the delivery side checks and updates the per-user memory (sieve/scripts.Memory) and
queues the reply with the null envelope sender.
"""
from __future__ import annotations

import email.utils
import hashlib
import time
from email.header import Header

from .message import SieveMessage

# Senders that are programs, not people (RFC 3834 3.2, and what Pigeonhole also skips).
_SYSTEM_LOCALPARTS = ("mailer-daemon", "postmaster", "listserv", "majordomo", "mailman", "noreply",
                      "no-reply", "do-not-reply", "donotreply")
_LIST_HEADERS = ("list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
                 "list-archive")
_RECIPIENT_HEADERS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")


def why_not_reply(msg: SieveMessage, sender: str, my_addresses: list[str]) -> str | None:
    """None when a vacation reply may be sent to `sender`; else the reason not to."""
    if not sender:
        return "null sender"
    local = sender.rpartition("@")[0].lower()
    if local in _SYSTEM_LOCALPARTS or local.startswith("owner-") or local.endswith("-request"):
        return "sender is a mailing list or system address"
    mine = {a.lower() for a in my_addresses if a}
    if sender.lower() in mine:
        return "sender is the user"
    for value in msg.headers("Auto-Submitted"):
        if value.split(";")[0].strip().lower() != "no":
            return "message is auto-submitted"
    for value in msg.headers("Precedence"):
        if value.strip().lower() in ("bulk", "list", "junk"):
            return f"Precedence: {value.strip().lower()}"
    for name in _LIST_HEADERS:
        if msg.exists(name):
            return f"mailing list message ({name})"
    if any(v.strip().lower() in ("all", "oof", "autoreply") for v in msg.headers("X-Auto-Response-Suppress")):
        return "sender asked for no automatic replies"
    addressed = {a.lower() for h in _RECIPIENT_HEADERS for a in msg.addresses(h)}
    if not (addressed & mine):
        return "user's address is not in To/Cc/Bcc"
    return None


def memory_key(sender: str, handle: str) -> str:
    return hashlib.sha256(f"{handle}\x00{sender.lower()}".encode("utf-8", "surrogatepass")).hexdigest()


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


def build_reply(msg: SieveMessage, params: dict, sender: str, from_addr: str, hostname: str,
                now: float | None = None) -> bytes:
    """The reply message (CRLF lines)."""
    now = time.time() if now is None else now
    subject = params.get("subject")
    if subject is None:
        orig = (msg.headers("Subject") or [""])[0]
        subject = f"Auto: {orig}" if orig else "Automated reply"
    subject = " ".join(subject.split())
    from_value = " ".join((params.get("from") or from_addr).split())  # one line: no header injection
    lines = [
        f"From: {_header(from_value)}",
        f"To: <{sender}>",
        f"Subject: {_header(subject)}",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: {email.utils.make_msgid(domain=hostname or None)}",
        "Auto-Submitted: auto-replied (vacation)",
        "Precedence: bulk",
    ]
    msgid = (msg.headers("Message-ID") or [""])[0].strip()
    if msgid:
        lines.append(f"In-Reply-To: {msgid}")
        refs = " ".join((msg.headers("References") or [""])[0].split())
        lines.append(f"References: {(refs + ' ' + msgid).strip()}")
    lines.append("MIME-Version: 1.0")
    reason = params.get("reason", "")
    if params.get("mime"):
        # :mime: the reason is a whole MIME entity (its own Content-Type and body)
        entity = reason.replace("\r\n", "\n").replace("\n", "\r\n").lstrip("\r\n")
        return ("\r\n".join(lines) + "\r\n" + entity).encode("utf-8")
    lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    body = reason.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")
