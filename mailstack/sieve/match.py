"""Comparators (RFC 4790 as used by RFC 5228 2.7.3) and match types (:is, :contains,
:matches, relational :value / :count of RFC 5231).  Pure functions."""
from __future__ import annotations

import functools
import re

_REL = {"gt": lambda c: c > 0, "ge": lambda c: c >= 0, "lt": lambda c: c < 0, "le": lambda c: c <= 0,
        "eq": lambda c: c == 0, "ne": lambda c: c != 0}


def _casemap(s: str) -> str:
    # i;ascii-casemap folds only a-z (Python's lower() would fold non-ASCII letters too)
    return s.translate(_ASCII_LOWER) if not s.isascii() else s.lower()


_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}


def _numeric(s: str) -> float:
    """i;ascii-numeric: the leading digits as a number; no leading digit = positive infinity."""
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        i += 1
    return int(s[:i]) if i else float("inf")


def compare(a: str, b: str, comparator: str) -> int:
    if comparator == "i;ascii-numeric":
        x, y = _numeric(a), _numeric(b)
    elif comparator == "i;ascii-casemap":
        x, y = _casemap(a), _casemap(b)
    else:
        x, y = a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    return (x > y) - (x < y)


@functools.lru_cache(maxsize=1024)
def _glob_plan(pattern: str, casefold: bool) -> tuple:
    """A :matches key -> its segments between the "*"s.  Each segment is (text, regex or None):
    its characters ("?" as a placeholder) and, when it holds a "?", a regex that finds it."""
    segments, cur, i = [], [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            segments.append(cur)
            cur = []
        elif c == "?":
            cur.append(None)
        else:
            if c == "\\" and i + 1 < len(pattern):
                i += 1
                c = pattern[i]
            cur.append(_casemap(c) if casefold else c)
        i += 1
    segments.append(cur)
    plan = []
    for seg in segments:
        literal = "".join("?" if t is None else t for t in seg)
        rx = None
        if any(t is None for t in seg):
            rx = re.compile("".join("." if t is None else re.escape(t) for t in seg), re.DOTALL)
        plan.append((seg, literal, rx))
    return tuple(plan)


def _at(seg: list, text: str, pos: int) -> bool:
    """Does segment `seg` match text at pos?"""
    if pos < 0 or pos + len(seg) > len(text):
        return False
    return all(t is None or t == text[pos + k] for k, t in enumerate(seg))


def _find(entry: tuple, text: str, pos: int) -> int:
    seg, literal, rx = entry
    if rx is None:
        return text.find(literal, pos)
    m = rx.search(text, pos)
    return -1 if m is None else m.start()


def glob_match(pattern: str, text: str, casefold: bool) -> list[str] | None:
    """:matches in linear-ish time (no backtracking blow-up, whatever the key).

    Each "*" matches as little as possible, leftmost first (RFC 5229 3.2: "[*] *" on
    "[acme] [fwd] x" gives "acme" and "[fwd] x"): the first segment is anchored at the start,
    the last at the end, and each one between is found at its leftmost place.
    Returns [text, captures of each "*" and "?" in order] or None."""
    plan = _glob_plan(pattern, casefold)
    hay = _casemap(text) if casefold else text
    n = len(hay)
    first, last = plan[0], plan[-1]
    if len(plan) == 1:  # no "*": the whole value
        if len(first[0]) != n or not _at(first[0], hay, 0):
            return None
        return [text] + [text[k] for k, t in enumerate(first[0]) if t is None]
    if not _at(first[0], hay, 0):
        return None
    caps = [text[k] for k, t in enumerate(first[0]) if t is None]
    pos = len(first[0])
    tail_start = n - len(last[0])
    if tail_start < pos:
        return None
    for entry in plan[1:-1]:
        found = _find(entry, hay, pos)
        if found < 0 or found + len(entry[0]) > tail_start:
            return None
        caps.append(text[pos:found])
        caps.extend(text[found + k] for k, t in enumerate(entry[0]) if t is None)
        pos = found + len(entry[0])
    if not _at(last[0], hay, tail_start):
        return None
    caps.append(text[pos:tail_start])
    caps.extend(text[tail_start + k] for k, t in enumerate(last[0]) if t is None)
    return [text, *caps]


def match_one(value: str, key: str, mtype: str, comparator: str, relation: str | None = None):
    """One value against one key.  Returns False, True, or (for :matches) the list of wildcard
    captures (a true value) for the variables extension."""
    if mtype == "is":
        if comparator == "i;ascii-numeric":
            return _numeric(value) == _numeric(key)
        if comparator == "i;ascii-casemap":
            return _casemap(value) == _casemap(key)
        return value == key
    if mtype == "contains":
        if comparator == "i;ascii-casemap":
            return _casemap(key) in _casemap(value)
        return key in value
    if mtype == "matches":
        caps = glob_match(key, value, comparator == "i;ascii-casemap")
        return False if caps is None else caps
    if mtype == "value":
        return _REL[relation](compare(value, key, comparator))
    raise ValueError(mtype)


def match_spec(tagv: dict) -> tuple[str, str, str | None]:
    """(match type, comparator, relation) of a test's tags; "count" is a match type here."""
    comparator = tagv.get("comparator", "i;ascii-casemap")
    if "count" in tagv:
        return "count", comparator, tagv["count"]
    if "value" in tagv:
        return "value", comparator, tagv["value"]
    return ("matches" if "matches" in tagv else "contains" if "contains" in tagv else "is"), comparator, None


def match_values(values: list[str], keys: list[str], tagv: dict, captures: list | None = None) -> bool:
    """Any value against any key, with the match type and comparator of a test's tags.
    On a :matches hit, the captures are put into `captures` (cleared first)."""
    spec = tagv.get("_spec")  # precomputed by the checker
    mtype, comparator, rel = spec if spec is not None else match_spec(tagv)
    if mtype == "count":
        n = str(len(values))
        return any(_REL[rel](compare(n, k, comparator)) for k in keys)
    if mtype == "contains" and comparator == "i;ascii-casemap":  # the common case, kept short
        lkeys = [_casemap(k) for k in keys]
        for v in values:
            lv = _casemap(v)
            for k in lkeys:
                if k in lv:
                    return True
        return False
    for v in values:
        for k in keys:
            r = match_one(v, k, mtype, comparator, rel)
            if r:
                if captures is not None and isinstance(r, list):
                    captures[:] = r
                return True
    return False


def quote_wildcards(s: str) -> str:
    return s.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
