"""DKIM/ARC signing of big outbound messages without holding them (mailstack/dkimbody.py):
the body hash made in pieces equals dkimpy's hash of the whole body, and the signatures
made from the header section + that hash verify with dkimpy over the whole message."""
from __future__ import annotations

import contextlib
import hashlib
import re

import dkim as dkimpy
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack import dkim as msdkim
from mailstack import dkimbody
from mailstack.smtp.clientproto import normalize_crlf

HEADER = (b"From: Alice <alice@local.test>\r\nTo: bob@remote.test\r\nSubject: big\r\n"
          b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <big@local.test>\r\n"
          b"Authentication-Results: mx.local.test; spf=pass smtp.mailfrom=remote.test\r\n\r\n")

_tokens = st.sampled_from([b"a", b"b c", b" ", b"\t", b"  \t ", b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"."])
_bodies = st.lists(_tokens, max_size=60).map(b"".join)


def whole_hash(body: bytes) -> bytes:
    return hashlib.sha256(dkimbody.canon_body(normalize_crlf(body))).digest()


@settings(max_examples=600, deadline=None)
@given(_bodies, st.lists(st.integers(min_value=0, max_value=80), max_size=8), st.integers(2, 12))
def test_piecewise_relaxed_hash_equals_dkimpy_on_the_whole(body, cuts, piece):
    """Cut anywhere (a CRLF cut in two, trailing blank lines, blanks-only lines, no final
    newline), and with lines longer than the piece size: the same hash as dkimpy's."""
    body = normalize_crlf(body)
    with pieces_of(piece):
        h = dkimbody.RelaxedBodyHash()
        prev = 0
        for cut in sorted(min(c, len(body)) for c in cuts):
            h.update(body[prev:cut])
            prev = cut
        h.update(body[prev:])
        assert h.digest() == whole_hash(body)


@settings(max_examples=300, deadline=None)
@given(_bodies, st.integers(2, 12))
def test_hash_of_a_file_range_with_bare_lf_equals_dkimpy(tmp_path_factory, body, piece):
    path = tmp_path_factory.mktemp("b") / "q"
    path.write_bytes(b"QUEUE-PREFIX" + HEADER + body + b"TRAILER")
    start = len(b"QUEUE-PREFIX" + HEADER)
    with pieces_of(piece):
        assert dkimbody.body_hash_of_file(str(path), start, start + len(body)) == whole_hash(body)


@contextlib.contextmanager
def pieces_of(n: int):
    """Read and cut in pieces of n bytes (lines longer than that are hashed in parts)."""
    saved, dkimbody.PIECE = dkimbody.PIECE, n
    try:
        yield
    finally:
        dkimbody.PIECE = saved


def _body(lines: int) -> bytes:
    return b"".join(b"line %d  with\tblanks \r\n.dot\n" % i for i in range(lines)) + b"\r\n\r\n"


def _dns(signer, selector: str):
    record = msdkim.public_record(signer.key_for("local.test")[1]).encode()

    def dnsfunc(name: bytes, timeout: float = 5):
        return record if name.rstrip(b".") == f"{selector}._domainkey.local.test".encode() else None
    return dnsfunc


def test_dkim_signature_from_header_and_piecewise_hash_verifies(tmp_path):
    msdkim.generate_key(tmp_path, "local.test", "s1", bits=1024)
    signer = msdkim.DKIMSigner(tmp_path, "s1")
    body = _body(3000)
    path = tmp_path / "q"
    path.write_bytes(HEADER + body)
    digest = dkimbody.body_hash_of_file(str(path), len(HEADER), len(HEADER + body))
    sig = signer.sign(HEADER, digest)
    whole = signer.sign(HEADER + normalize_crlf(body))
    bh = re.compile(rb"bh=([^;]+);")
    assert bh.search(sig).group(1) == bh.search(whole).group(1)
    message = sig + HEADER + normalize_crlf(body)
    assert dkimpy.verify(message, dnsfunc=_dns(signer, "s1"))
    assert not dkimpy.verify(message.replace(b"line 7 ", b"line 8 "), dnsfunc=_dns(signer, "s1"))


def test_arc_seal_from_header_and_piecewise_hash_verifies(tmp_path):
    msdkim.generate_key(tmp_path, "local.test", "s1", bits=1024)
    signer = msdkim.DKIMSigner(tmp_path, "s1")
    body = normalize_crlf(_body(500))
    digest = whole_hash(body)
    pem = signer.key_for("local.test")[1]
    headers = dkimbody.arc_sign(HEADER, digest, b"s1", b"local.test", pem, b"mx.local.test")
    assert [h.split(b":")[0] for h in headers] == [b"ARC-Seal", b"ARC-Message-Signature",
                                                  b"ARC-Authentication-Results"]
    message = b"".join(headers) + HEADER + body
    cv, results, reason = dkimpy.arc_verify(message, dnsfunc=_dns(signer, "s1"))
    assert cv == dkimpy.CV_Pass, reason
    cv, _, _ = dkimpy.arc_verify(message.replace(b"line 7 ", b"line 8 "), dnsfunc=_dns(signer, "s1"))
    assert cv == dkimpy.CV_Fail


def test_big_outbound_message_is_signed_without_holding_it(tmp_path):
    """The queue's read of a 4 MB message that gets a DKIM signature: the text is not
    read whole (tracemalloc peak, which counts every Python allocation: before, the read and
    dkimpy's canonicalisation of it peaked at ~24 times the message), and the signature
    made from the header + piecewise hash verifies over the whole message as sent."""
    import tracemalloc

    from mailstack.queue.remote import _read_and_prepare
    from mailstack.queue.types import QueuedMessage
    from mailstack.store.base import MessageSource
    msdkim.generate_key(tmp_path, "local.test", "s1", bits=1024)
    signer = msdkim.DKIMSigner(tmp_path, "s1")
    body = _body(140_000)  # bare LFs too: sent (and hashed) as CRLF
    spool = tmp_path / "queued"
    spool.write_bytes(b"ENVELOPE LINES\n" + HEADER + body)
    message = QueuedMessage("q1", "alice@local.test", ["bob@remote.test"],
                            MessageSource(str(spool), len(b"ENVELOPE LINES\n"), len(HEADER + body)), 0.0)
    tracemalloc.start()
    try:
        wire = _read_and_prepare(message, signer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(body) > 4 << 20 and peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"  # whole: ~100 MiB
    assert wire.body == b"" and wire.source is not None  # streamed from the queue file
    assert wire.prefix.startswith(b"DKIM-Signature: ")
    sent = wire.prefix + normalize_crlf(HEADER + body)
    assert wire.size == len(sent)
    assert dkimpy.verify(sent, dnsfunc=_dns(signer, "s1"))
