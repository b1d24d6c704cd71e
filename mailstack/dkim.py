"""DKIM signing of outbound mail (dkimpy) and key generation.

Keys live in <data_dir>/dkim/<domain>.<selector>.key (PEM, mode 0600), one or
more per domain; the configured selector is preferred, else the newest key.
A message is signed for the domain of its From: header (what DMARC aligns on)
when that domain is local and has a key.  Signing is CPU work: call sign() from
a worker thread.
"""
from __future__ import annotations

import base64
import logging
import os
import threading
from email.parser import HeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Callable

import dkim as dkimpy

from .fsutil import atomic_write
from .nexthop import to_alabel

log = logging.getLogger("mailstack.dkim")

def key_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "dkim"


def key_path(data_dir: str | os.PathLike, domain: str, selector: str) -> Path:
    return key_dir(data_dir) / f"{to_alabel(domain)}.{selector}.key"


def generate_key(data_dir: str | os.PathLike, domain: str, selector: str, bits: int = 2048,
                 force: bool = False) -> Path:
    """Create an RSA key for `domain` (blocking). Refuses to replace a key unless `force`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = key_path(data_dir, domain, selector)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (a published key would stop matching); use --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)
    return path


def public_record(private_pem: bytes) -> str:
    """The TXT record value that publishes the public half of `private_pem`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("unsupported DKIM key type")
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def from_domain(headers: bytes) -> str | None:
    """Domain of the single From: address in a header section, or None."""
    # Decoded by hand: the bytes parser would hide a UTF-8 (RFC 6532) address behind surrogates.
    msg = HeaderParser().parsestr(headers.decode("utf-8", "replace"))
    values = msg.get_all("From") or []
    if len(values) != 1:  # no From, or several: do not guess whom to sign for
        return None
    addrs = [a for _, a in getaddresses([str(values[0])]) if "@" in a]
    if len(addrs) != 1:
        return None
    try:
        return to_alabel(addrs[0].rpartition("@")[2])
    except ValueError:
        return None


class DKIMSigner:
    """Finds a domain's key and signs. Thread-safe; keys are cached until the key folder changes."""

    def __init__(self, data_dir: str | os.PathLike, selector: str = "mail",
                 is_local_domain: Callable[[str], bool] | None = None) -> None:
        self.dir = key_dir(data_dir)
        self.selector = selector
        self.is_local_domain = is_local_domain or (lambda d: True)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys: dict[str, tuple[str, bytes]] = {}

    def _load(self) -> dict[str, tuple[str, bytes]]:
        try:
            st = self.dir.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            return {}
        with self._lock:
            if stamp == self._stamp:
                return self._keys
            found: dict[str, list[tuple[bool, float, str, Path]]] = {}
            for path in self.dir.glob("*.key"):
                name = path.name[:-4]
                # <domain>.<selector>: the selector is the last label (selectors here have no dots).
                domain, dot, selector = name.rpartition(".")
                if not dot or not domain:
                    continue
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
                found.setdefault(domain, []).append((selector == self.selector, mtime, selector, path))
            keys = {}
            for domain, candidates in found.items():
                _, _, selector, path = max(candidates)
                try:
                    keys[domain] = (selector, path.read_bytes())
                except OSError as e:
                    log.warning("cannot read DKIM key %s: %s", path, e)
            self._keys, self._stamp = keys, stamp
            return keys

    def key_for(self, domain: str) -> tuple[str, bytes] | None:
        return self._load().get(domain)

    def would_sign(self, header: bytes) -> bool:
        """Would sign() sign a message with this (CRLF) header section?  Lets a big message
        that will not be signed be sent without reading it whole."""
        domain = from_domain(header)
        return bool(domain) and self.is_local_domain(domain) and self.key_for(domain) is not None

    def sign(self, data: bytes, body_digest: bytes | None = None) -> bytes:
        """DKIM-Signature header (bytes ending in CRLF) for a CRLF message, or b"" when
        it should not or cannot be signed. Blocking.  With `body_digest` (dkimbody.py: the
        body's relaxed hash, computed from a file in pieces) `data` is the header section
        alone, ending with the blank line: a big message is signed without holding it."""
        end = data.find(b"\r\n\r\n")
        domain = from_domain(data[:end + 2] if end >= 0 else data)
        if not domain or not self.is_local_domain(domain):
            return b""
        found = self.key_for(domain)
        if found is None:
            return b""
        selector, pem = found
        canonicalize = (b"relaxed", b"relaxed")  # dkimpy's default headers; From oversigned
        try:
            if body_digest is not None:
                from . import dkimbody
                return dkimbody.dkim_sign(data, body_digest, selector.encode(), domain.encode(), pem,
                                          canonicalize)
            return dkimpy.sign(data, selector.encode(), domain.encode(), pem, canonicalize=canonicalize)
        except Exception as e:  # a broken key or message must not stop delivery
            log.warning("DKIM signing for %s failed: %s", domain, e)
            return b""
