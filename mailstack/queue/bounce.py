"""Delivery status notifications (RFC 3464): the bounce a sender gets when a message fails.

One DSN per message, listing every recipient that failed, built as bytes (CRLF line
ends) with the three parts of multipart/report: a note for a person, the
machine-readable message/delivery-status, and the original headers.
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from email.utils import formatdate

_STATUS_RE = re.compile(r"^\s*([245])\d\d[ -]+([245]\.\d{1,3}\.\d{1,3})\b")
_CODE_RE = re.compile(r"^\s*([245])\d\d\b")
_HOST_RE = re.compile(r"^([^\[\]:\s]+)")


@dataclass
class Failure:
    """One recipient for the report."""

    recipient: str  # the address that failed (after alias expansion)
    orig: str  # the envelope recipient
    reply: str  # remote reply or our reason
    relay: str = "none"  # "local" | "mx.example.com[192.0.2.1]:25" | "none"
    action: str = "failed"
    status: str = ""  # enhanced status code; derived from reply when empty
    last_try: float = 0.0


def status_code(reply: str, default: str = "5.0.0") -> str:
    m = _STATUS_RE.match(reply)
    if m and m.group(1) == m.group(2)[0]:
        return m.group(2)
    m = _CODE_RE.match(reply)
    if m:
        return f"{m.group(1)}.0.0"
    return default


def _addr_type(addr: str) -> str:
    # RFC 6533: non-ASCII addresses are of type utf-8.
    return f"rfc822; {addr}" if addr.isascii() else f"utf-8; {addr}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fold(name: str, value: str) -> str:
    """Fold a long header value at spaces (RFC 5322 2.2.3) so that lines stay under ~78 chars."""
    words = value.split(" ")
    lines, cur = [], f"{name}: "
    for w in words:
        if len(cur) + len(w) > 76 and cur.strip() and not cur.endswith(": "):
            lines.append(cur.rstrip())
            cur = " "
        cur += w + " "
    lines.append(cur.rstrip())
    return "\r\n".join(lines)


def build_dsn(*, hostname: str, qid: str, sender: str, rcpt_to: str, arrival: float,
              failures: list[Failure], original_headers: bytes, postmaster_copy: bool = False,
              now: float | None = None) -> bytes:
    """Return the DSN message (bytes). rcpt_to: who it is addressed to (the original sender,
    or postmaster for a double bounce)."""
    now = time.time() if now is None else now
    boundary = f"{qid}.{secrets.token_hex(8)}/{hostname}"
    subject = "Postmaster Copy: Undelivered Mail" if postmaster_copy else "Undelivered Mail Returned to Sender"
    headers = [
        "From: Mail Delivery System <MAILER-DAEMON@" + hostname + ">",
        "To: " + (f"<{rcpt_to}>" if rcpt_to else "postmaster"),
        "Subject: " + subject,
        "Date: " + formatdate(now, localtime=True),
        f"Message-ID: <{qid}.{secrets.token_hex(6)}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit" if not all(f.recipient.isascii() for f in failures) else
        "Content-Transfer-Encoding: 7bit",
    ]
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    if postmaster_copy:
        human[2:4] = ["A delivery status notification (a bounce) could not be delivered",
                      f"to its recipient <{sender}>. The report follows."]
    for f in failures:
        shown = f.recipient if f.orig in ("", f.recipient) else f"{f.recipient} (expanded from <{f.orig}>)"
        human.append(f"<{shown}>: {_one_line(f.reply)}")
    human.append("")

    status = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Mailstack-Queue-ID: {qid}",
        f"X-Mailstack-Sender: {_addr_type(sender) if sender else 'rfc822;'}",
        f"Arrival-Date: {formatdate(arrival, localtime=True)}",
    ]
    for f in failures:
        status.append("")
        status.append(f"Final-Recipient: {_addr_type(f.recipient)}")
        if f.orig and f.orig.lower() != f.recipient.lower():
            status.append(f"Original-Recipient: {_addr_type(f.orig)}")
        status.append(f"Action: {f.action}")
        status.append(f"Status: {f.status or status_code(f.reply)}")
        relay = _HOST_RE.match(f.relay) if f.relay not in ("local", "none", "") else None
        if relay:
            status.append(f"Remote-MTA: dns; {relay.group(1)}")
        kind = "smtp" if _CODE_RE.match(f.reply) else "x-mailstack"
        status.append(_fold("Diagnostic-Code", f"{kind}; {_one_line(f.reply)}"))
        if f.last_try:
            status.append(f"Last-Attempt-Date: {formatdate(f.last_try, localtime=True)}")
    status.append("")

    original = original_headers.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    crlf = "\r\n"
    parts = [
        crlf.join(headers).encode("utf-8"), b"\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        .encode("ascii"),
        crlf.join(human).encode("utf-8"), b"\r\n",
        f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        .encode("ascii"),
        crlf.join(status).encode("utf-8"), b"\r\n",
        f"--{boundary}\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n\r\n".encode("ascii"),
        original,
        f"\r\n--{boundary}--\r\n".encode("ascii"),
    ]
    return b"".join(parts)
