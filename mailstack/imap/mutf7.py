"""Modified UTF-7 (RFC 3501 5.1.3): how IMAP spells non-ASCII mailbox names on the wire.

Printable ASCII stands for itself except "&", which is written "&-"; any other run of
characters is UTF-16BE, base64 with "," instead of "/", no padding, between "&" and "-".
"""
from __future__ import annotations

import base64
import binascii


class MUTF7Error(ValueError):
    pass


def _b64(run: str) -> str:
    data = run.encode("utf-16-be")
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",")


def encode(name: str) -> str:
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if run:
                out.append("&" + _b64("".join(run)) + "-")
                run = []
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append("&" + _b64("".join(run)) + "-")
    return "".join(out)


def decode(text: str | bytes) -> str:
    """Strict decoding: malformed input raises MUTF7Error (the caller answers NO/BAD)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            # RFC 6855 clients may send raw UTF-8; accept it when it is valid.
            try:
                return text.decode("utf-8")
            except UnicodeDecodeError:
                raise MUTF7Error("mailbox name is neither modified UTF-7 nor UTF-8") from None
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                raise MUTF7Error("mailbox name contains a non-printable character")
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise MUTF7Error("unterminated &... sequence in mailbox name")
        chunk = text[i + 1:end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        b64 = chunk.replace(",", "/")
        b64 += "=" * (-len(b64) % 4)
        try:
            raw = base64.b64decode(b64, validate=True)
            if len(raw) % 2:
                raise MUTF7Error("odd number of bytes in &... sequence")
            decoded = raw.decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError):
            raise MUTF7Error("bad &... sequence in mailbox name") from None
        if any(0x20 <= ord(c) <= 0x7E for c in decoded):
            raise MUTF7Error("printable ASCII must not be base64-encoded in a mailbox name")
        if _b64(decoded) != chunk:  # non-canonical (e.g. non-zero padding bits)
            raise MUTF7Error("non-canonical &... sequence in mailbox name")
        out.append(decoded)
    return "".join(out)
