"""Start a real mailstack server process on free loopback ports, for tests.

    srv = MailServer(tmp_path, overrides={"smtp": {"bare_lf": "normalize"}}, loop="uvloop")
    srv.add_domain("example.test"); srv.add_user("alice@example.test", "pw")
    srv.start()                       # returns when every listener accepts connections
    srv.ports["submission"]           # the port of a listener
    srv.cli("queue", "list")          # run `mailstack ...` against this server's config
    srv.kill() / srv.stop()           # SIGKILL / SIGTERM (asserts exit code 0)

Certificates are self-signed, made by the server in its data_dir on first start;
`srv.client_tls()` gives an SSLContext that trusts exactly that certificate.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

LISTENERS = ("smtp", "submissions", "submission", "imap", "imaps", "pop3", "pop3s", "managesieve")
HOSTNAME = "mail.example.test"


PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this test run has handed out before: the kernel may
    give a port it just gave (and saw closed) again at once, and two listeners of one
    server configured on the same port stop its start."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in PORTS_HANDED_OUT:
            PORTS_HANDED_OUT.add(port)
            return port
    raise RuntimeError("no loopback port left that this run has not handed out")


def wait_for(condition, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def maildir_path(data_dir: Path, address: str) -> Path:
    local, domain = address.lower().rsplit("@", 1)
    return Path(data_dir) / "mail" / domain / local


def inbox_messages(data_dir: Path, address: str, folder: str | None = None) -> list[bytes]:
    """Bytes of every message in the account's INBOX, or in `folder` (new/ and cur/)."""
    root = maildir_path(data_dir, address) / (f".{folder}" if folder else "")
    out = []
    for sub in ("new", "cur"):
        d = root / sub
        if d.is_dir():
            out += [p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")]
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


_EMPTY_DNS = None


def empty_dns():
    """One loopback DNS server for the whole test run that answers NXDOMAIN for every name."""
    global _EMPTY_DNS
    if _EMPTY_DNS is None:
        from dnsserver import DNSServer
        _EMPTY_DNS = DNSServer({}).start()
    return _EMPTY_DNS


class MailServer:
    def __init__(self, tmp_path: Path, overrides: dict | None = None, loop: str = "asyncio",
                 listeners=LISTENERS) -> None:
        self.dir = Path(tmp_path)
        self.data_dir = self.dir / "data"
        self.ports = {name: free_port() for name in listeners}
        sections: dict[str, dict] = {
            # user = root: tests run as root in directories only root can reach (tmp_path)
            "server": {"hostname": HOSTNAME, "data_dir": str(self.data_dir), "event_loop": loop,
                       "shutdown_grace": 3.0, "log_level": "info", "user": "root"},
            "listen": {name: ([f"127.0.0.1:{self.ports[name]}"] if name in self.ports else [])
                       for name in LISTENERS},
            "auth": {"fail_delay": 0.05, "fail_delay_max": 0.2},
            "queue": {"retry_min": 0.5, "retry_max": 2.0},
        }
        # Tests talk only to servers they started: DNS (SPF, DMARC, MX…) goes to a loopback
        # server that knows no names unless a test brings its own zone.
        sections["dns"] = {"nameservers": [empty_dns().address], "timeout": 2.0}
        for section, keys in (overrides or {}).items():
            sections.setdefault(section, {}).update(keys)
        self.config_path = write_config(self.dir / "config.toml", sections)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "server.log"

    # --- CLI ------------------------------------------------------------------
    def cli(self, *args: str, input: str | bytes | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        result = subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(self.config_path)],
                                input=input, capture_output=True, text=text, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if check and result.returncode != 0:
            raise AssertionError(f"mailstack {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def add_domain(self, domain: str) -> None:
        self.cli("domain", "add", domain)

    def add_user(self, address: str, password: str) -> None:
        self.cli("user", "add", address, "--password-stdin", "--allow-weak", input=password + "\n")

    # --- process ----------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "MailServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailstack", "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def all_up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            for port in self.ports.values():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return True

        wait_for(all_up, timeout, interval=0.05, what="listeners to accept connections")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, *needles, timeout: float = 10.0) -> str:
        """The log once every needle (a str, or a compiled regex searched in it) is in it.
        The server's log lines are made and written by its log thread, a moment after the
        event they tell of (the reply may reach the client first): wait, never read once."""
        def found() -> str | None:
            log = self.log()
            ok = all((n.search(log) if isinstance(n, re.Pattern) else n in log) for n in needles)
            return log if ok else None
        return wait_for(found, timeout, what=f"log lines {needles!r}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self._log.close()

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    # --- helpers for clients --------------------------------------------------------
    @property
    def cert_path(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    def client_tls(self, check_hostname: bool = False) -> ssl.SSLContext:
        """Trusts exactly the server's certificate. Host name checking is off by default because
        clients connect to 127.0.0.1 while the certificate names HOSTNAME; pass
        server_hostname=HOSTNAME with check_hostname=True to check it too."""
        ctx = ssl.create_default_context(cafile=str(self.cert_path))
        ctx.check_hostname = check_hostname
        return ctx

    def maildir(self, address: str) -> Path:
        return maildir_path(self.data_dir, address)

    def inbox_messages(self, address: str) -> list[bytes]:
        """Bytes of every message in the account's INBOX (new/ and cur/)."""
        return inbox_messages(self.data_dir, address)

    def __enter__(self) -> "MailServer":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
