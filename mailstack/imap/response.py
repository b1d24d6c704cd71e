"""Serialising IMAP response data (RFC 3501 section 4): atoms, quoted strings, literals, NIL.

Everything returns bytes; the session joins them into large writes.
"""
from __future__ import annotations

import datetime
import re
import time

from . import mutf7

_QUOTED_SAFE = frozenset(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
# atom-specials (RFC 3501 9): ( ) { SP CTL % * " \ ]
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x21)) | {0x7F}


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


_PLAIN = re.compile(rb'[\x20\x21\x23-\x5b\x5d-\x7e]*')


def string(data: bytes | str) -> bytes:
    """A quoted string when that can carry the bytes, else a literal."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) < 1024 and _PLAIN.fullmatch(data):
        return b'"' + data + b'"'
    if b"\r" not in data and b"\n" not in data and b"\0" not in data and len(data) < 1024 \
            and all(b >= 0x20 for b in data):
        # Quoted with escapes is fine for \ and " (but not for 8-bit: clients choke on it).
        if all(b < 0x80 for b in data):
            return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal(data)


def nstring(data: bytes | str | None) -> bytes:
    return b"NIL" if data is None else string(data)


def astring(data: bytes | str) -> bytes:
    """An atom when that is unambiguous, else a string."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data and data.upper() != b"NIL" and not any(b in _ATOM_SPECIALS or b > 0x7E for b in data):
        return data
    return string(data)


def mailbox(name: str, utf8: bool = False) -> bytes:
    """A mailbox name on the wire: modified UTF-7, as an astring; with `utf8` (the client
    enabled UTF8=ACCEPT or IMAP4rev2) the name itself in a UTF-8 quoted string."""
    if not utf8:
        return astring(mutf7.encode(name).encode("ascii"))
    data = name.encode("utf-8")
    if data.isascii() or len(data) >= 1024 or any(b < 0x20 or b == 0x7F for b in data):
        return astring(data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def flag_list(flags) -> bytes:
    return b"(" + " ".join(flags).encode("ascii", "replace") + b")"


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internaldate(ts: float) -> bytes:
    """date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" in the server's local zone (as Dovecot does).
    A listing renders thousands in a row (a fifth of its loop time went to localtime and
    the formatting): the zone's offset is looked up once per UTC day (and only trusted
    when it is the same at both ends of that day: zones change it at most twice a year),
    the date part once per local day; tested equal to _internaldate in several zones."""
    whole = int(ts // 1)  # time.localtime rounds down
    utc_day = whole // 86400
    off = _day_offsets.get(utc_day, _UNKNOWN)
    if off is _UNKNOWN:
        off = _day_offset(utc_day)
    if off is None:  # the offset changes that day, or out of range
        return _internaldate(ts)
    day, second = divmod(whole + off, 86400)
    key = (day, off)
    prefix = _day_prefixes.get(key)
    if prefix is None:
        d = datetime.date.fromordinal(day + _EPOCH_ORDINAL)
        zone = abs(off) // 60
        prefix = _day_prefixes[key] = (b'"%2d-%s-%04d ' % (d.day, _MONTHS_B[d.month - 1], d.year),
                                       b' %s%02d%02d"' % (b"+" if off >= 0 else b"-", zone // 60, zone % 60))
    minute, second = divmod(second, 60)
    # concatenated from tables: bytes %-formatting of five values cost 5x as much
    return prefix[0] + _CLOCK_MINUTES[minute] + _CLOCK_SECONDS[second] + prefix[1]


def _day_offset(utc_day: int) -> "int | None":
    if len(_day_offsets) >= _MEMO_MAX:
        _day_offsets.clear()
        _day_prefixes.clear()
    try:
        first = time.localtime(utc_day * 86400).tm_gmtoff
        last = time.localtime(utc_day * 86400 + 86399).tm_gmtoff
    except (OverflowError, OSError, ValueError):  # out of the platform's range: as before
        first, last = 0, 1
    off = _day_offsets[utc_day] = (first or 0) if first == last else None
    return off


_UNKNOWN = object()
_MEMO_MAX = 20000  # days remembered (and their local dates); cleared when full
_day_offsets: dict[int, "int | None"] = {}
_day_prefixes: dict[tuple[int, int], tuple[bytes, bytes]] = {}
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_MONTHS_B = tuple(m.encode("ascii") for m in _MONTHS)
_CLOCK_MINUTES = tuple(b"%02d:%02d:" % divmod(m, 60) for m in range(1440))  # minute of the day -> b"hh:mm:"
_CLOCK_SECONDS = tuple(b"%02d" % s for s in range(60))


def _internaldate(ts: float) -> bytes:
    """internaldate by time.localtime for each call (what the memo must give)."""
    tm = time.localtime(ts)
    off = tm.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return ('"%2d-%s-%04d %02d:%02d:%02d %s%02d%02d"' % (
        tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec,
        sign, off // 60, off % 60)).encode("ascii")


def sequence_set(numbers) -> bytes:
    """Compact sorted numbers into "1:3,7,9:10" (for COPYUID and friends)."""
    return ordered_set(sorted(numbers))


def ordered_set(numbers) -> bytes:
    """Numbers in the given order (COPYUID's source and destination sets must correspond)."""
    out: list[str] = []
    nums = list(numbers)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out).encode("ascii")
