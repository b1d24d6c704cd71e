"""Grammar of the QUOTA commands (RFC 9208 section 4), registered in parser.COMMANDS.

    getquota      = "GETQUOTA" SP quota-root-name
    getquotaroot  = "GETQUOTAROOT" SP mailbox
    setquota      = "SETQUOTA" SP quota-root-name SP setquota-list
    setquota-list = "(" [setquota-resource *(SP setquota-resource)] ")"
    setquota-resource = resource-name SP resource-limit      ; resource-limit = number64
"""
from __future__ import annotations

MAX_RESOURCES = 32  # more than any server knows: a bound on what one command may carry


def _quota_root(c) -> dict:
    c.sp()
    return {"root": c.astring().decode("utf-8", "replace")}


def _getquotaroot(c) -> dict:
    c.sp()
    return {"mailbox": c.mailbox()}


def _number64(c) -> int:
    start = c.pos
    while c.pos < len(c.line) and 0x30 <= c.line[c.pos] <= 0x39:
        c.pos += 1
    digits = c.line[start:c.pos]
    if not digits or len(digits) > 19 or int(digits) > 2**63 - 1:
        raise c.error("expected a resource limit (number64)")
    return int(digits)


def _setquota(c) -> dict:
    out = _quota_root(c)
    c.sp()
    c.expect(b"(")
    resources: list[tuple[str, int]] = []
    if c.peek() != 0x29:
        while True:
            name = c.atom("resource name").upper()
            c.sp()
            resources.append((name, _number64(c)))
            if len(resources) > MAX_RESOURCES:
                raise c.error("too many resources")
            if c.peek() == 0x29:
                break
            c.sp()
    c.expect(b")")
    out["resources"] = resources
    return out


QUOTA_COMMANDS = {"GETQUOTA": _quota_root, "GETQUOTAROOT": _getquotaroot, "SETQUOTA": _setquota}
