"""Builds the one event loop: TLS, directory, store, spool, queue manager, listeners; signals.

Start order matters for the invariants: every port is bound before anything is
delivered (a bind failure stops the start with one line naming the listener);
the queue manager starts after the listeners so work left from a crash is taken
up by a server that is otherwise ready; privileges are dropped before the first
connection is accepted.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import importlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from . import config as config_mod
from .defense.guard import LoginGuard
from .config import Config, ConfigError
from .directory import Directory, DirectoryError
from .events import EventBus
from .fsutil import GroupSync
from .privileges import PrivilegeError
from .services import Services, SessionRegistry
from .tls import TLSError, load_for_config

log = logging.getLogger("mailstack.server")

# listener name -> module that serves it
PROTOCOL_MODULES = {
    "smtp": "mailstack.smtp.server", "submissions": "mailstack.smtp.server",
    "submission": "mailstack.smtp.server",
    "imap": "mailstack.imap.server", "imaps": "mailstack.imap.server",
    "pop3": "mailstack.pop3.server", "pop3s": "mailstack.pop3.server",
    "managesieve": "mailstack.managesieve.server",
}
DIRECTORY_POLL_SECONDS = 1.0


class StartError(Exception):
    """The server cannot start; str() is the one line to print."""


def choose_loop(kind: str) -> None:
    """Install the event loop policy: uvloop when asked or (auto) when importable."""
    if kind == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise StartError("server.event_loop: uvloop requested but not installed") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def prepare_data_dir(cfg: Config) -> None:
    os.umask(0o077)  # for the life of the process: nothing we create is group- or world-readable
    try:
        for d in (cfg.data_dir, cfg.queue_dir, cfg.mail_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StartError(f"server.data_dir: cannot create {e.filename}: {e.strerror}") from None


def _bind_reason(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address already in use"
    if e.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    return e.strerror or str(e)


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.listeners: list[tuple[str, asyncio.AbstractServer]] = []
        self.control: asyncio.AbstractServer | None = None
        self.public: asyncio.AbstractServer | None = None  # sendmail/mailq of every local user
        self.metrics_http: asyncio.AbstractServer | None = None
        self.stopping = asyncio.Event()
        self.services: Services | None = None
        self._tasks: list[asyncio.Task] = []
        self.indexer = None  # store/background.py's BackgroundIndexer, when on

    # --- start -------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        prepare_data_dir(cfg)
        try:
            directory = Directory.for_config(cfg)
        except DirectoryError as e:
            raise StartError(str(e)) from None
        if cfg.hostname_note:
            log.warning("%s", cfg.hostname_note)
        try:
            tls = load_for_config(cfg)
        except TLSError as e:
            raise StartError(str(e)) from None
        group_sync = GroupSync()
        services = Services(
            config=cfg, directory=directory, events=EventBus(), tls=tls,
            throttle=LoginGuard.from_config(cfg),
            sessions=SessionRegistry(),
        )
        services.extra["group_sync"] = group_sync
        services.extra["reload"] = self.reload
        services.extra["server"] = self
        services.extra["status"] = self.status
        self.services = services

        from .store.maildir import MaildirStore
        services.store = MaildirStore(cfg.mail_dir, services.events, group_sync)
        services.store.idle_messages = cfg.server.mailbox_cache_messages
        from .quotas import install as install_quota
        install_quota(services)  # usage in maildirsize, limits from the directory (quotas.py)
        self._tasks.append(asyncio.create_task(self._clean_maildir_tmp(time.time())))
        await self._start_queue(services, group_sync)
        from .pipeline import build_stages
        services.stages = build_stages(services)
        await self._bind_listeners(services)  # bound, not yet accepting
        await self._start_metrics(services)
        # Ports are bound and keys read: from here on nothing needs root.  Dropped before the
        # control socket is made (so the user owns it), before the queue delivers anything
        # and before the first connection is accepted.
        from .privileges import drop_privileges
        drop_privileges(cfg)
        self._start_control(services)
        if services.queue is not None:
            await services.queue.start()
        for _, listener in self.listeners:
            await listener.start_serving()
        self._tasks.append(asyncio.create_task(self._watch_directory()))
        if cfg.server.background_index:
            # mail copied into the Maildirs while the server was down gets its index entries
            # and full-text rows now, not at the first client's FETCH (store/background.py)
            from .store.background import BackgroundIndexer
            from .imap import session as imap_session
            sessions = services.sessions
            self.indexer = BackgroundIndexer(  # waits while mail comes in, POP3 users read, IMAP commands run
                services.store, busy=lambda: sessions.count("smtp") > 0 or sessions.count("pop3") > 0
                or imap_session.commands_running > 0)
            self.indexer.start()
        log.info("mailstack ready as %s: %s", cfg.server.hostname,
                 ", ".join(f"{name} {_addr(s)}" for name, s in self.listeners) or "no listeners")

    async def _start_queue(self, services: Services, group_sync: GroupSync) -> None:
        from .queue.spool import Spool
        from .queue.manager import QueueManager
        from .queue.local import LocalTransport

        services.spool = Spool(self.cfg.queue_dir, group_sync)
        remote = None
        if getattr(self.cfg.delivery, "outbound", False):
            try:
                remote_mod = importlib.import_module("mailstack.queue.remote")
                remote = remote_mod.RemoteDelivery(services)
            except ImportError:
                log.warning("outbound delivery is not available in this build; remote mail stays deferred")
        services.queue = QueueManager(services, services.spool, LocalTransport(services), remote)

    async def _bind_listeners(self, services: Services) -> None:
        for name, addrs in self.cfg.listen.as_dict().items():
            if not addrs:
                continue
            module = importlib.import_module(PROTOCOL_MODULES[name])
            for host, port in addrs:
                try:
                    server = await module.start_listener(services, name, host, port, start_serving=False)
                except OSError as e:
                    for _, s in self.listeners:
                        s.close()
                    raise StartError(f"listen.{name}: cannot listen on {host}:{port}: {_bind_reason(e)}") from None
                self.listeners.append((name, server))

    async def _start_metrics(self, services: Services) -> None:
        if not self.cfg.metrics.listen:
            return
        from .metrics import start_http
        host, port = config_mod.parse_hostport("metrics.listen", self.cfg.metrics.listen)
        try:
            self.metrics_http = await start_http(services, host, port)
        except OSError as e:
            for _, s in self.listeners:
                s.close()
            raise StartError(f"metrics.listen: cannot listen on {host}:{port}: {_bind_reason(e)}") from None

    def _start_control(self, services: Services) -> None:
        try:
            control = importlib.import_module("mailstack.queue.control")
        except ImportError:
            return
        self._tasks.append(asyncio.create_task(self._control(control, services)))

    async def _control(self, control, services: Services) -> None:
        try:
            self.control = await control.start_control(services)
        except OSError as e:
            log.error("control socket %s: %s (CLI actions will act on files only)",
                      self.cfg.control_socket, e.strerror or e)
        from .queue import pickup
        try:
            self.public = await pickup.start_public(services)
        except OSError as e:
            log.error("local submission socket: %s (only root and the server's user can use sendmail)",
                      e.strerror or e)

    async def _clean_maildir_tmp(self, started: float) -> None:
        """Deliveries a kill cut short leave files in tmp/: remove those older than this process."""
        from .store.maildir import clean_stale_tmp
        try:
            n = await asyncio.to_thread(clean_stale_tmp, self.cfg.mail_dir, started)
        except OSError as e:
            log.error("cleaning Maildir tmp/ folders failed: %s", e)
            return
        if n:
            log.info("removed %d stale file(s) from Maildir tmp/ folders (left by an earlier stop)", n)

    async def _watch_directory(self) -> None:
        """Pick up CLI edits of domains/accounts/aliases without a restart."""
        while True:
            await asyncio.sleep(DIRECTORY_POLL_SECONDS)
            try:
                if await asyncio.to_thread(self.services.directory.reload_if_changed):
                    log.info("directory reloaded: %d domains, %d accounts, %d aliases",
                             len(self.services.directory.domains), len(self.services.directory.accounts),
                             len(self.services.directory.aliases))
            except DirectoryError as e:
                log.error("directory not reloaded, keeping the previous one: %s", e)
            except Exception:
                log.exception("directory reload failed")

    async def status(self) -> dict:
        """What `mailstack status` and the health check report."""
        from .tls import cert_not_after
        services = self.services
        queue_dir = self.cfg.queue_dir

        def count_queue() -> dict[str, int]:  # a directory listing per state: off the loop
            sizes = {}
            for state in ("incoming", "active", "deferred", "hold", "maildrop"):
                try:
                    sizes[state] = sum(1 for e in os.scandir(queue_dir / state)
                                       if not e.name.startswith(".") and e.is_file())
                except FileNotFoundError:
                    sizes[state] = 0
            return sizes

        queue_sizes = await asyncio.to_thread(count_queue)
        expiry = await asyncio.to_thread(cert_not_after, services.tls.cert)
        return {
            "hostname": self.cfg.server.hostname,
            "hostname_note": self.cfg.hostname_note,
            "postmaster": services.directory.postmaster_account(),
            "pid": os.getpid(),
            "listeners": [{"name": name, "address": _addr(s), "up": s.is_serving()}
                          for name, s in self.listeners],
            "sessions": dict(services.sessions.per_listener),
            "queue": queue_sizes,
            "last_delivery_error": getattr(services.queue, "last_error", None),
            "certificate": {"path": services.tls.cert,
                            "not_after": expiry.isoformat() if expiry else None},
        }

    # --- reload --------------------------------------------------------------------
    def reload(self) -> str:
        """SIGHUP: re-read config, accounts and certificates. A bad config is refused and the old
        one stays in force. Returns a one-line result."""
        services = self.services
        path = self.cfg.path
        try:
            new = config_mod.load(path)
            if new.listen.as_dict() != self.cfg.listen.as_dict():
                log.warning("reload: listener addresses changed; they take effect at the next restart")
            if bool(new.proxy.trusted) != bool(self.cfg.proxy.trusted):
                log.warning("reload: proxy.trusted turned %s; that takes effect at the next restart "
                            "(a changed list applies now)", "on" if new.proxy.trusted else "off")
            if new.server.data_dir != self.cfg.server.data_dir:
                raise ConfigError("server.data_dir: cannot change on reload; restart instead")
            directory = Directory.for_config(new)
            services.tls.reload(new.tls.cert or None, new.tls.key or None, new.tls.min_version)
        except (ConfigError, DirectoryError, TLSError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return f"refused: {e}"
        self.cfg = new
        services.config = new
        services.directory.plus_separator = new.delivery.plus_separator
        services.directory.hostname, services.directory.postmaster = directory.hostname, directory.postmaster
        services.directory.system_users = directory.system_users
        services.directory.domains, services.directory.accounts, services.directory.aliases = (
            directory.domains, directory.accounts, directory.aliases)
        services.directory._mtimes = directory._mtimes
        services.directory.quotas = directory.quotas
        services.directory._verified.clear()
        services.throttle.reconfigure(new)
        services.store.idle_messages = new.server.mailbox_cache_messages  # at the next eviction
        if services.queue is not None and hasattr(services.queue, "reconfigure"):
            services.queue.reconfigure(new)
        from .pipeline import build_stages
        services.stages = build_stages(services)
        logging.getLogger().setLevel(new.server.log_level.upper())
        log.info("reloaded configuration, accounts and certificates")
        return "reloaded"

    # --- stop ------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop accepting, let sessions finish for up to shutdown_grace, stop the queue."""
        log.info("stopping: no new connections; %d sessions get %.0fs to finish",
                 self.services.sessions.count(), self.cfg.server.shutdown_grace)
        for _, server in self.listeners:
            server.close()
        if self.control is not None:
            self.control.close()
        if self.public is not None:
            self.public.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        if self.indexer is not None:  # first: the batch in flight ends, nothing more starts
            await self.indexer.stop()
        await self.services.sessions.drain(self.cfg.server.shutdown_grace)
        if self.services.queue is not None:
            await self.services.queue.stop()
        await _settle_store(self.services.store)
        defense = self.services.extra.get("defense")
        if defense is not None:
            await defense.state.close()
        for task in self._tasks:
            task.cancel()
        try:
            os.unlink(self.cfg.control_socket)
        except OSError:
            pass
        log.info("stopped")


