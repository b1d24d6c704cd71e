"""IMAP flags <-> Maildir info letters, and the per-mailbox keyword table.

System flags are the spec's capital letters (D F R S T; T = trashed = \\Deleted).  Keywords
are the lowercase letters a..z, letter i standing for the i-th line of the mailbox's
keywords file (like dovecot-keywords), so at most 26 keywords per mailbox.  Lines are only
ever added, so a letter never changes meaning.  Letters are kept in ASCII order in names,
as the Maildir spec asks; letters this store does not know (e.g. "P" passed) are kept as
they are through flag changes.
"""
from __future__ import annotations

from typing import Iterable

from .base import StoreError

LETTER_OF = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
FLAG_OF = {v: k for k, v in LETTER_OF.items()}
_SYSTEM_BY_LOWER = {k.lower(): k for k in LETTER_OF}
KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_KEYWORD_LEN = 128
# RFC 3501 atom-specials: a keyword is an atom.
_ATOM_SPECIALS = set('(){ %*"\\]')


def check_keyword(word: str) -> None:
    if not word or len(word) > MAX_KEYWORD_LEN:
        raise StoreError("bad keyword length")
    if any(c in _ATOM_SPECIALS or ord(c) <= 0x20 or ord(c) >= 0x7F for c in word):
        raise StoreError(f"invalid keyword {word!r}")


def parse_flags(flags: Iterable[str]) -> tuple[set[str], list[str]]:
    """(system flags in canonical case, keywords in first-seen order).  \\Recent is ignored
    (it belongs to the session, not the message); unknown \\-flags are refused."""
    system: set[str] = set()
    keywords: list[str] = []
    seen_kw: set[str] = set()
    for f in flags:
        if not isinstance(f, str):
            raise StoreError("flag must be text")
        if f.startswith("\\"):
            canon = _SYSTEM_BY_LOWER.get(f.lower())
            if canon is None:
                if f.lower() == "\\recent":
                    continue
                raise StoreError(f"unknown system flag {f}")
            system.add(canon)
        else:
            check_keyword(f)
            if f.lower() not in seen_kw:
                seen_kw.add(f.lower())
                keywords.append(f)
    return system, keywords


def keyword_letters(keywords: Iterable[str], table: list[str]) -> str:
    """Letters of keywords that are in the table (matched without case); others are skipped."""
    index = {k.lower(): i for i, k in enumerate(table)}
    return "".join(KEYWORD_LETTERS[index[k.lower()]] for k in keywords if k.lower() in index)


def letters_for(system: set[str], keywords: Iterable[str], table: list[str]) -> str:
    return "".join(LETTER_OF[f] for f in system) + keyword_letters(keywords, table)


def to_flags(letters: str, table: list[str]) -> set[str]:
    out = set()
    for c in letters:
        if c in FLAG_OF:
            out.add(FLAG_OF[c])
        elif "a" <= c <= "z":
            i = ord(c) - 97
            if i < len(table):
                out.add(table[i])
    return out


def apply(old: str, mode: str, change: str) -> str:
    """New letters after applying `change` letters to `old` letters with mode + - or =.
    With "=", letters of no meaning to IMAP (unknown capitals, unmapped keyword slots) stay."""
    if mode == "+":
        new = set(old) | set(change)
    elif mode == "-":
        new = set(old) - set(change)
    elif mode == "=":
        new = {c for c in old if c not in FLAG_OF and not ("a" <= c <= "z")} | set(change)
    else:
        raise StoreError(f"bad flag mode {mode!r}")
    return "".join(sorted(new))


def parse_keywords_file(data: bytes) -> list[str]:
    """Lines "<index> <keyword>"; a gap or a bad line ends the table (what follows is unusable
    because letters are positional)."""
    table: list[str] = []
    for line in data.decode("utf-8", "replace").splitlines():
        idx, _, word = line.partition(" ")
        if not idx.isdigit() or int(idx) != len(table) or len(table) >= len(KEYWORD_LETTERS):
            break
        try:
            check_keyword(word)
        except StoreError:
            break
        table.append(word)
    return table


def format_keywords_file(table: list[str]) -> bytes:
    return "".join(f"{i} {k}\n" for i, k in enumerate(table)).encode("utf-8")
