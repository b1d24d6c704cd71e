"""Account and mailbox names -> paths on disk, refusing anything that could leave the account.

Layout (Maildir++): account "alice@example.com" lives in <root>/example.com/alice/; that
directory is INBOX itself (cur/ new/ tmp/), and every other mailbox is a directory inside it
whose name is "." followed by the hierarchy levels joined with ".":
"Archive/2024" -> ".Archive.2024".

Because "." separates levels on disk, a "." inside a level must be escaped, and so must the
escape character itself.  The choice is Dovecot's `mailbox_list_storage_escape_char = %`
style: "." -> "%2E", "%" -> "%25", nothing else changes (UTF-8 stays UTF-8, so a person can
read the names with ls).  Encoding is checked to be reversible, so a directory made by
someone else that does not decode to exactly itself is not taken for a mailbox.

Refused (StoreError): empty names or levels, "/" at either end ("a//b" too), "." or ".."
as a level, NUL and other control characters, text that is not valid Unicode, more than
MAX_DEPTH levels, and names too long for one directory entry.
"""
from __future__ import annotations

from .base import StoreError

INBOX = "INBOX"
SEP = "/"
MAX_DEPTH = 32
MAX_DIRNAME_BYTES = 255  # NAME_MAX of every common Linux filesystem
_ESCAPES = {".": "%2E", "%": "%25"}


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str) or not text:
        raise StoreError(f"empty {what}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise StoreError(f"control character in {what}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"{what} is not valid Unicode") from None


def normalize(name: str) -> str:
    """The canonical spelling of a mailbox name ("inbox/x" -> "INBOX/x"); StoreError if bad."""
    _check_text(name, "mailbox name")
    if name.startswith(SEP) or name.endswith(SEP):
        raise StoreError("mailbox name must not start or end with /")
    parts = name.split(SEP)
    if len(parts) > MAX_DEPTH:
        raise StoreError("mailbox name has too many levels")
    for p in parts:
        if not p:
            raise StoreError("empty level in mailbox name")
        if p in (".", ".."):
            raise StoreError("'.' and '..' are not mailbox names")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return SEP.join(parts)


def _encode_level(level: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in level)


def _decode_level(level: str) -> str | None:
    out = []
    i = 0
    while i < len(level):
        c = level[i]
        if c == "%":
            code = level[i + 1:i + 3]
            if code.upper() not in ("2E", "25"):
                return None
            out.append("." if code.upper() == "2E" else "%")
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def to_dirname(name: str) -> str | None:
    """Directory (inside the account directory) of mailbox `name`; None for INBOX (the
    account directory itself)."""
    name = normalize(name)
    if name == INBOX:
        return None
    dirname = "." + ".".join(_encode_level(p) for p in name.split(SEP))
    if len(dirname.encode("utf-8")) > MAX_DIRNAME_BYTES:
        raise StoreError("mailbox name too long")
    return dirname


def from_dirname(dirname: str) -> str | None:
    """Mailbox name of a directory in the account directory, or None when the directory is
    not one this module would have made (so it is not listed and cannot be opened)."""
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    levels = [_decode_level(p) for p in dirname[1:].split(".")]
    if any(level is None for level in levels):
        return None
    try:
        name = normalize(SEP.join(levels))  # type: ignore[arg-type]
        return name if to_dirname(name) == dirname else None
    except StoreError:
        return None


def parents(name: str) -> list[str]:
    """The superior names of `name`, outermost first: "a/b/c" -> ["a", "a/b"]."""
    parts = name.split(SEP)
    return [SEP.join(parts[:i]) for i in range(1, len(parts))]


def _check_path_part(part: str, what: str) -> None:
    _check_text(part, what)
    if "/" in part or part in (".", "..") or part.startswith("."):
        raise StoreError(f"unusable {what}")
    if len(part.encode("utf-8")) > MAX_DIRNAME_BYTES:
        raise StoreError(f"{what} too long")


def normalize_account(account: str) -> str:
    """Accounts are addresses compared without case; StoreError when it cannot be a path."""
    if not isinstance(account, str) or "@" not in account:
        raise StoreError("account must be an address")
    return account.lower()


def account_parts(account: str) -> tuple[str, str]:
    """(domain, localpart) directory names of an account; StoreError for anything unsafe."""
    local, _, domain = normalize_account(account).rpartition("@")
    _check_path_part(local, "account local part")
    _check_path_part(domain, "account domain")
    return domain, local
