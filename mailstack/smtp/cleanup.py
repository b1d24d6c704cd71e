"""Header fix-ups on the way into the queue: Received:, and Message-ID:/Date: for submissions.

Pure functions.  The message itself is never re-parsed or copied: the new header
lines are separate chunks written in front of the message, and only the header
block (up to the first empty line, at most HEADER_SCAN bytes) is looked at.
"""
from __future__ import annotations

import email.utils
import re
import secrets
import time

HEADER_SCAN = 256 * 1024  # a header block larger than this is not searched further
_FIELD = re.compile(rb"^(message-id|date)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def protocol_name(esmtp: bool, tls: bool, auth: bool) -> str:
    """RFC 3848 "with" keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")


def _clean(text: str) -> str:
    """Client-supplied text in a header comment: printable ASCII, no parentheses or backslashes."""
    return "".join(c if " " <= c < "\x7f" and c not in "()\\" else "?" for c in text)[:255] or "unknown"


def received_header(*, helo: str, rdns: str | None, ip: str, hostname: str, protocol: str, qid: str | None,
                    tls: str | None = None, when: float | None = None) -> bytes:
    """The Received: trace field (RFC 5321 4.4), folded, CRLF-terminated.

    tls: e.g. "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" (as Postfix writes it)."""
    helo = _clean(helo)
    rdns = _clean(rdns) if rdns else "unknown"
    lines = [f"Received: from {helo} ({rdns} [{ip}])"]
    if tls:
        lines.append(f"\t(using {tls})")
    by = f"\tby {hostname} (mailstack) with {protocol}"
    if qid:
        by += f" id {qid}"
    lines.append(by + ";")
    lines.append("\t" + _date(when))
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


_last_date: tuple[int, str] = (-1, "")


def _date(when: float | None) -> str:
    """RFC 5322 date-time in local time, formatted once per second (formatdate costs ~25 us,
    once per message)."""
    global _last_date
    second = int(time.time() if when is None else when)
    if _last_date[0] != second:
        _last_date = (second, email.utils.formatdate(second, localtime=True))
    return _last_date[1]


def header_block(chunks: list) -> bytes:
    """The header block of a message held as chunks: up to and including the CRLF that
    ends the last header line (so an empty-first-line message gives b"").  Copies at most
    HEADER_SCAN bytes, and only the chunks it needs."""
    parts: list[bytes] = []
    total = 0
    tail = b"\r\n"
    for chunk in chunks:
        parts.append(chunk)
        total += len(chunk)
        if b"\r\n\r\n" in tail + chunk[:3] or b"\r\n\r\n" in chunk or total >= HEADER_SCAN:
            break
        tail = (tail + chunk[-3:])[-3:]
    head = b"\r\n" + b"".join(parts)[:HEADER_SCAN]
    end = head.find(b"\r\n\r\n")
    return head[2:end + 2] if end >= 0 else head[2:]


# A Return-Path field with its folded continuation lines, in any case (RFC 5322 3.6.7).
_RETURN_PATH = re.compile(rb"^return-path[ \t]*:.*\r\n(?:[ \t].*\r\n)*", re.I | re.M)


def without_return_path(chunks: list, head: bytes) -> list:
    """The message without the Return-Path fields it arrived with.  Only final delivery
    may write one (RFC 5321 4.4); one that came with the message is a sender's claim a
    reader would take for the envelope, so it goes, as Postfix's cleanup drops it
    (message_drop_headers).  head is header_block(chunks): the usual message, which has
    none, costs one search of its header block and no copy."""
    low = head.lower()  # a copy of the header block, but 5 x cheaper than the regex's scan
    if not (low.startswith(b"return-path") or b"\nreturn-path" in low) or not _RETURN_PATH.search(head):
        return chunks
    whole = b"".join(chunks)
    return [_RETURN_PATH.sub(b"", head), whole[len(head):]]


def missing_fields(headers: bytes) -> tuple[bool, bool]:
    """(message_id_missing, date_missing) for a header block."""
    found = {m.group(1).lower() for m in _FIELD.finditer(headers)}
    return b"message-id" not in found, b"date" not in found


def submission_fields(headers: bytes, hostname: str, when: float | None = None) -> bytes:
    """The Message-ID:/Date: lines a submitted message lacks (RFC 6409 8.2, 8.3), or b""."""
    need_id, need_date = missing_fields(headers)
    out = b""
    if need_id:
        token = f"{time.time_ns():x}.{secrets.token_hex(8)}"
        out += f"Message-ID: <{token}@{hostname}>\r\n".encode("ascii", "replace")
    if need_date:
        out += f"Date: {_date(when)}\r\n".encode()
    return out
