"""An in-process queue for tests: real Directory files, real MaildirStore, real spool on disk.

    env = QueueEnv(tmp_path, users=["alice@example.test"], aliases={"team@example.test": ["alice@..."]})
    async with env.running(remote=FakeRemote(...)) as manager:
        qid = await env.spool.enqueue(sender, rcpts, [b"..."], {})
        await until(lambda: env.inbox("alice@example.test"))

`env.running()` is one "server process lifetime": a fresh Directory, store, spool and
manager over the same data_dir, so a test can stop and start again over the same disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

from harness import inbox_messages, maildir_path, write_config

from mailstack import config as config_mod
from mailstack.authlimit import LoginThrottle
from mailstack.directory import Directory
from mailstack.events import EventBus
from mailstack.fsutil import GroupSync
from mailstack.queue.local import LocalTransport
from mailstack.queue.manager import QueueManager
from mailstack.queue.spool import Spool
from mailstack.queue.types import RecipientResult
from mailstack.services import Services, SessionRegistry

HOSTNAME = "mail.example.test"


def _store_class():
    from mailstack.store.maildir import MaildirStore
    return MaildirStore


def message(subject: str = "hello", msgid: str | None = None, body: str = "Hi there.\r\n", extra: str = "") -> bytes:
    msgid = msgid or f"<{subject.replace(' ', '.')}.{time.monotonic_ns()}@client.test>"
    return (f"From: Carol <carol@example.test>\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: {msgid}\r\n{extra}\r\n{body}").encode()


async def until(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition()` on the loop until truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class FakeRemote:
    """The manager's RemoteTransport seam (not the network): answers from a script.
    script(call_number, recipient) -> (status, reply)."""

    def __init__(self, script=None, relay: str = "mx.remote.test[192.0.2.1]:25") -> None:
        self.script = script or (lambda n, r: ("sent", "250 2.0.0 Ok"))
        self.relay = relay
        self.calls: list[dict] = []
        self.gate: asyncio.Event | None = None  # when set, deliveries wait for it
        self.closed = False

    async def deliver(self, message, recipients):
        data = Spool.read_message(message.source)
        self.calls.append({"time": time.monotonic(), "qid": message.qid, "sender": message.sender,
                           "recipients": list(recipients), "data": data, "meta": dict(message.meta)})
        if self.gate is not None:
            await self.gate.wait()
        n = len(self.calls)
        out = []
        for r in recipients:
            status, reply = self.script(n, r)
            out.append(RecipientResult(r, status, reply, self.relay))
        return out

    async def close(self):
        self.closed = True


class QueueEnv:
    def __init__(self, tmp_path: Path, users=("alice@example.test", "bob@example.test", "carol@example.test"),
                 aliases: dict | None = None, domains=("example.test",), queue: dict | None = None) -> None:
        self.dir = Path(tmp_path)
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        q = {"retry_min": 0.2, "retry_max": 0.4}
        q.update(queue or {})
        self.config_path = write_config(self.dir / "config.toml", {
            "server": {"hostname": HOSTNAME, "data_dir": str(self.data_dir)},
            "queue": q,
        })
        self.cfg = config_mod.load(self.config_path)
        (self.data_dir / "domains").write_text("".join(f"{d}\n" for d in domains))
        # The queue only asks whether an account exists; no password hashing needed here.
        (self.data_dir / "accounts").write_text("".join(f"{u}:x\n" for u in users))
        (self.data_dir / "aliases").write_text(
            "".join(f"{s}: {', '.join(t)}\n" for s, t in (aliases or {}).items()))
        self.spool: Spool | None = None
        self.manager: QueueManager | None = None
        self.services: Services | None = None
        self.control = None

    def make_services(self) -> Services:
        cfg = config_mod.load(self.config_path)
        self.cfg = cfg
        group_sync = GroupSync()
        services = Services(config=cfg, directory=Directory(cfg.data_dir, cfg.delivery.plus_separator),
                            events=EventBus(), tls=None, throttle=LoginThrottle(), sessions=SessionRegistry())
        services.extra["group_sync"] = group_sync
        services.store = _store_class()(cfg.mail_dir, services.events, group_sync)
        services.spool = Spool(cfg.queue_dir, group_sync)
        return services

    @contextlib.asynccontextmanager
    async def running(self, remote=None, control: bool = False, grace: float = 2.0):
        services = self.make_services()
        self.services, self.spool = services, services.spool
        manager = QueueManager(services, services.spool, LocalTransport(services), remote)
        services.queue = manager
        self.manager = manager
        await manager.start()
        server = None
        if control:
            from mailstack.queue.control import start_control
            server = await start_control(services)
        try:
            yield manager
        finally:
            if server is not None:
                server.close()
                await server.wait_closed()
            await manager.stop(grace)

    # --- looking at results -------------------------------------------------------------
    def maildir(self, address: str) -> Path:
        return maildir_path(self.data_dir, address)

    def inbox(self, address: str) -> list[bytes]:
        return inbox_messages(self.data_dir, address)

    def queue_files(self, state: str | None = None) -> list[str]:
        """The queue's files as `state/name`.  The directories are listed one after the other
        while the queue moves files between them from its threads, so one pass can miss a
        file in flight (deferred -> active after "active" was listed): passes are repeated
        until two agree."""
        qdir = self.data_dir / "queue"
        states = [state] if state else ["incoming", "active", "deferred", "hold", "maildrop"]

        def one_pass() -> list[str]:
            out = []
            for s in states:
                d = qdir / s
                if d.is_dir():
                    out += [f"{s}/{n}" for n in sorted(os.listdir(d)) if not n.startswith(".")]
            return out

        previous = one_pass()
        while (current := one_pass()) != previous:
            previous = current
        return current

    async def cli(self, *args: str, input: bytes | None = None) -> tuple[int, str, str]:
        """Run `python -m mailstack ARGS --config ...` without blocking the loop (the server
        under test may be this very loop)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailstack", *args, "--config", str(self.config_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(input), 60)
        return proc.returncode, out.decode(), err.decode()
