"""Fast path for the envelope addresses of MAIL FROM / RCPT TO.  No I/O.

Nearly every real address is `<dot-atom@domain>`; one regular expression takes those
(the general parser, email's header parser via aiosmtpd, costs ~100 us per address).
Anything else (quoted local parts, source routes, comments, non-ASCII) returns None
and goes to the general parser.
"""
from __future__ import annotations

import re

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>(?:[ \t]+(.*))?\Z", re.ASCII | re.DOTALL)


def simple_path(text: str) -> tuple[str, str] | None:
    """"<user@example.com> SIZE=10" -> ("user@example.com", "SIZE=10"); None if not that simple."""
    m = _SIMPLE.match(text)
    if m is None:
        return None
    return m.group(1), m.group(2) or ""