async def _settle_store(store, timeout: float = 5.0) -> None:
    """What deliveries left to write after their reply (store/derived.py: index entries and
    full-text rows; quota lines): written now rather than redone after the start."""
    try:
        async with asyncio.timeout(timeout):
            for waiter in (getattr(store, "group_writer", None), getattr(store, "quota", None)):
                if waiter is not None:
                    await waiter.settled()
    except TimeoutError:
        log.warning("stopping: index entries or quota lines of recent deliveries not written "
                    "(made again when next needed)")


def _addr(server: asyncio.AbstractServer) -> str:
    socks = getattr(server, "sockets", None) or []
    out = []
    for s in socks:
        host, port = s.getsockname()[:2]
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ",".join(out)


# Disk work (spool writes, fsyncs, Maildir delivery) runs in worker threads. asyncio's default
# pool has cpu+4 threads; fsync waits on the disk, not the CPU, and 20 sessions finishing at
# once should each have a thread so that the filesystem can group their journal commits.
IO_THREADS = 64


async def _main(cfg: Config) -> int:
    server = Server(cfg)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mailstack-io"))
    # SIGTERM/SIGINT are caught from the start: one that comes while listeners already accept but
    # the start is not finished (a client or `docker stop` may be that quick) stops gracefully too.
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tune_gc()  # before start: its full collection must not hold up the first clients or log lines
    tune_malloc()
    await server.start()  # drops privileges once ports are bound, before accepting
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    await server.stop()
    return 0


