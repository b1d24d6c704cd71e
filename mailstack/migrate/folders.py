"""Remote folder names -> mailstack mailbox names, and special-use matching.

Pure functions.  A remote name arrives as a list of levels (already split on the remote
hierarchy separator and decoded from modified UTF-7).  Special-use folders are matched first
by their RFC 6154 attribute, then by the names the big providers and clients use, so that
"[Gmail]/Sent Mail", "Sent Items" or "INBOX.Sent" all land in mailstack's "Sent".
"""
from __future__ import annotations

from ..store import names

# RFC 6154 attribute -> mailstack's special mailbox of that use
BY_ATTRIBUTE = {"\\sent": "Sent", "\\drafts": "Drafts", "\\trash": "Trash", "\\junk": "Junk",
                "\\archive": "Archive"}
# Virtual views of other folders (Gmail's All Mail / Starred / Important): copying them would
# duplicate every message, so they are skipped unless named with --folders.
VIRTUAL = {"\\all", "\\flagged", "\\important"}
BY_NAME = {
    "sent": "Sent", "sent items": "Sent", "sent messages": "Sent", "sent mail": "Sent",
    "gesendet": "Sent", "gesendete elemente": "Sent", "envoyés": "Sent", "éléments envoyés": "Sent",
    "drafts": "Drafts", "draft": "Drafts", "entwürfe": "Drafts", "brouillons": "Drafts",
    "trash": "Trash", "deleted items": "Trash", "deleted messages": "Trash", "bin": "Trash",
    "papierkorb": "Trash", "corbeille": "Trash",
    "junk": "Junk", "spam": "Junk", "junk e-mail": "Junk", "junk email": "Junk", "bulk mail": "Junk",
    "archive": "Archive", "archives": "Archive", "archiv": "Archive",
}
PROVIDER_PREFIXES = ("[gmail]", "[google mail]")


def local_name(levels: list[str], attributes: set[str] = frozenset()) -> str:
    """The mailstack name for a remote folder."""
    attrs = {a.lower() for a in attributes}
    for attr, local in BY_ATTRIBUTE.items():
        if attr in attrs:
            return local
    levels = [lvl.replace(names.SEP, "-") or "_" for lvl in levels]
    if levels and levels[0].upper() == "INBOX":
        levels[0] = "INBOX"
        if len(levels) == 1:
            return "INBOX"
        # "INBOX.Sent" on servers that keep everything under INBOX (Courier, Cyrus)
        if len(levels) == 2 and levels[1].lower() in BY_NAME:
            return BY_NAME[levels[1].lower()]
    if levels and levels[0].lower() in PROVIDER_PREFIXES:
        rest = levels[1:]
        if len(rest) == 1 and rest[0].lower() in BY_NAME:
            return BY_NAME[rest[0].lower()]
        levels = rest or ["_"]
    if len(levels) == 1 and levels[0].lower() in BY_NAME:
        return BY_NAME[levels[0].lower()]
    levels = [lvl if lvl not in (".", "..") else "_" + lvl for lvl in levels]
    return names.normalize(names.SEP.join(levels))


def is_virtual(attributes: set[str]) -> bool:
    return bool({a.lower() for a in attributes} & VIRTUAL)


def matches(name: str, patterns: list[str]) -> bool:
    """--folders/--exclude: a pattern matches the folder and everything below it; "*" and "%"
    work as in IMAP LIST (any text / any text within one level)."""
    import re
    for p in patterns:
        rx = re.escape(p).replace(r"\*", ".*").replace("%", "[^/]*")
        if re.fullmatch(rx + "(/.*)?", name, re.IGNORECASE if p.upper().startswith("INBOX") else 0):
            return True
    return False
