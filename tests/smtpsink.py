"""Receiving SMTP servers for outbound tests: aiosmtpd on 127.0.0.x, in their own thread.

    sink = Sink("127.0.0.2", port, tls=certs.server_context("mx1.example.test"),
                pipelining=True, rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"}).start()
    sink.messages  -> [Received(...)]   sink.stop()

Plus certificate helpers: a test CA and leaf certificates it signs (real X.509 made
with `cryptography`), and self-signed ones.
"""
from __future__ import annotations

import datetime
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from harness import PORTS_HANDED_OUT


def free_port_on(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (so MX hosts on 127.0.0.2/.3 can share a port)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
            ok = True
            for h in hosts[1:]:
                with socket.socket() as t:
                    try:
                        t.bind((h, port))
                    except OSError:
                        ok = False
                        break
            if ok and port not in PORTS_HANDED_OUT:
                PORTS_HANDED_OUT.add(port)
                return port
    raise RuntimeError("no common free port")


@dataclass
class Received:
    session: int  # identity of the SMTP connection that carried the message
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    mail_options: list[str]
    helo: str
    auth_user: str | None = None


class _Handler:
    def __init__(self, sink: "Sink") -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.sink.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.sink.mail_reply:
            return self.sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.sink.rcpt_seen.append(address)
        reply = self.sink.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.data_reply:
            return self.sink.data_reply
        self.sink.sessions.add(id(session))
        auth = session.auth_data.login.decode() if session.authenticated and session.auth_data else None
        self.sink.messages.append(Received(id(session), envelope.mail_from, list(envelope.rcpt_tos),
                                           envelope.original_content,
                                           session.ssl is not None or
                                           server.transport.get_extra_info("ssl_object") is not None,
                                           list(envelope.mail_options), session.host_name or "", auth))
        return "250 2.0.0 Ok: queued"


class _Controller(Controller):
    def __init__(self, sink, **kw):
        self.sink = sink
        super().__init__(_Handler(sink), hostname=sink.host, port=sink.port, **kw)

    def factory(self):
        server = super().factory()
        self.sink.connections += 1
        return server


class Sink:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None, pipelining: bool = True,
                 smtputf8: bool = True, size_limit: int = 33554432, rcpt_replies: dict | None = None,
                 mail_reply: str | None = None, data_reply: str | None = None,
                 auth: tuple[str, str] | None = None, name: str = "sink.test",
                 implicit_tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.pipelining, self.smtputf8, self.size_limit = pipelining, smtputf8, size_limit
        self.rcpt_replies = rcpt_replies or {}
        self.mail_reply, self.data_reply = mail_reply, data_reply
        self.auth, self.name = auth, name
        self.implicit_tls = implicit_tls  # TLS from the first byte (port 465 style)
        self.messages: list[Received] = []
        self.sessions: set[int] = set()
        self.rcpt_seen: list[str] = []  # every RCPT TO address, accepted or not
        self.connections = 0
        self._controller: Controller | None = None

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and self.auth is not None and \
            (auth_data.login.decode(), auth_data.password.decode()) == self.auth
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def start(self) -> "Sink":
        kw = dict(tls_context=self.tls, enable_SMTPUTF8=self.smtputf8, data_size_limit=self.size_limit,
                  ident="sink")
        if self.auth:
            # aiosmtpd only knows STARTTLS as "TLS"; under implicit TLS the whole session is encrypted.
            kw.update(authenticator=self._authenticator, auth_require_tls=self.implicit_tls is None)
        else:
            kw.update(auth_exclude_mechanism=["LOGIN", "PLAIN"])
        if self.implicit_tls is not None:
            kw["ssl_context"] = self.implicit_tls
        self._controller = _Controller(self, **kw)
        self._controller.start()
        self.connections = 0  # the controller's own readiness probe is not a client
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


class ScriptedServer:
    """A misbehaving SMTP server: `script(sock)` runs for each connection (blocking socket I/O)."""

    def __init__(self, host: str, port: int, script) -> None:
        import socketserver

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(10)
                try:
                    script(self.request)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def start(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


# --- certificates ---------------------------------------------------------------
@dataclass
class CA:
    dir: Path
    key: object = None
    cert: object = None
    path: Path = field(default=None)  # PEM of the CA certificate

    @classmethod
    def create(cls, directory: Path) -> "CA":
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailstack test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "ca.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert, path)

    def issue(self, hostname: str) -> tuple[Path, Path]:
        """A leaf certificate for `hostname` signed by this CA: (cert path, key path)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.dir / f"{hostname}.pem", self.dir / f"{hostname}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def self_signed_context(directory: Path, hostname: str) -> ssl.SSLContext:
    from mailstack.tls import make_self_signed
    cert, key = directory / f"self-{hostname}.pem", directory / f"self-{hostname}.key"
    make_self_signed(cert, key, hostname)
    return server_context(cert, key)
