"""An in-process POP3 server for tests: real listeners (pop3 + pop3s) on free loopback ports,
real TLS, a real directory and the real store, on an event loop in a background thread,
so blocking clients (poplib, raw sockets) can talk to it from the test."""
from __future__ import annotations

import asyncio
import poplib
import socket
import ssl
import threading
from pathlib import Path

from mailstack import config as config_mod
from mailstack.authlimit import LoginThrottle
from mailstack.directory import Directory
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.pop3.server import start_listener
from mailstack.services import Services, SessionRegistry
from mailstack.tls import TLSContexts, make_self_signed

HOSTNAME = "mail.example.test"
USER, PASSWORD = "alice@example.test", "alice pw"
OTHER, OTHER_PASSWORD = "bob@example.test", "bob-pw"


def make_store(cfg, events):
    from mailstack.store.maildir import MaildirStore
    return MaildirStore(cfg.mail_dir, events, GroupSync())


class POP3Server:
    def __init__(self, tmp_path: Path, pop3: dict | None = None, auth: dict | None = None,
                 loop: str = "asyncio") -> None:
        self.dir = Path(tmp_path)
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        raw = {"server": {"hostname": HOSTNAME, "data_dir": str(self.data_dir)},
               "auth": {"fail_delay": 0.05, "fail_delay_max": 0.2, **(auth or {})},
               "pop3": pop3 or {}}
        self.cfg = config_mod.from_dict(raw, base=self.dir)
        self.cert = self.data_dir / "tls" / "cert.pem"
        if not self.cert.exists():
            make_self_signed(self.cert, self.data_dir / "tls" / "key.pem", HOSTNAME)
        directory = Directory(self.data_dir)
        if not directory.accounts:
            directory.add_domain("example.test")
            directory.add_user(USER, PASSWORD)
            directory.add_user(OTHER, OTHER_PASSWORD)
            directory.save()
        if loop == "uvloop":  # what `mailstack serve` runs on when uvloop is installed
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.services: Services = self.call(self._build(directory))
        self.ports = {}
        self.listeners = []
        for name in ("pop3", "pop3s"):
            server = self.call(start_listener(self.services, name, "127.0.0.1", 0))
            self.listeners.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]

    async def _build(self, directory: Directory) -> Services:
        cfg = self.cfg
        events = EventBus()
        services = Services(config=cfg, directory=directory, events=events,
                            tls=TLSContexts(str(self.cert), str(self.data_dir / "tls" / "key.pem")),
                            throttle=LoginThrottle(cfg.auth.fail_delay, cfg.auth.fail_delay_max,
                                                   cfg.auth.fail_window),
                            sessions=SessionRegistry())
        services.store = make_store(cfg, events)
        return services

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def deliver(self, account: str, message: bytes, delivery_id: str | None = None) -> None:
        import uuid
        self.call(self.services.store.deliver(account, message, delivery_id or uuid.uuid4().hex))

    def stop(self) -> None:
        async def shutdown():
            for server in self.listeners:
                server.close()
            await self.services.sessions.drain(0.5)
        try:
            self.call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # --- clients ------------------------------------------------------------------
    def client_tls(self) -> ssl.SSLContext:
        # Trust exactly the server's certificate; its name is mail.example.test, we dial 127.0.0.1.
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = False
        return ctx

    def pop3(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=10)

    def pop3_stls(self) -> poplib.POP3:
        p = self.pop3()
        p.stls(self.client_tls())
        return p

    def pop3s(self) -> poplib.POP3_SSL:
        return poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], context=self.client_tls(), timeout=10)

    def login(self, user: str = USER, password: str = PASSWORD) -> poplib.POP3_SSL:
        p = self.pop3s()
        p.user(user)
        p.pass_(password)
        return p

    def raw(self, tls: bool = True) -> "RawClient":
        sock = socket.create_connection(("127.0.0.1", self.ports["pop3s" if tls else "pop3"]), timeout=10)
        if tls:
            sock = self.client_tls().wrap_socket(sock, server_hostname=HOSTNAME)
        return RawClient(sock)


class RawClient:
    """Bytes on a socket, for what poplib will not send."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline(100000)

    def cmd(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.line()

    def multiline(self) -> list[bytes]:
        out = []
        while (line := self.line()) != b".\r\n":
            if not line:
                raise EOFError("connection closed in a multi-line response")
            out.append(line)
        return out

    def closed_by_server(self) -> bool:
        try:
            return self.file.read(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass
