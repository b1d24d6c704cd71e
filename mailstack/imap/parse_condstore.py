"""The RFC 7162 (CONDSTORE/QRESYNC) grammar, as small pure functions over parser.py's
cursor (no I/O): SELECT/EXAMINE parameters, FETCH and STORE modifiers, the SEARCH MODSEQ key.

    select-params   = SP "(" select-param *(SP select-param) ")"
    select-param    = "CONDSTORE" / "QRESYNC" SP "(" uidvalidity SP mod-sequence-value
                      [SP known-uids] [SP "(" known-sequence-set SP known-uid-set ")"] ")"
    fetch-modifiers = SP "(" ("CHANGEDSINCE" SP mod-sequence-value / "VANISHED") *(SP ...) ")"
    store-modifiers = SP "(" "UNCHANGEDSINCE" SP mod-sequence-valzer ")"
    search-key      =/ "MODSEQ" [SP entry-name SP entry-type-req] SP mod-sequence-valzer
"""
from __future__ import annotations

MAX_MODSEQ = (1 << 63) - 1
_ENTRY_TYPES = ("priv", "shared", "all")


def mod_sequence(c, zero: bool = True) -> int:
    """A mod-sequence-value (1..2^63-1), or mod-sequence-valzer with `zero`."""
    start = c.pos
    line = c.line
    while c.pos < len(line) and 0x30 <= line[c.pos] <= 0x39:
        c.pos += 1
    digits = line[start:c.pos]
    if not digits or len(digits) > 19:
        raise c.error("expected a mod-sequence")
    value = int(digits)
    if value > MAX_MODSEQ or (value == 0 and not zero):
        raise c.error("mod-sequence out of range")
    return value


def _word(c) -> str:
    start = c.pos
    line = c.line
    while c.pos < len(line) and (0x41 <= line[c.pos] <= 0x5A or 0x61 <= line[c.pos] <= 0x7A):
        c.pos += 1
    return line[start:c.pos].decode("ascii").upper()


def select_params(c) -> dict:
    """After "SELECT name": the optional parameter list.  Returns {"condstore": bool,
    "qresync": None or (uidvalidity, modseq, known-uids or None, (seqs, uids) or None)}."""
    out: dict = {"condstore": False, "qresync": None}
    if not c.maybe_sp():
        return out
    c.expect(b"(")
    if c.peek() == 0x29:  # an empty list (RFC 4466 allows none)
        c.pos += 1
        return out
    while True:
        word = _word(c)
        if word == "CONDSTORE" and not out["condstore"]:
            out["condstore"] = True
        elif word == "QRESYNC" and out["qresync"] is None:
            c.sp()
            out["qresync"] = _qresync(c)
        else:
            raise c.error(f"unknown or repeated SELECT parameter {word or '?'}")
        if c.peek() == 0x29:
            c.pos += 1
            return out
        c.sp()


def _qresync(c) -> tuple:
    c.expect(b"(")
    uidvalidity = c.number(nz=True)
    c.sp()
    modseq = mod_sequence(c, zero=False)
    known = match = None
    if c.maybe_sp():
        if c.peek() != 0x28:
            known = c.sequence_set()
            if c.peek() != 0x29:
                c.sp()
        if c.peek() == 0x28:
            c.pos += 1
            seqs = c.sequence_set()
            c.sp()
            uids = c.sequence_set()
            c.expect(b")")
            match = (seqs, uids)
    c.expect(b")")
    return (uidvalidity, modseq, known, match)


def fetch_modifiers(c) -> dict:
    """After the FETCH attributes: {"changedsince": n or None, "vanished": bool}."""
    out: dict = {"changedsince": None, "vanished": False}
    if not c.maybe_sp():
        return out
    c.expect(b"(")
    while True:
        word = _word(c)
        if word == "CHANGEDSINCE" and out["changedsince"] is None:
            c.sp()
            out["changedsince"] = mod_sequence(c)
        elif word == "VANISHED" and not out["vanished"]:
            out["vanished"] = True
        else:
            raise c.error(f"unknown or repeated FETCH modifier {word or '?'}")
        if c.peek() == 0x29:
            c.pos += 1
            break
        c.sp()
    if out["vanished"] and out["changedsince"] is None:
        raise c.error("VANISHED needs CHANGEDSINCE")  # RFC 7162 3.2.6
    return out


def store_modifiers(c) -> int | None:
    """Before the STORE action: "(UNCHANGEDSINCE n) " -> n; None when there is none."""
    if c.peek() != 0x28:
        return None
    c.pos += 1
    if _word(c) != "UNCHANGEDSINCE":
        raise c.error("unknown STORE modifier")
    c.sp()
    value = mod_sequence(c)
    c.expect(b")")
    c.sp()
    return value


def search_modseq(c) -> tuple:
    """After the word MODSEQ: ("MODSEQ", n).  The optional entry name and type (a flag's own
    modseq) are checked and read as the message's modseq, which is never lower."""
    c.sp()
    if c.peek() == 0x22:
        name = c.quoted()
        if not name.lower().startswith(b"/flags/") or len(name) <= 7:
            raise c.error("bad MODSEQ entry name")
        c.sp()
        if _word(c).lower() not in _ENTRY_TYPES:
            raise c.error("bad MODSEQ entry type")
        c.sp()
    return ("MODSEQ", mod_sequence(c))
