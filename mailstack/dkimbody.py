"""DKIM and ARC signatures of a big message without holding it: the body hash is computed
from the queue file in bounded pieces, and dkimpy signs the header section with that hash.

dkimpy hashes the body whole (`canonicalize_body(self.body)`, no incremental interface).
Everything else it does for a signature (the header fields to sign, the tag list, the
header hash, RSA) needs only the header section.  So dkimpy is given the header section
with an empty body, and its body hash object answers with the digest computed here: of
everything dkimpy hashes while signing, only the body hash is ever fed nothing (the header
hash always has at least the signature field itself), which is how it is told apart.
Relies on dkimpy 1.1's DKIM.sign / ARC.sign reading `self.hasher` (pyproject pins < 1.2;
tests/test_dkim_stream.py compares with dkimpy signing the whole message).

The body's relaxed canonical form (RFC 6376 3.4.4) is made piece by piece with dkimpy's own
canonicalisation applied to whole lines, so it is byte for byte what dkimpy hashes.
Blocking: call from a worker thread.
"""
from __future__ import annotations

import hashlib
import re

import dkim as dkimpy
import dkim.canonicalization as dkim_canon

# The queue file is read and canonicalised in pieces of this size; a line longer than this
# is cut at a non-blank byte (its canonical form does not depend on where).  Small, because
# dkimpy's regular-expression passes allocate about 24 times the text they rewrite (a list
# of small pieces per match): 64 KiB costs ~1.5 MiB at the peak, 1 MiB cost 24 MiB.
PIECE = 64 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")


def canon_body(body: bytes) -> bytes:
    return dkim_canon.Relaxed.canonicalize_body(body)


class RelaxedBodyHash:
    """sha256 of the relaxed canonical body, fed the CRLF body in pieces cut anywhere."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._tail = b""  # the last line, not complete yet
        self._pending = 0  # empty lines seen and not hashed: dropped if nothing follows them
        self._mid_line = False  # a piece of the current line was hashed already
        self._pending_cr = False  # a CR ended the last piece: maybe half of a CRLF

    def update(self, data: bytes) -> None:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            self._pending_cr = True
            data = data[:-1]
        data = self._tail + data
        cut = data.rfind(b"\r\n") + 2
        if cut >= 2:
            self._lines(data[:cut])
            data = data[cut:]
        if len(data) > PIECE:  # one very long line: hash what is certain of it
            last = len(data.rstrip(b" \t"))
            if last:
                self._emit(dkim_canon.compress_whitespace(data[:last]))
                self._mid_line = True
            data = data[last:]
            if len(data) > 1:
                data = b" "  # blanks only: they compress to one, or vanish at the line's end
        self._tail = data

    def _lines(self, block: bytes) -> None:
        """Complete lines: canonicalised by dkimpy, a last non-empty line appended so that it
        keeps the trailing empty ones (which are counted here instead)."""
        canon = canon_body(block + b"x\r\n")[:-3]
        end = len(canon)
        empty = 0
        while end >= 2 and canon.endswith(b"\r\n", 0, end) and \
                (end == 2 and not self._mid_line or end > 2 and canon.endswith(b"\r\n", 0, end - 2)):
            end -= 2
            empty += 1
        if end:
            self._emit(canon[:end])
        self._pending += empty
        self._mid_line = False

    def _emit(self, canon: bytes) -> None:
        if self._pending:
            self._h.update(b"\r\n" * self._pending)
            self._pending = 0
        self._h.update(canon)

    def digest(self) -> bytes:
        tail = self._tail + (b"\r" if self._pending_cr else b"")
        self._tail, self._pending_cr = b"", False
        if tail or self._mid_line:
            # A last line without CRLF gets one, after its blanks were compressed but not
            # stripped (dkimpy adds the CRLF last, so "x " ends as "x \r\n"): never empty.
            self._emit(dkim_canon.compress_whitespace(tail) + b"\r\n")
        self._pending = 0  # empty lines at the end are not part of the canonical body
        return self._h.digest()


def body_hash_of_file(path: str, start: int, end: int) -> bytes:
    """Blocking: the relaxed body hash of bytes [start, end) of a file, bare LFs taken as
    CRLF (as the message is sent), read PIECE at a time."""
    h = RelaxedBodyHash()
    prev_cr = False
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            data = f.read(min(PIECE, left))
            if not data:
                raise OSError(f"{path}: shorter than its queue entry says")
            left -= len(data)
            if data.count(b"\n") != data.count(b"\r\n"):  # bare LFs -> CRLF, as normalize_crlf
                lead = b""
                if prev_cr and data[:1] == b"\n":  # its CR ended the last piece: not bare
                    lead, data = b"\n", data[1:]
                data = lead + _BARE_LF.sub(b"\r\n", data)
            prev_cr = data[-1:] == b"\r"
            h.update(data)
    return h.digest()


class _GivenDigest:
    """A hash object that answers `digest` when it was fed nothing (the body hash of a
    header-only message) and hashes normally otherwise."""

    __slots__ = ("_h", "_given", "_fed", "name", "digest_size")

    def __init__(self, real, given: bytes) -> None:
        self._h = real
        self._given = given
        self._fed = False
        self.name = real.name
        self.digest_size = real.digest_size

    def update(self, data: bytes) -> None:
        if data:
            self._fed = True
            self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest() if self._fed else self._given

    def hexdigest(self) -> str:
        return self.digest().hex()


class _BodyHashGiven:
    """Mixed into dkimpy's DKIM / ARC: `self.hasher` makes _GivenDigest objects."""

    body_digest = b""

    @property
    def hasher(self):
        real = self._real_hasher
        return lambda: _GivenDigest(real(), self.body_digest)

    @hasher.setter
    def hasher(self, value) -> None:
        self._real_hasher = value


class _DKIM(_BodyHashGiven, dkimpy.DKIM):
    pass


class _ARC(_BodyHashGiven, dkimpy.ARC):
    pass


def dkim_sign(header: bytes, body_digest: bytes, selector: bytes, domain: bytes, privkey: bytes,
              canonicalize=(b"relaxed", b"relaxed")) -> bytes:
    """dkimpy.sign() of a message with this CRLF header section (ending in the blank line)
    and a body whose relaxed sha256 hash is `body_digest`."""
    if canonicalize[1] != b"relaxed":
        raise ValueError("only the relaxed body canonicalization is hashed here")
    d = _DKIM(header)
    d.body_digest = body_digest
    return d.sign(selector, domain, privkey, canonicalize=canonicalize)


def arc_sign(header: bytes, body_digest: bytes, selector: bytes, domain: bytes, privkey: bytes,
             srv_id: bytes) -> list[bytes]:
    """dkimpy.arc_sign() of such a message (ARC's body canonicalization is always relaxed)."""
    a = _ARC(header, signature_algorithm=b"rsa-sha256")
    a.body_digest = body_digest
    return a.sign(selector, domain, privkey, srv_id, include_headers=a.default_sign_headers())
