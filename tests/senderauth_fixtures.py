"""Keys, signed messages and zone data for the sender-authentication tests."""
from __future__ import annotations

import base64
import email.utils
import functools
import subprocess

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@functools.lru_cache(maxsize=None)
def rsa_key(bits: int = 2048, seed: int = 0) -> tuple[bytes, str]:
    """(private PEM, DKIM key record). `seed` only makes separate keys for separate uses."""
    if bits < 1024:  # cryptography refuses to make weak keys; openssl still can
        out = subprocess.run(["openssl", "genrsa", str(bits)], capture_output=True, check=True).stdout
        key = serialization.load_pem_private_key(out, password=None, unsafe_skip_rsa_key_validation=True)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@functools.lru_cache(maxsize=None)
def ed25519_key() -> tuple[bytes, str]:
    """(private key as dkimpy wants it: base64 of the 32-byte seed, DKIM key record)."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}"


def message(from_addr: str, to: str = "alice@example.test", subject: str = "Hello",
            body: str = "Hi Alice,\r\n\r\nthe report is attached.\r\n", size: int = 0) -> bytes:
    """A plain message with CRLF line ends; `size` pads the body to about that many bytes."""
    head = (f"From: Sender <{from_addr}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    text = head + body
    while len(text) < size:
        text += "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    return text.encode()


def sign(msg: bytes, domain: str, selector: str, key: bytes, algorithm: bytes = b"rsa-sha256",
         **kw) -> bytes:
    sig = dkimpy.sign(msg, selector.encode(), domain.encode(), key, signature_algorithm=algorithm,
                      canonicalize=(b"relaxed", b"relaxed"), **kw)
    return sig + msg
