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


@functools.lru_cache(maxsize=512)
def _glob(pattern: str, casefold: bool) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("(.*?)")
        elif c == "?":
            out.append("(.)")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    flags = re.DOTALL | ((re.IGNORECASE | re.ASCII) if casefold else 0)
    return re.compile("".join(out), flags)


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
        m = _glob(key, comparator == "i;ascii-casemap").fullmatch(value)
        if m is None:
            return False
        return [value, *m.groups()]
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
