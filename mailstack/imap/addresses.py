"""RFC 5322 address lists (From:, To: ...) for ENVELOPE and SEARCH, with no I/O.

Lenient like real servers must be: comments and folding white space (CFWS) anywhere a
token may stand, nested comments with quoted-pairs, quoted strings, domain literals, the
obsolete forms real mail still has (CFWS around the dots and the "@" of an addr-spec,
"." in a display name, source routes "<@a,@b:user@host>", empty list members) and
groups.  A comment after a bare addr-spec ("user@domain (Real Name)") gives the name, as
Dovecot does.  Garbage yields what can be recovered, never an exception.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

MAX_TOKENS = 5000
_SPECIALS = b"()<>[]:;@\\,.\""
_WSP = b" \t\r\n"


class Token(NamedTuple):
    kind: str  # "atom", "quoted", "literal" (domain literal), "comment", or the special char
    text: bytes  # atom text, unquoted string, literal with its brackets, comment content
    space: bool  # white space or a comment came before it


class Address(NamedTuple):
    """One ENVELOPE address: a mailbox, or a group's start (mailbox=name, host None) or end
    (all None), as RFC 3501 7.4.2 has them."""

    name: bytes | None
    route: bytes | None
    mailbox: bytes | None
    host: bytes | None

    def addr_spec(self) -> str:
        if self.mailbox is None or self.host is None:
            return ""
        return (self.mailbox + b"@" + self.host).decode("utf-8", "replace")


def tokenize(value: bytes) -> list[Token]:
    out: list[Token] = []
    i, n = 0, len(value)
    space = False
    while i < n and len(out) < MAX_TOKENS:
        c = value[i]
        if c in _WSP:
            space = True
            i += 1
        elif c == 0x28:  # ( comment, nested, with quoted-pairs
            depth, j = 1, i + 1
            buf = bytearray()
            while j < n and depth:
                d = value[j]
                if d == 0x5C and j + 1 < n:
                    buf.append(value[j + 1])
                    j += 2
                    continue
                if d == 0x28:
                    depth += 1
                elif d == 0x29:
                    depth -= 1
                    if not depth:
                        j += 1
                        break
                buf.append(d)
                j += 1
            out.append(Token("comment", bytes(buf).strip(), space))
            space = True
            i = j
        elif c == 0x22:  # " quoted string
            j = i + 1
            buf = bytearray()
            while j < n and value[j] != 0x22:
                if value[j] == 0x5C and j + 1 < n:
                    j += 1
                if value[j] not in b"\r\n":
                    buf.append(value[j])
                j += 1
            out.append(Token("quoted", bytes(buf), space))
            space = False
            i = j + 1
        elif c == 0x5B:  # [ domain literal ]
            j = value.find(b"]", i + 1)
            j = n - 1 if j < 0 else j
            out.append(Token("literal", value[i:j + 1], space))
            space = False
            i = j + 1
        elif c in _SPECIALS:
            out.append(Token(chr(c), bytes([c]), space))
            space = False
            i += 1
        else:
            j = i
            while j < n and value[j] not in _SPECIALS and value[j] not in _WSP:
                j += 1
            out.append(Token("atom", value[i:j], space))
            space = False
            i = j
    return out


def _phrase(tokens: list[Token]) -> bytes | None:
    """A display name: words with one space where the header had white space."""
    out = bytearray()
    for t in tokens:
        if t.kind == "comment":
            continue
        if out and t.space:
            out += b" "
        out += t.text
    return bytes(out) or None


def _addr_spec(tokens: list[Token]) -> tuple[bytes | None, bytes | None]:
    """(local part, domain) with CFWS dropped; domain None when there is no "@"."""
    words = [t for t in tokens if t.kind != "comment"]
    at = max((i for i, t in enumerate(words) if t.kind == "@"), default=-1)
    local_toks, domain_toks = (words[:at], words[at + 1:]) if at >= 0 else (words, None)
    local = b"".join(t.text for t in local_toks)
    domain = None if domain_toks is None else b"".join(t.text for t in domain_toks)
    return local, domain


def _mailbox(tokens: list[Token]) -> Address | None:
    if not tokens:
        return None
    kinds = [t.kind for t in tokens]
    if "<" in kinds:
        lt = kinds.index("<")
        gt = kinds.index(">", lt) if ">" in kinds[lt:] else len(tokens)
        name = _phrase(tokens[:lt])
        inner = tokens[lt + 1:gt]
        route = None
        colon = next((i for i, t in enumerate(inner) if t.kind == ":"), -1)
        if colon >= 0 and inner and inner[0].kind == "@":  # obsolete source route
            route = b"".join(t.text for t in inner[:colon] if t.kind != "comment") or None
            inner = inner[colon + 1:]
        local, domain = _addr_spec(inner)
    else:
        route = None
        local, domain = _addr_spec(tokens)
        comments = [t.text for t in tokens if t.kind == "comment" and t.text]
        name = comments[-1] if comments else None
    if not local and not domain and name is None:
        return None
    return Address(name, route, local or b"MISSING_MAILBOX", domain or b"MISSING_DOMAIN")


def parse_list(value: bytes) -> list[Address]:
    """Every address of a header value (unfolded or not), groups as start/end markers."""
    tokens = tokenize(value)
    out: list[Address] = []
    cur: list[Token] = []
    in_angle = False
    in_group = False
    for t in tokens:
        k = t.kind
        if k == "<":
            in_angle = True
        elif k == ">":
            in_angle = False
        elif not in_angle:
            if k == ":" and not in_group and not any(x.kind in ("<", "@") for x in cur):
                out.append(Address(None, None, _phrase(cur) or b"", None))
                in_group = True
                cur = []
                continue
            if k == ";" and in_group:
                a = _mailbox(cur)
                if a:
                    out.append(a)
                out.append(Address(None, None, None, None))
                in_group = False
                cur = []
                continue
            if k == ",":
                a = _mailbox(cur)
                if a:
                    out.append(a)
                cur = []
                continue
        cur.append(t)
    a = _mailbox(cur)
    if a:
        out.append(a)
    if in_group:
        out.append(Address(None, None, None, None))
    return out


@functools.lru_cache(maxsize=512)
def parse_list_cached(value: bytes) -> tuple[Address, ...]:
    """parse_list, remembered: the ENVELOPE and the index's searchable address forms parse
    the same header values one after the other, and mail repeats its senders."""
    return tuple(parse_list(value))
