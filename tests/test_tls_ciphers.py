"""TLS 1.2 offers AEAD suites only (Mozilla intermediate), on every listener, implicit TLS and
STARTTLS; the outbound client prefers the same.  Real handshakes against the real server."""
from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from harness import MailServer
from mailstack.smtp.client import tls_context
from mailstack.tls import TLSContexts

CBC = ["ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "AES128-SHA256", "ECDHE-ECDSA-AES128-SHA"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with MailServer(tmp_path_factory.mktemp("tls"), listeners=("smtp", "submissions", "imaps", "pop3s")) as srv:
        srv.start()
        yield srv
        assert srv.stop() == 0


def client(cipher: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            return tls.cipher()[0]


@pytest.mark.parametrize("listener", ["submissions", "imaps", "pop3s"])
def test_implicit_tls_listeners_refuse_cbc_and_take_aead(srv, listener):
    for cipher in CBC:
        with pytest.raises(ssl.SSLError):
            handshake(srv.ports[listener], client(cipher))
    assert handshake(srv.ports[listener], client("ECDHE-ECDSA-AES128-GCM-SHA256")) == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert "CHACHA20" in handshake(srv.ports[listener], client("ECDHE-ECDSA-CHACHA20-POLY1305"))


def test_starttls_refuses_cbc(srv):
    for cipher in CBC[:2]:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            with pytest.raises(ssl.SSLError):
                s.starttls(context=client(cipher))
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.starttls(context=client("ECDHE-ECDSA-AES256-GCM-SHA384"))
        assert s.sock.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"


def test_server_and_client_cipher_lists(srv):
    server = TLSContexts(str(srv.cert_path), str(srv.data_dir / "tls" / "key.pem"))._build()
    tls12 = [c for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] for c in tls12)
    for level in ("may", "encrypt", "verify"):
        names = tls_context(level).get_ciphers()
        first = names[:12]  # the TLS 1.3 suites, then the nine AEAD TLS 1.2 suites
        assert all(c["aead"] for c in first), [c["name"] for c in first]
        assert not any(c["name"] in ("AES128-SHA256", "ECDHE-ECDSA-AES128-SHA") for c in names)
