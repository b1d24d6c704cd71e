"""An in-process SMTP server for tests: the three SMTP listeners on free loopback ports,
real TLS (a self-signed certificate made here), a real Directory and the real Spool in
a temp dir, on an event loop (asyncio's or uvloop's) in a background thread, so that
blocking clients (smtplib, swaks, raw sockets) can talk to it from the test."""
from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import threading
from pathlib import Path

from mailstack import config as config_mod
from mailstack.authlimit import LoginThrottle
from mailstack.directory import Directory
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.queue.spool import Spool, read_envelope
from mailstack.services import Services, SessionRegistry
from mailstack.smtp.server import start_listener
from mailstack.tls import TLSContexts, make_self_signed

HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
USER, PASSWORD = "alice@example.test", "alice pw"
OTHER, OTHER_PASSWORD = "bob@example.test", "bob-pw"
LISTENERS = ("smtp", "submission", "submissions")

# Directories are the same for every test: hash the passwords (argon2, slow) once.
_DIRECTORY_FILES: dict[str, str] = {}


def _directory_files() -> dict[str, str]:
    if not _DIRECTORY_FILES:
        from mailstack.directory import hash_password
        _DIRECTORY_FILES["domains"] = f"{DOMAIN}\nother.test\n"
        _DIRECTORY_FILES["accounts"] = (f"{USER}:{hash_password(PASSWORD)}\n"
                                        f"{OTHER}:{hash_password(OTHER_PASSWORD)}\n")
        _DIRECTORY_FILES["aliases"] = (f"sales@{DOMAIN}: {USER}\npostmaster@{DOMAIN}: {USER}\n"
                                       f"@other.test: {USER}\n")  # a catch-all
    return _DIRECTORY_FILES


class SMTPServer:
    def __init__(self, tmp_path: Path, loop: str = "asyncio", smtp: dict | None = None,
                 extra_config: dict | None = None) -> None:
        self.dir = Path(tmp_path)
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name, text in _directory_files().items():
            (self.data_dir / name).write_text(text)
        raw = {"server": {"hostname": HOSTNAME, "data_dir": str(self.data_dir)},
               "auth": {"fail_delay": 0.05, "fail_delay_max": 0.2},
               "smtp": smtp or {}}
        for section, keys in (extra_config or {}).items():
            raw.setdefault(section, {}).update(keys)
        self.cfg = config_mod.from_dict(raw, base=self.dir)
        self.cert = self.data_dir / "tls" / "cert.pem"
        make_self_signed(self.cert, self.data_dir / "tls" / "key.pem", HOSTNAME)
        self.loop_kind = loop
        self.spool = Spool(self.cfg.queue_dir, GroupSync())
        self.spool.setup()
        self.enqueued: list[str] = []
        self.spool.on_enqueue = lambda msg: self.enqueued.append(msg.qid)
        self.services = Services(
            config=self.cfg, directory=Directory(self.data_dir), events=EventBus(),
            tls=TLSContexts(str(self.cert), str(self.data_dir / "tls" / "key.pem")),
            throttle=LoginThrottle(0.05, 0.2, 60), sessions=SessionRegistry(), spool=self.spool)
        self.ports: dict[str, int] = {}
        self._servers: list = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> "SMTPServer":
        if self.loop_kind == "uvloop":
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        async def bind():
            # SessionRegistry makes an asyncio.Event: build it on this loop.
            self.services.sessions = SessionRegistry()
            for name in LISTENERS:
                server = await start_listener(self.services, name, "127.0.0.1", 0)
                self._servers.append(server)
                self.ports[name] = server.sockets[0].getsockname()[1]

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(bind())
            except BaseException as e:  # surfaced to the test thread below
                errors.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def call(self, fn, timeout: float = 10):
        """Run fn() on the server loop and return its result."""
        async def wrapper():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is None:
            return

        async def close():
            for server in self._servers:
                server.close()
            for session in list(self.services.sessions.sessions):
                session.close_for_shutdown()
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            self.loop = None

    def __enter__(self) -> "SMTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients --------------------------------------------------------------------------
    def client_tls(self, check_hostname: bool = True) -> ssl.SSLContext:
        """Trusts exactly the server's certificate.  check_hostname=False for clients that
        verify against the address they connected to (smtplib: 127.0.0.1)."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = check_hostname
        return ctx

    def connect(self, listener: str = "smtp") -> "RawClient":
        return RawClient(self, listener)

    # --- the spool on disk -------------------------------------------------------------------
    def queued(self) -> list:
        """Envelope + bytes of every queued message, oldest first: [(QueuedMessage, bytes)]."""
        out = []
        incoming = self.cfg.queue_dir / "incoming"
        for path in sorted(incoming.iterdir()):
            msg = read_envelope(path)
            with open(path, "rb") as f:
                f.seek(msg.source.offset)
                out.append((msg, f.read(msg.source.size)))
        return out


class RawClient:
    """A line-level SMTP client over a plain socket (optionally upgraded to TLS)."""

    def __init__(self, server: SMTPServer, listener: str = "smtp", timeout: float = 10) -> None:
        self.server = server
        sock = socket.create_connection(("127.0.0.1", server.ports[listener]), timeout=timeout)
        if listener == "submissions":
            sock = server.client_tls().wrap_socket(sock, server_hostname=HOSTNAME)
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; buffered: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """One complete (possibly multi-line) reply, lines joined with newlines."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return "\n".join(x.decode() for x in lines)

    def cmd(self, text: str) -> str:
        self.send(text + "\r\n")
        return self.reply()

    def closed(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (after any buffered replies)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def starttls(self) -> None:
        assert self.cmd("STARTTLS").startswith("220 2.0.0")
        self.sock = self.server.client_tls().wrap_socket(self.sock, server_hostname=HOSTNAME)

    def login(self, user: str = USER, password: str = PASSWORD) -> str:
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {blob}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
