"""An IMAP listener running in-process (its own event loop in a thread) on free loopback
ports, built from real Services objects, so blocking clients (imaplib, imapclient) can
talk to it from the test thread."""
from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

from mailstack import config as config_mod
from mailstack.authlimit import LoginThrottle
from mailstack.directory import Directory
from mailstack.events import EventBus
from mailstack.imap.server import start_listener
from mailstack.services import Services, SessionRegistry
from mailstack.tls import TLSContexts, make_self_signed

HOST = "mail.example.test"


_SHARED: dict[str, bytes] = {}


def _write_shared_credentials(data: Path, cert: Path, key: Path) -> None:
    """Accounts and certificate made once per test process: argon2 hashing and key
    generation are the slow part of starting a listener."""
    if not _SHARED:
        tmp = data / ".shared"
        tmp.mkdir()
        make_self_signed(tmp / "cert.pem", tmp / "key.pem", HOST)
        d = Directory(tmp)
        d.add_domain("example.test")
        d.add_user("alice@example.test", "secret")
        d.add_user("bob@example.test", "hunter2")
        d.save()
        for name in ("cert.pem", "key.pem", "domains", "accounts", "aliases"):
            _SHARED[name] = (tmp / name).read_bytes()
    cert.parent.mkdir(parents=True, exist_ok=True)
    cert.write_bytes(_SHARED["cert.pem"])
    key.write_bytes(_SHARED["key.pem"])
    for name in ("domains", "accounts", "aliases"):
        (data / name).write_bytes(_SHARED[name])


def make_store(kind: str, cfg, events):
    if kind == "maildir":
        from mailstack.fsutil import GroupSync  # noqa: PLC0415
        from mailstack.store.maildir import MaildirStore  # noqa: PLC0415
        return MaildirStore(cfg.mail_dir, events, GroupSync())
    from imap_memstore import MemStore  # noqa: PLC0415
    return MemStore(events)


class InProcessIMAP:
    def __init__(self, tmp_path: Path, imap_overrides: dict | None = None, store: str = "maildir",
                 loop: str = "asyncio", pop3: bool = False, pop3_overrides: dict | None = None) -> None:
        data = tmp_path / "data"
        data.mkdir()
        raw = {"server": {"data_dir": str(data), "hostname": HOST},
               "imap": {**(imap_overrides or {})}, "pop3": {**(pop3_overrides or {})},
               "auth": {"fail_delay": 0.05, "fail_delay_max": 0.2}}
        self.cfg = config_mod.from_dict(raw, base=tmp_path)
        cert, key = data / "tls" / "cert.pem", data / "tls" / "key.pem"
        _write_shared_credentials(data, cert, key)
        self.cert = cert
        d = Directory(data)
        self.events = EventBus()
        self.services = Services(config=self.cfg, directory=d, events=self.events,
                                 tls=TLSContexts(str(cert), str(key)),
                                 throttle=LoginThrottle(0.05, 0.2, 60), sessions=SessionRegistry())
        self.store_kind = store
        self.with_pop3 = pop3
        if loop == "uvloop":  # what `mailstack serve` runs on when uvloop is installed
            import uvloop  # noqa: PLC0415
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ports: dict[str, int] = {}
        self.servers = []
        self.call(self._start())

    async def _start(self) -> None:
        self.services.store = make_store(self.store_kind, self.cfg, self.events)
        for name in ("imap", "imaps"):
            srv = await start_listener(self.services, name, "127.0.0.1", 0)
            self.servers.append(srv)
            self.ports[name] = srv.sockets[0].getsockname()[1]
        if self.with_pop3:  # POP3 on the same store and event bus, as `mailstack serve` has it
            from mailstack.pop3.server import start_listener as start_pop3  # noqa: PLC0415
            for name in ("pop3", "pop3s"):
                srv = await start_pop3(self.services, name, "127.0.0.1", 0)
                self.servers.append(srv)
                self.ports[name] = srv.sockets[0].getsockname()[1]
        for acct in ("alice@example.test", "bob@example.test"):
            await self.services.store.ensure_account(acct)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def deliver(self, account: str, message: bytes, mailbox: str = "INBOX", flags=()) -> None:
        import uuid
        self.call(self.services.store.deliver(account, message, uuid.uuid4().hex, mailbox, flags))

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        return ctx

    def session_count(self) -> int:
        return self.services.sessions.count("imap")

    def close(self) -> None:
        async def stop():
            for s in self.servers:
                s.close()
            await self.services.sessions.drain(0)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=2)
        try:
            self.call(stop(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
