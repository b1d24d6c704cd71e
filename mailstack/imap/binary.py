"""BINARY (RFC 3516, RFC 9051 6.4.5): message sections with their content-transfer-encoding
undone, and binary APPENDs made storable.  Pure functions over bytes and the MIME tree of
fetch.py; no I/O (the session calls them in a worker thread for big messages).

* `section(data, root, part)` is FETCH BINARY[part]: the body of a leaf part, decoded.
  RFC 9051 6.4.5: BINARY "can only be requested for leaf body parts", so a multipart or
  message/rfc822 part raises `NotLeaf` (Dovecot answers those; the RFC does not allow it).
  A part that does not exist gives b"" (as BODY[] of one does here, and Dovecot answers).
* `whole_message(data, root)` is FETCH BINARY[] (the empty section the RFC 3516 grammar
  allows): the message with every leaf body decoded and its Content-Transfer-Encoding
  header saying "binary", everything else (headers, boundaries) as stored, as Dovecot does.
* `make_storable(message)` is for APPEND with literal8: a leaf body holding NUL (which no
  IMAP literal may carry in BODY[]) is re-encoded as base64, its header changed to say so:
  RFC 3516 4.4 lets the server change the CTE as long as no data is lost (Dovecot does the
  same).  Everything else is stored as it came.
"""
from __future__ import annotations

import binascii
import re

from . import fetch


class UnknownCTE(Exception):
    """NO [UNKNOWN-CTE]: the section's transfer encoding is not one we can undo."""


class NotLeaf(Exception):
    """BINARY of a multipart or message part (RFC 9051 6.4.5 allows leaf parts only)."""


class NotStorable(Exception):
    """A binary APPEND we cannot store without losing data (NUL in a header)."""


IDENTITY = frozenset({"7bit", "8bit", "binary"})
_TRAILING_WS = re.compile(rb"[ \t]+(?=\r?\n|\Z)")
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")
_CTE_LINE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*(?:\r?\n[ \t].*)*(?:\r?\n)?")


def cte_of(part: fetch.Part) -> str:
    """The part's transfer encoding, lower case, without comments or parameters."""
    raw = fetch._cte(part)
    token = re.match(r"[^\s;(]*", raw.strip())
    return token.group(0) if token and token.group(0) else "7bit"


def decode(cte: str, body: bytes) -> bytes:
    """Undo one transfer encoding (UnknownCTE for one we do not know)."""
    if cte in IDENTITY:
        return body
    if cte == "base64":
        try:
            return binascii.a2b_base64(body)
        except binascii.Error:
            # bad padding or a stray byte: decode what is there, as mail readers do
            clean = _NOT_B64.sub(b"", body.split(b"=", 1)[0])
            if len(clean) % 4 == 1:
                clean = clean[:-1]
            return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    if cte == "quoted-printable":
        # RFC 2045 6.7 (3): whitespace at the end of a line was added in transport: dropped
        return binascii.a2b_qp(_TRAILING_WS.sub(b"", body))
    raise UnknownCTE(cte)


def _is_leaf(part: fetch.Part) -> bool:
    return part.type != "multipart" and part.message is None


def section(data: bytes, root: fetch.Part, numbers: tuple[int, ...]) -> bytes:
    """BINARY[numbers] (numbers non-empty; see whole_message for the empty section)."""
    part = fetch.find_part(root, numbers)
    if part is None:
        return b""
    if not _is_leaf(part):
        raise NotLeaf()
    return decode(cte_of(part), data[part.body_start:part.end])


def _leaves(part: fetch.Part):
    if part.type == "multipart":
        for child in part.children:
            yield from _leaves(child)
    elif part.message is not None:
        yield from _leaves(part.message)
    else:
        yield part


def _binary_header(header: bytes) -> bytes:
    """The header block with its Content-Transfer-Encoding saying "binary"."""
    eol = b"\r\n" if b"\r\n" in header else b"\n"
    return _CTE_LINE.sub(lambda m: b"Content-Transfer-Encoding: binary" + eol if m.group(0).endswith(b"\n")
                         else b"Content-Transfer-Encoding: binary", header, count=1)


def whole_message(data: bytes, root: fetch.Part) -> bytes:
    """BINARY[]: the message with every leaf decoded (UnknownCTE if one cannot be)."""
    out = bytearray()
    pos = 0
    for leaf in _leaves(root):
        cte = cte_of(leaf)
        if cte in IDENTITY:
            continue  # copied as it is, with what surrounds it
        body = decode(cte, data[leaf.body_start:leaf.end])
        out += data[pos:leaf.start]
        out += _binary_header(data[leaf.start:leaf.body_start])
        out += body
        pos = leaf.end
    if pos == 0:
        return data
    out += data[pos:]
    return bytes(out)


def _base64_lines(body: bytes) -> bytes:
    # without a final line break: the one before the next boundary stays the boundary's
    return b"".join(binascii.b2a_base64(body[i:i + 57]).replace(b"\n", b"\r\n")
                    for i in range(0, len(body), 57))[:-2]


def make_storable(message: bytes) -> bytes:
    """A binary APPEND as it can be stored and served by BODY[]: every leaf body holding
    NUL re-encoded as base64 (its decoded bytes unchanged); NotStorable for NUL elsewhere."""
    if b"\0" not in message:
        return message
    root = fetch.parse(message)
    out = bytearray()
    pos = 0
    for leaf in _leaves(root):
        body = message[leaf.body_start:leaf.end]
        if b"\0" not in body:
            continue
        if cte_of(leaf) not in IDENTITY:  # an encoded body cannot hold a NUL: not MIME at all
            raise NotStorable("NUL in an encoded body part")
        header = message[leaf.start:leaf.body_start]
        eol = b"\r\n" if b"\r\n" in header or not header else b"\n"
        block, n = _CTE_LINE.subn(b"Content-Transfer-Encoding: base64" + eol, header, count=1)
        if not n:  # no such header: add it after the others (before the blank line)
            hend, _ = fetch.split_header(message, leaf.start, leaf.end)
            block = message[leaf.start:hend] + b"Content-Transfer-Encoding: base64" + eol + \
                message[hend:leaf.body_start]
        out += message[pos:leaf.start] + block + _base64_lines(body)
        pos = leaf.end
    out += message[pos:]
    if b"\0" in out:
        raise NotStorable("NUL outside a body part")
    return bytes(out)


def fetch_value(data: bytes, root: fetch.Part, numbers: tuple[int, ...]) -> bytes:
    """The decoded bytes FETCH BINARY[numbers] answers (the whole message for no numbers)."""
    return section(data, root, numbers) if numbers else whole_message(data, root)


def fetch_size(data: bytes, root: fetch.Part, numbers: tuple[int, ...]) -> int:
    """BINARY.SIZE[numbers]: the length of fetch_value, without a copy where nothing is to
    be decoded."""
    if numbers:
        part = fetch.find_part(root, numbers)
        if part is not None and _is_leaf(part) and cte_of(part) in IDENTITY:
            return part.end - part.body_start
    return len(fetch_value(data, root, numbers))
