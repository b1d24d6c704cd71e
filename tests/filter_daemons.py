"""Real filter daemons for the tests, each with a private config on free loopback ports:
rspamd (normal worker, controller, proxy in milter mode), SpamAssassin's spamd (with a
private Bayes database, TELL allowed), ClamAV's clamd (with a signature database made
here: the EICAR test string), OpenDKIM, and the purepythonmilter test milter.

    with Rspamd(tmp) as r: r.url, r.controller_url, r.proxy_port
Each start() waits for the daemon to answer and raises with its log if it does not.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness import free_port, wait_for

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HERE = Path(__file__).parent


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Daemon:
    """A subprocess in its own process group, stopped by its pid (never by name)."""

    name = "daemon"

    def __init__(self, tmp: Path) -> None:
        self.dir = Path(tmp) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "out.log"
        self.proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], **kw) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     **kw)

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-4000:]

    def _wait(self, ready, timeout: float) -> None:
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return ready()
        try:
            wait_for(check, timeout, interval=0.1, what=f"{self.name} to start")
        except AssertionError:
            self.stop()
            raise AssertionError(f"{self.name} did not start:\n{self.log()}") from None

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def launch(self) -> None:
        """Start the process (returns at once; wait() for it to answer)."""
        raise NotImplementedError

    def wait(self) -> "Daemon":
        self._wait(*self._ready)
        return self

    def start(self) -> "Daemon":
        self.launch()
        return self.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Rspamd(Daemon):
    name = "rspamd"

    def __init__(self, tmp: Path, dns_address: str | None = None) -> None:
        super().__init__(tmp)
        self.normal, self.controller, self.proxy = free_port(), free_port(), free_port()
        self.dns_address = dns_address or f"127.0.0.1:{free_port()}"  # nobody there: lookups fail fast

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.normal}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller}"

    def launch(self) -> None:
        d = self.dir
        for sub in ("override.d", "local.d", "run", "db", "log"):
            (d / sub).mkdir(exist_ok=True)
        (d / "override.d/worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{self.normal}";\ncount = 1;\n')
        (d / "override.d/worker-controller.inc").write_text(f'bind_socket = "127.0.0.1:{self.controller}";\n')
        # The proxy in milter mode, scanning itself (no upstream to find).
        (d / "override.d/worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.proxy}";\nmilter = yes;\ntimeout = 120s;\n'
            'upstream "local" { default = yes; self_scan = yes; }\n')
        (d / "override.d/logging.inc").write_text(f'type = "file";\nfilename = "{d}/log/rspamd.log";\n'
                                                  'level = "info";\n')
        (d / "override.d/options.inc").write_text(
            f'dns {{ nameserver = ["{self.dns_address}"]; timeout = 0.3s; retransmits = 1; }}\n'
            f'url_tld = "{d}/tld.dat";\n')
        # rspamd compiles its 9,600 public suffixes at every start (a minute on a busy machine):
        # the tests' mail only uses these.
        (d / "tld.dat").write_text("com\nnet\norg\ntest\nexample\ninvalid\nlocalhost\n")
        # No greylisting (it needs redis, and a clean test message must get "no action").
        (d / "local.d/actions.conf").write_text("greylist = null;\n")
        (d / "local.d/greylist.conf").write_text("enabled = false;\n")
        shutil.chown(d, "_rspamd", "_rspamd")
        for p in d.rglob("*"):
            shutil.chown(p, "_rspamd", "_rspamd")
        self._spawn(["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf",
                     "--var", f"LOCAL_CONFDIR={d}", "--var", f"RUNDIR={d}/run", "--var", f"DBDIR={d}/db",
                     "--var", f"LOGDIR={d}/log"])

        def ready():
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:
                    ok = r.read().strip() == b"pong"
            except OSError:
                return False
            return ok and _port_open(self.proxy) and _port_open(self.controller)
        self._ready = (ready, 120)

    def log(self) -> str:
        path = self.dir / "log/rspamd.log"
        return super().log() + (path.read_text(errors="replace")[-4000:] if path.exists() else "")


class Spamd(Daemon):
    name = "spamd"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.port = free_port()
        self.conf = self.dir / "conf"
        self.bayes = self.dir / "bayes"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        self.conf.mkdir(exist_ok=True)
        self.bayes.mkdir(exist_ok=True)
        os.chmod(self.dir, 0o755)
        os.chmod(self.bayes, 0o777)
        for pre in Path("/etc/spamassassin").glob("*.pre"):
            shutil.copy(pre, self.conf)
        # No network: no DNS blocklists; Bayes in our own directory, learnt by TELL only.
        (self.conf / "local.cf").write_text(
            "dns_available no\nskip_rbl_checks 1\nuse_bayes 1\nbayes_auto_learn 0\n"
            f"bayes_path {self.bayes}/bayes\nbayes_file_mode 0777\nlock_method flock\n")
        self._spawn(["spamd", "--listen", self.address, "-u", "nobody", "--allow-tell", "-x",
                     "--siteconfigpath", str(self.conf), "-s", "stderr", "--max-children", "2",
                     "--pidfile", str(self.dir / "spamd.pid")])
        self._ready = (lambda: _port_open(self.port), 90)

    def learned(self) -> dict[str, int]:
        """nspam / nham of the Bayes database (sa-learn --dump magic)."""
        out = subprocess.run(["sa-learn", "--siteconfigpath", str(self.conf), "--dump", "magic"],
                             capture_output=True, text=True, timeout=60).stdout
        counts = {"nspam": 0, "nham": 0}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[-1] in ("nspam", "nham"):  # "0.000 0 1 0 non-token data: nspam"
                counts[parts[-1]] = int(parts[2])
        return counts


class Clamd(Daemon):
    name = "clamd"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        db = self.dir / "db"
        db.mkdir(exist_ok=True)
        # Our own signature database: the EICAR test string as a body signature.
        (db / "mailstack-test.ndb").write_text(f"Mailstack.Test.EICAR:0:*:{EICAR.hex()}\n")
        conf = self.dir / "clamd.conf"
        conf.write_text(f"Foreground yes\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\nUser root\n"
                        f"DatabaseDirectory {db}\nScanMail yes\nLogFile {self.dir}/clamd.log\n"
                        f"PidFile {self.dir}/clamd.pid\n")
        self._spawn(["clamd", "-c", str(conf)])

        def ready():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"zPING\0")
                    return s.recv(64).startswith(b"PONG")
            except OSError:
                return False
        self._ready = (ready, 60)


class ClamavMilter(Daemon):
    """clamav-milter in front of a running Clamd (its ClamdSocket)."""

    name = "clamav-milter"

    def __init__(self, tmp: Path, clamd: "Clamd") -> None:
        super().__init__(tmp)
        self.port = free_port()
        self.clamd = clamd

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def launch(self) -> None:
        conf = self.dir / "clamav-milter.conf"
        conf.write_text(f"MilterSocket inet:{self.port}@127.0.0.1\nClamdSocket tcp:127.0.0.1:{self.clamd.port}\n"
                        f"Foreground yes\nUser root\nPidFile {self.dir}/pid\nTemporaryDirectory {self.dir}\n"
                        "OnInfected Reject\nAddHeader Replace\nReportHostname mailstack-test\n"
                        f"LogFile {self.dir}/clamav-milter.log\nLogInfected Basic\n")
        self._spawn(["clamav-milter", "-c", str(conf)])
        self._ready = (lambda: _port_open(self.port), 30)


class OpenDKIM(Daemon):
    name = "opendkim"

    def __init__(self, tmp: Path, domain: str = "example.test", selector: str = "test") -> None:
        super().__init__(tmp)
        self.port = free_port()
        self.domain, self.selector = domain, selector

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def launch(self) -> None:
        subprocess.run(["opendkim-genkey", "-b", "1024", "-D", str(self.dir), "-d", self.domain, "-s",
                        self.selector], check=True, capture_output=True)
        conf = self.dir / "opendkim.conf"
        conf.write_text(f"Syslog no\nBackground no\nSocket inet:{self.port}@127.0.0.1\nMode sv\n"
                        f"Domain {self.domain}\nSelector {self.selector}\nKeyFile {self.dir}/{self.selector}.private\n"
                        "InternalHosts 127.0.0.1\nRequireSafeKeys no\nCanonicalization relaxed/simple\n"
                        f"PidFile {self.dir}/opendkim.pid\nUserID root\n")
        self._spawn(["opendkim", "-f", "-x", str(conf), "-l"])
        self._ready = (lambda: _port_open(self.port), 30)


class MilterForTests(Daemon):
    name = "testmilter"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.port = free_port()
        self.events = self.dir / "events.jsonl"

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def launch(self) -> None:
        self._spawn([sys.executable, str(HERE / "filters_testmilter.py"), str(self.port), str(self.events)])
        self._ready = (lambda: _port_open(self.port), 30)

    def seen(self) -> list[dict]:
        import json
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]


def time_it(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started
