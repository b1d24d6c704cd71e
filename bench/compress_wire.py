"""Bytes on the wire for `FETCH 1:* ENVELOPE` with and without COMPRESS=DEFLATE (RFC 4978),
mailstack and Dovecot 2.3 side by side, over the bench corpus (corpus.py).

    python bench/compress_wire.py [--messages 2000]

Both servers run in-process / on loopback with private data (the test helpers
tests/imap_fixtures.py and tests/dovecot_fixture.py start them); the client is a raw
socket with its own zlib, counting the bytes it receives for the FETCH alone.
"""
from __future__ import annotations

import argparse
import random
import re
import socket
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

import corpus  # noqa: E402

USER, PW = "alice@example.test", "secret"


def fetch_bytes(port: int, compress: bool) -> tuple[int, int, float]:
    """(wire bytes, plain bytes, seconds) of FETCH 1:* ENVELOPE."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    inflate = zlib.decompressobj(-15) if compress else None
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15) if compress else None
    buf = b""

    def until(tag: bytes) -> tuple[int, int]:
        nonlocal buf
        wire = plain = 0
        while not re.search(rb"(^|\r\n)" + tag + rb" [^\r\n]*\r\n$", buf):
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError(buf[-200:])
            wire += len(data)
            data = inflate.decompress(data) if inflate and on[0] else data
            plain += len(data)
            buf += data
        buf = b""
        return wire, plain

    def cmd(tag: bytes, text: bytes) -> tuple[int, int]:
        line = tag + b" " + text + b"\r\n"
        sock.sendall(deflate.compress(line) + deflate.flush(zlib.Z_SYNC_FLUSH) if deflate and on[0] else line)
        return until(tag)

    on = [False]
    sock.recv(4096)
    cmd(b"a", f"LOGIN {USER} {PW}".encode())
    if compress:
        cmd(b"z", b"COMPRESS DEFLATE")
        on[0] = True
    cmd(b"b", b"SELECT INBOX")
    start = time.perf_counter()
    wire, plain = cmd(b"c", b"FETCH 1:* ENVELOPE")
    took = time.perf_counter() - start
    sock.close()
    return wire, plain, took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=2000)
    args = p.parse_args()
    from imap_fixtures import InProcessIMAP  # noqa: PLC0415
    from dovecot_fixture import Dovecot  # noqa: PLC0415

    rng = random.Random(7)
    messages = [corpus.make_message(i, rng)[0] for i in range(args.messages)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ms = InProcessIMAP(Path(tmp), imap_overrides={"allow_plaintext_auth": True})
        try:
            for m in messages:
                ms.deliver(USER, m)
            results["mailstack"] = [fetch_bytes(ms.ports["imap"], c) for c in (False, True)]
        finally:
            ms.close()
    dc = Dovecot(extra="mailbox_list_index = yes\nprotocol imap {\n  mail_plugins = $mail_plugins imap_zlib\n}\n")
    try:
        dc.start()
        dc.add_user(USER, PW)
        sock = socket.create_connection(("127.0.0.1", dc.imap_port), timeout=60)
        sock.recv(4096)
        sock.sendall(f"a LOGIN {USER} {PW}\r\n".encode())
        while b"a OK" not in sock.recv(4096):
            pass
        for i, m in enumerate(messages):
            sock.sendall(b"p%d APPEND INBOX {%d+}\r\n" % (i, len(m)) + m + b"\r\n")
        got = b""
        while b"p%d OK" % (len(messages) - 1) not in got:
            got = got[-100:] + sock.recv(1 << 16)
        sock.close()
        results["Dovecot 2.3"] = [fetch_bytes(dc.imap_port, c) for c in (False, True)]
    finally:
        dc.cleanup()
    print(f"FETCH 1:* ENVELOPE, {args.messages} corpus messages")
    print(f"{'server':<12} {'plain bytes':>12} {'compressed':>12} {'ratio':>7} {'s plain':>8} {'s compr.':>8}")
    for name, ((w0, _, t0), (w1, _, t1)) in results.items():
        print(f"{name:<12} {w0:>12,} {w1:>12,} {w0 / w1:>6.1f}x {t0:>8.3f} {t1:>8.3f}")


if __name__ == "__main__":
    main()
