"""The per-mailbox UID list (like dovecot-uidlist): which base name has which UID.

Format (UTF-8 text):

    3 V<uidvalidity> N<nextuid>
    <uid> [S<size>] [T<internaldate>] :<base>
    ...

S and T are written only for files whose names do not carry them (files dropped in by
other programs), so opening a big mailbox needs no stat() per message.

Growth is append-only (new lines, fsynced) and a rewrite (expunge) replaces the whole file
atomically; the header's N is therefore only a floor, the next UID being the larger of N and
the highest UID listed plus one.  A last line without its newline is the trace of a crash
during an append: it is ignored, and the next writer rewrites the file instead of appending
to it.  Parsing is a pure function over bytes (tested without disk).
"""
from __future__ import annotations

from dataclasses import dataclass, field

NAME = "mailstack-uidlist"


@dataclass
class UidList:
    uidvalidity: int
    nextuid: int
    uids: dict[str, int] = field(default_factory=dict)  # base -> uid
    extra: dict[str, tuple[int | None, float | None]] = field(default_factory=dict)  # base -> (size, date)
    clean_end: bool = True  # True when appending to the file is safe

    def copy(self) -> "UidList":
        return UidList(self.uidvalidity, self.nextuid, dict(self.uids), dict(self.extra), self.clean_end)


def parse(data: bytes) -> UidList | None:
    """None when the header is unusable (the list counts as lost: new UIDVALIDITY)."""
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    clean_end = text.endswith("\n") or text == ""
    if not clean_end:
        lines = lines[:-1]  # torn by a crash mid-append
    elif lines and lines[-1] == "":
        lines = lines[:-1]
    if not lines:
        return None
    head = lines[0].split()
    if len(head) < 3 or head[0] != "3":
        return None
    fields = {h[0]: h[1:] for h in head[1:] if h}
    try:
        uidvalidity = int(fields["V"])
        nextuid = int(fields["N"])
    except (KeyError, ValueError):
        return None
    if uidvalidity <= 0 or nextuid <= 0:
        return None
    ul = UidList(uidvalidity, nextuid, clean_end=clean_end)
    uids = ul.uids
    top = 0
    for line in lines[1:]:
        meta, sep, base = line.partition(" :")
        if not sep or not base:
            continue
        if meta.isdigit():  # the common line: no S/T fields
            uid = int(meta)
            if uid > 0:
                uids[base] = uid
                top = uid if uid > top else top
            continue
        parts = meta.split()
        if not parts or not parts[0].isdigit():
            continue
        uid = int(parts[0])
        if uid <= 0:
            continue
        size = date = None
        for p in parts[1:]:
            try:
                if p.startswith("S"):
                    size = int(p[1:])
                elif p.startswith("T"):
                    date = float(p[1:])
            except ValueError:
                pass
        ul.uids[base] = uid
        if size is not None or date is not None:
            ul.extra[base] = (size, date)
        top = uid if uid > top else top
    if top >= ul.nextuid:
        ul.nextuid = top + 1
    return ul


def format_header(uidvalidity: int, nextuid: int) -> bytes:
    return f"3 V{uidvalidity} N{nextuid}\n".encode()


def format_line(uid: int, base: str, size: int | None = None, date: float | None = None) -> bytes:
    meta = str(uid)
    if size is not None:
        meta += f" S{size}"
    if date is not None:
        meta += f" T{int(date)}"
    return f"{meta} :{base}\n".encode("utf-8", "surrogateescape")


def format_all(ul: UidList) -> bytes:
    out = [format_header(ul.uidvalidity, ul.nextuid)]
    for base, uid in sorted(ul.uids.items(), key=lambda kv: kv[1]):
        size, date = ul.extra.get(base, (None, None))
        out.append(format_line(uid, base, size, date))
    return b"".join(out)
