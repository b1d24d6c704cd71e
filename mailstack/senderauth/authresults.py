"""Authentication-Results (RFC 8601): write ours, remove forged ones.

Pure text functions.  A message may arrive with Authentication-Results fields already in
it; those carrying our authserv-id (server.hostname) are removed before ours is added, so a
forger cannot pre-fill a "pass" (RFC 8601 5).  Fields of other ADMDs are left alone.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")  # RFC 2045 token: no tspecials
_NOT_IN_COMMENT = re.compile(r"[()\\\r\n]")


def pvalue(value: str) -> str:
    """A property value: as it is when it is a token or an address, else quoted."""
    if _TOKEN.match(value):
        return value
    local, at, domain = value.rpartition("@")
    if at and _TOKEN.match(domain) and (not local or _TOKEN.match(local)):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    text = _NOT_IN_COMMENT.sub(" ", text)[:200].strip()
    return f" ({text})" if text else ""


def method(name: str, result: str, reason: str = "", **props: str) -> str:
    """'dkim=pass (reason) header.d=example.com header.s=sel'; props written as ptype.property."""
    out = f"{name}={result}{comment(reason)}"
    for key, value in props.items():
        if value:
            out += f" {key.replace('_', '.', 1)}={pvalue(value)}"
    return out


def header_value(authserv_id: str, methods: list[str]) -> str:
    """The field value, one method per folded line; 'none' when nothing was checked."""
    if not methods:
        return f"{authserv_id}; none"
    return authserv_id + ";" + ";".join(f"\r\n\t{m}" for m in methods)


def authserv_id(value: str) -> str | None:
    """The authserv-id an Authentication-Results value starts with (comments skipped)."""
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c.isspace():
            i += 1
        elif c == "(":  # a comment, possibly nested
            depth = 0
            while i < n:
                if value[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(value[i], 0)
                i += 1
                if depth == 0:
                    break
        elif c == '"':
            end = value.find('"', i + 1)
            return value[i + 1:end if end > 0 else n].strip() or None
        else:
            m = re.match(r"[^\s;()]+", value[i:])
            return m.group(0) if m else None
    return None


def strip_ours(message: bytes, our_id: str) -> bytes | None:
    """`message` without Authentication-Results fields carrying `our_id`; None if it had none."""
    end = message.find(b"\r\n\r\n")
    head_end = len(message) if end < 0 else end + 2
    head = message[:head_end]
    if b"authentication-results" not in head.lower():
        return None
    lines = head.split(b"\r\n")
    keep: list[bytes] = []
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    removed = False
    want = our_id.lower().rstrip(".")
    for field in fields:
        name, colon, value = field[0].partition(b":")
        if colon and name.strip().lower() == b"authentication-results":
            text = b" ".join([value] + field[1:]).decode("utf-8", "replace")
            found = authserv_id(text)
            if found is not None and found.lower().rstrip(".") == want:
                removed = True
                continue
        keep.extend(field)
    if not removed:
        return None
    return b"\r\n".join(keep) + message[head_end:]
