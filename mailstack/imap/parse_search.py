"""The grammar of SEARCH with result options (RFC 4731 ESEARCH, RFC 5182 SAVE, RFC 5267
ESORT, RFC 9394 PARTIAL), SORT (RFC 5256, RFC 5957) and THREAD (RFC 5256); pure.

parser.py registers these in its command tables; each takes its cursor and parser.py's
search-program reader (charset and keys), so the search keys stay parser.py's.
"""
from __future__ import annotations

from .sort import SORT_KEYS
from .thread import ALGORITHMS

SEARCH_RETURN = ("MIN", "MAX", "ALL", "COUNT", "SAVE", "PARTIAL")
SORT_RETURN = ("MIN", "MAX", "ALL", "COUNT", "SAVE", "PARTIAL")
MAX_PARTIAL = 0xFFFFFFFF


def _return_options(c, allowed) -> tuple[list[str] | None, tuple[int, int] | None]:
    """[SP "RETURN" SP "(" [option *(SP option)] ")"]: (options, PARTIAL range), options
    None when there is no RETURN (the old untagged SEARCH/SORT answer)."""
    start = c.pos
    if c.peek() != 0x20:
        return None, None
    c.pos += 1
    word = c.line[c.pos:c.pos + 7].upper()
    if word != b"RETURN ":
        c.pos = start
        return None, None
    c.pos += 7
    c.expect(b"(")
    options: list[str] = []
    partial = None
    while c.peek() != 0x29:
        if options or partial:
            c.sp()
        opt = c.atom("result option").upper()
        if opt not in allowed:
            raise c.error(f"unknown result option {opt}"[:80])
        if opt == "PARTIAL":
            c.sp()
            partial = _partial_range(c)
        elif opt not in options:
            options.append(opt)
    c.pos += 1
    if partial is not None:
        options.append("PARTIAL")
    return options or ["ALL"], partial  # "RETURN ()" is RETURN (ALL), RFC 4731


def _partial_range(c) -> tuple[int, int]:
    """RFC 9394: n:m counts from the first result, -n:-m from the last."""
    neg = c.peek() == 0x2D
    if neg:
        c.pos += 1
    a = c.number(nz=True)
    c.expect(b":")
    if neg:
        c.expect(b"-")
    b = c.number(nz=True)
    lo, hi = min(a, b), max(a, b)
    return (-lo, -hi) if neg else (lo, hi)


def _saving(options, parse):
    """parse(); a parse error of a command that would have saved its result empties "$"
    (RFC 5182), which the session learns from the error's reset_search_result."""
    try:
        return parse()
    except Exception as e:
        if options and "SAVE" in options:
            e.reset_search_result = True  # type: ignore[attr-defined]
        raise


def search(c, program) -> dict:
    options, partial = _return_options(c, SEARCH_RETURN)
    return _saving(options, lambda: {**program(c), "return": options, "partial": partial})


def sort(c, program) -> dict:
    options, partial = _return_options(c, SORT_RETURN)
    return _saving(options, lambda: {**_sort_rest(c, program), "return": options, "partial": partial})


def _sort_rest(c, program) -> dict:
    c.sp()
    c.expect(b"(")
    criteria: list[tuple[str, bool]] = []
    reverse = False
    while True:
        word = c.atom("sort key").upper()
        if word == "REVERSE" and not reverse:
            reverse = True
            c.sp()
            continue
        if word not in SORT_KEYS:
            raise c.error(f"unknown sort key {word}"[:80])
        criteria.append((word, reverse))
        reverse = False
        if c.peek() == 0x29:
            c.pos += 1
            break
        c.sp()
    return {"criteria": criteria, **program(c, charset_required=True)}


def thread(c, program) -> dict:
    c.sp()
    algorithm = c.atom("thread algorithm").upper()
    if algorithm not in ALGORITHMS:
        raise c.error(f"unknown thread algorithm {algorithm}"[:80])
    return {"algorithm": algorithm, **program(c, charset_required=True)}