def tune_gc() -> None:
    """What is loaded at start (modules, config, directory) is frozen out of the cyclic
    collector's sight, and the young generation is made large: with the defaults (700, 10,
    10) listing a 100,000-message mailbox (100,000 MessageInfo and as many tuples) ran
    collections over every live object several times and spent more time there than in
    the listing itself (measured: 0.074 s against 0.008 s for 100,000 pairs)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


GC_YOUNG_THRESHOLD = 50_000  # container allocations between young collections (CPython's default 700)


def tune_malloc() -> None:
    """Blocks of MMAP_THRESHOLD bytes and more stay mapped on their own, given back to the
    system when freed.  glibc starts there but raises the threshold (up to 32 MiB) each time
    a mapped block is freed, and then serves such blocks from its heaps, one per thread
    group, where freed memory stays resident (malloc_trim does not get it back: it is
    fragmented).  A 100,000-message mailbox's lists, then 20 clients streaming a 50 MB
    message in 256 KiB pieces, left the server ~80 MiB bigger for good (at 334 MiB instead
    of ~220 when a client next opened the big mailbox; docs/benchmarks.md, issue 16,
    session 6).  Setting the threshold keeps it where it is.  Not glibc (musl, macOS), or
    MALLOC_MMAP_THRESHOLD_ set by the operator: left as it is."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def serve(cfg: Config) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the exit code."""
    from . import logs
    logs.setup(cfg.server.log_level, cfg.server.log_format, background=True)
    try:
        choose_loop(cfg.server.event_loop)
        return asyncio.run(_main(cfg))
    except (StartError, PrivilegeError) as e:
        log.error("cannot start: %s", e)
        return 1
