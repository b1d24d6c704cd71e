"""SRS (the Sender Rewriting Scheme, as libsrs2 and Postfix's postsrsd write it).

Forwarding mail for user@orig.example from our host would fail SPF at the next hop, so
the envelope sender becomes an address in our domain that only we can make and that
leads back to the original sender:

    SRS0=HHHH=TT=orig.example=user@our.domain          (first hop)
    SRS1=HHHH=first.hop==HHHH=TT=orig.example=user@our.domain   (re-forwarding an SRS0)

HHHH is the first 4 characters of base64(HMAC-SHA1(key, timestamp + host + local)) of
the lower-cased parts (libsrs2), TT the day number mod 1024 in base32.  A bounce to such
an address is reversed to the original sender; a bad hash or a timestamp older than
max_age days is refused.  The key is 32 random bytes in <data_dir>/srs.key (0600), made on
first use; keys listed after the first line of that file are still accepted when
reversing (rotation, as postsrsd's secrets file).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from ..fsutil import atomic_write

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
PRECISION = 60 * 60 * 24  # one timestamp step is a day
TICKS = 1024  # 10 bits: the timestamp wraps after ~2.8 years
HASH_LENGTH = 4
SEP = "="


class SRSError(Exception):
    """An SRS address that is not ours, forged, or expired; str() says which."""


def load_keys(data_dir: str | os.PathLike) -> list[bytes]:
    """The SRS secrets, newest first; the file is made (32 random bytes, hex) if missing."""
    path = Path(data_dir) / "srs.key"
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, (secrets.token_hex(32) + "\n").encode(), mode=0o600)
        except FileExistsError:
            pass
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise SRSError(f"{path} holds no key")
    return [ln.encode() for ln in lines]


def _timestamp(now: float) -> str:
    t = int(now // PRECISION) % TICKS
    return _B32[t >> 5] + _B32[t & 31]


def _age_days(stamp: str, now: float) -> int:
    try:
        t = (_B32.index(stamp[0].upper()) << 5) | _B32.index(stamp[1].upper())
    except (ValueError, IndexError):
        raise SRSError("bad SRS timestamp") from None
    if len(stamp) != 2:
        raise SRSError("bad SRS timestamp")
    today = int(now // PRECISION) % TICKS
    return (today - t) % TICKS


def _hash(key: bytes, *parts: str) -> str:
    mac = hmac.new(key, "".join(parts).lower().encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()[:HASH_LENGTH]


class SRS:
    def __init__(self, keys: list[bytes], domain: str, max_age: int = 21) -> None:
        self.keys = keys
        self.domain = domain.lower().rstrip(".")
        self.max_age = max_age

    def forward(self, sender: str, now: float | None = None) -> str:
        """The SRS address for `sender` (an address outside our domains)."""
        now = time.time() if now is None else now
        local, at, host = sender.rpartition("@")
        if not at or not local:
            raise SRSError(f"not an address: {sender!r}")
        key = self.keys[0]
        upper = local[:5].upper()
        if upper.startswith("SRS1") and local[4:5] in "=+-":
            # SRS1=HHH=first.hop==HHH=TT=orig=user: keep the first hop, hash afresh (libsrs2).
            parts = local[5:].split(SEP, 2)
            if len(parts) == 3 and parts[1]:
                first_hop, rest = parts[1], parts[2]
                return f"SRS1{SEP}{_hash(key, first_hop, rest)}{SEP}{first_hop}{SEP}{rest}@{self.domain}"
        if upper.startswith("SRS0") and local[4:5] in "=+-":
            # An SRS0 of another forwarder: wrap it as SRS1 pointing at that forwarder.
            rest = local[4:]
            h = _hash(key, host, rest)
            return f"SRS1{SEP}{h}{SEP}{host}{SEP}{rest}@{self.domain}"
        stamp = _timestamp(now)
        h = _hash(key, stamp, host, local)
        return f"SRS0{SEP}{h}{SEP}{stamp}{SEP}{host}{SEP}{local}@{self.domain}"

    def is_srs(self, address: str) -> bool:
        local, at, host = address.rpartition("@")
        return bool(at) and host.lower().rstrip(".") == self.domain and local[:4].upper() in ("SRS0", "SRS1") \
            and local[4:5] in ("=", "+", "-")

    def _check(self, given: str, *parts: str) -> None:
        for key in self.keys:
            if hmac.compare_digest(_hash(key, *parts).lower(), given.lower()):
                return  # libsrs2 compares case-insensitively: some MTAs lower-case local parts
        raise SRSError("SRS hash does not match (forged address)")

    def reverse(self, address: str, now: float | None = None) -> str:
        """The address an SRS address stands for; SRSError if forged, expired or malformed."""
        now = time.time() if now is None else now
        local, _, _ = address.rpartition("@")
        kind = local[:4].upper()
        body = local[5:]
        if kind == "SRS0":
            parts = body.split(SEP, 3)
            if len(parts) != 4 or not all(parts[:3]):
                raise SRSError("malformed SRS0 address")
            h, stamp, host, user = parts
            self._check(h, stamp, host, user)
            if _age_days(stamp, now) > self.max_age:
                raise SRSError("SRS address has expired")
            return f"{user}@{host}"
        if kind == "SRS1":
            # SRS1=HHH=first.hop==HHH=TT=orig=user -> SRS0=HHH=TT=orig=user@first.hop
            parts = body.split(SEP, 2)
            if len(parts) != 3 or not parts[0] or not parts[1]:
                raise SRSError("malformed SRS1 address")
            h, first_hop, rest = parts
            self._check(h, first_hop, rest)
            return f"SRS0{rest}@{first_hop}"
        raise SRSError("not an SRS address")
