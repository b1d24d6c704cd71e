"""TLS contexts, built once at start and swapped atomically on reload.

Each listener is created with its own fixed SSLContext object (`for_listener(name)`), whose
SNI callback hands every new handshake to the *current* context.  Reload builds a
new context and swaps one reference: connections in progress keep theirs, new ones
get the new certificate, and no listener has to be re-created.
"""
from __future__ import annotations

import datetime
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("mailstack.tls")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# TLS 1.2 suites of Mozilla's "intermediate" profile: forward secrecy and AEAD only (no CBC:
# LUCKY13 and friends; testssl.sh grades them down).  TLS 1.3 suites are all AEAD and are not
# affected by this string.
AEAD_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))
# The outbound client offers the same first; for opportunistic TLS it still accepts what an old
# MTA can do after them (encrypted with CBC beats plaintext, as Postfix's smtp_tls_ciphers=medium).
CLIENT_CIPHERS = AEAD_CIPHERS + ":HIGH:!aNULL:!eNULL:!MD5:!RC4:!3DES:!SHA1:!kRSA"


class TLSError(Exception):
    pass


def make_self_signed(cert_path: Path, key_path: Path, hostname: str, days: int = 825) -> None:
    """Create a self-signed certificate for `hostname` (key mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def cert_not_after(cert_path: str | os.PathLike) -> datetime.datetime | None:
    from cryptography import x509
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc


class TLSContexts:
    def __init__(self, cert: str, key: str, min_version: str = "TLSv1.2") -> None:
        self.cert, self.key, self.min_version = cert, key, min_version
        self._current = self._build()
        # One context object per listener (see for_listener); `object_class_for(listener)`, when
        # set (by Services, for metrics), gives the SSLObject class its handshakes run in.
        self.object_class_for = None
        self._per_listener: dict[str, ssl.SSLContext] = {}

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _VERSIONS[self.min_version]
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_ciphers(AEAD_CIPHERS)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise TLSError(f"tls.cert: cannot load {self.cert} / {self.key}: {e}") from None
        return ctx

    def for_listener(self, name: str) -> ssl.SSLContext:
        """The listener's own context object: its SNI callback hands each handshake to the current
        context (so a reload applies), and handshakes can be told apart by listener (metrics)."""
        ctx = self._per_listener.get(name)
        if ctx is None:
            ctx = self._build()
            ctx.sni_callback = self._pick
            if self.object_class_for is not None:
                ctx.sslobject_class = self.object_class_for(name)
            self._per_listener[name] = ctx
        return ctx

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._current
        if sslobj.context is not current:
            sslobj.context = current
        return None

    def reload(self, cert: str | None = None, key: str | None = None, min_version: str | None = None) -> None:
        """Re-read the certificate (raises TLSError and keeps the old one on failure)."""
        old = (self.cert, self.key, self.min_version)
        self.cert, self.key = cert or self.cert, key or self.key
        self.min_version = min_version or self.min_version
        try:
            fresh = self._build()
        except TLSError:
            self.cert, self.key, self.min_version = old
            raise
        self._current = fresh
        # The minimum version is checked before SNI, so it must be set on the listener context too.
        for ctx in self._per_listener.values():
            ctx.minimum_version = _VERSIONS[self.min_version]


def load_for_config(cfg) -> TLSContexts:
    """TLS contexts for a Config; creates a self-signed certificate when none is configured or present."""
    cert, key = cfg.tls.cert, cfg.tls.key
    if not cert:
        tls_dir = cfg.data_dir / "tls"
        cert, key = str(tls_dir / "cert.pem"), str(tls_dir / "key.pem")
        if not (os.path.exists(cert) and os.path.exists(key)):
            make_self_signed(Path(cert), Path(key), cfg.server.hostname)
            log.warning("no certificate configured: created a self-signed one for %s in %s "
                        "(set tls.cert and tls.key, or replace these files and send SIGHUP)",
                        cfg.server.hostname, tls_dir)
    return TLSContexts(cert, key, cfg.tls.min_version)
