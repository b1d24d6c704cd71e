"""date / currentdate (RFC 5260): date parts of a header's date or of now."""
from __future__ import annotations

import datetime as dt
import email.utils
import re

_ZONE = re.compile(r"^([+-])(\d\d)(\d\d)$")


def parse_zone(zone: str) -> dt.timezone | None:
    m = _ZONE.match(zone.strip())
    if not m:
        return None
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    if minutes >= 24 * 60:
        return None
    return dt.timezone(dt.timedelta(minutes=minutes if m.group(1) == "+" else -minutes))


def header_date(value: str) -> dt.datetime | None:
    """An RFC 5322 date (as in Date: or the last part of Received:) -> aware datetime."""
    if ";" in value:
        value = value.rsplit(";", 1)[1]
    try:
        d = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d


def _zone_text(d: dt.datetime) -> str:
    off = d.utcoffset() or dt.timedelta(0)
    total = int(off.total_seconds() // 60)
    sign = "-" if total < 0 else "+"
    total = abs(total)
    return f"{sign}{total // 60:02d}{total % 60:02d}"


def date_part(d: dt.datetime, part: str) -> str | None:
    part = part.lower()
    if part == "year":
        return f"{d.year:04d}"
    if part == "month":
        return f"{d.month:02d}"
    if part == "day":
        return f"{d.day:02d}"
    if part == "date":
        return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"
    if part == "julian":
        # Modified Julian Day: days since 1858-11-17
        return str((d.date() - dt.date(1858, 11, 17)).days)
    if part == "hour":
        return f"{d.hour:02d}"
    if part == "minute":
        return f"{d.minute:02d}"
    if part == "second":
        return f"{d.second:02d}"
    if part == "time":
        return f"{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
    if part == "iso8601":  # RFC 3339 date-time; UTC as "Z" (as Pigeonhole writes it)
        z = _zone_text(d)
        return d.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if z == "+0000" else f"{z[:3]}:{z[3:]}")
    if part == "std11":
        return email.utils.format_datetime(d)
    if part == "zone":
        return _zone_text(d)
    if part == "weekday":
        return str((d.weekday() + 1) % 7)  # 0 = Sunday
    return None
