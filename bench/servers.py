"""Start and stop the servers under test on free loopback ports, each with a private
config and data under one temporary directory.

    Mailstack(workdir)   python -m mailstack serve (SMTP, IMAP, POP3 in one process)
    Postfix(workdir)     postfix -c DIR start: smtpd -> cleanup -> qmgr -> virtual (Maildir)
    Dovecot(workdir)     dovecot -c FILE: imap + pop3 reading Maildirs

Each exposes .ports, .maildir(user), .roots() (pids whose process trees are measured)
and stop(). Mail for the benchmark goes to USER@DOMAIN; its password is PASSWORD.
Peers are installed from Debian's packages by install_peers(), without letting apt start
their daemons on the standard ports.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import free_port, wait_for  # noqa: E402  (the test harness's helpers)

DOMAIN = "bench.test"
PASSWORD = "bench-password"
HOSTNAME = "mail.bench.test"
MAIL_UID = MAIL_GID = 65534  # nobody/nogroup: owner of the peers' Maildirs
REPO = Path(__file__).resolve().parent.parent


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def count_files(*dirs: Path) -> int:
    n = 0
    for d in dirs:
        try:
            with os.scandir(d) as it:
                n += sum(1 for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            pass
    return n


STANDARD_PORTS = (25, 110, 143, 465, 587, 993, 995)


def standard_ports_listening() -> list[int]:
    """Mail ports with a listening socket on this host (from /proc/net/tcp*): there should be
    none, before or after a run."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        port = int(fields[1].rsplit(":", 1)[1], 16)
                        if port in STANDARD_PORTS:
                            found.add(port)
        except OSError:
            pass
    return sorted(found)


# --- installing the peers ------------------------------------------------------------
# Every Debian package a row of bench/run.py needs, with the programs the bench runs from it.
PEER_PACKAGES = {
    "postfix": ("postfix", "smtp-source"),  # the SMTP peer; smtp-source drives SMTP accept for both
    "dovecot-core": ("dovecot", "doveadm"),
    "dovecot-imapd": (),                     # /usr/lib/dovecot/imap
    "dovecot-pop3d": (),                     # /usr/lib/dovecot/pop3
    "bsdutils": ("script",),                 # gives Postfix's start a tty to report errors on
}
PEER_FILES = {"dovecot-imapd": "/usr/lib/dovecot/imap", "dovecot-pop3d": "/usr/lib/dovecot/pop3"}
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def missing_peers() -> list[str]:
    """The peer packages not (completely) installed: dpkg must say "install ok installed" AND
    the programs the bench runs from each must be there."""
    missing = []
    for pkg, programs in PEER_PACKAGES.items():
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        ok = "install ok installed" in status.stdout and all(shutil.which(x) for x in programs)
        if pkg in PEER_FILES and not os.path.exists(PEER_FILES[pkg]):
            ok = False
        if not ok:
            missing.append(pkg)
    return missing


def peers_installed() -> bool:
    return not missing_peers()


def install_peers() -> None:
    """apt-get install the missing peers, then check every one. Installing postfix/dovecot
    runs invoke-rc.d, which would start them on ports 25/143/110...; a policy-rc.d that
    exits 101 forbids that. One that is already there (Docker images ship one) is left as
    it is."""
    missing = missing_peers()
    if not missing:
        print(f"peers already installed: {', '.join(PEER_PACKAGES)}")
        return
    print(f"installing {', '.join(missing)}", flush=True)
    ours = not POLICY_RC_D.exists()
    if ours:
        POLICY_RC_D.write_text("#!/bin/sh\n# temporary, from mailstack bench: no daemons on install\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n",
                       text=True, check=True)
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends",
                        *missing], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    finally:
        if ours:
            POLICY_RC_D.unlink(missing_ok=True)
    still = missing_peers()
    if still:
        raise SystemExit(f"peer packages still missing after apt-get install: {', '.join(still)}")
    # Belt and braces: if anything did start from the packages, stop it.
    for cmd in (["postfix", "stop"], ["doveadm", "stop"]):
        subprocess.run(cmd, capture_output=True)


# --- mailstack ------------------------------------------------------------------------
class Mailstack:
    name = "mailstack"

    def __init__(self, workdir: Path, loop: str = "auto", senderauth: bool = True,
                 background_index: bool = True) -> None:
        self.dir = workdir / "mailstack"
        self.dir.mkdir(parents=True)
        self.data_dir = self.dir / "data"
        self.ports = {"smtp": free_port(), "imap": free_port(), "pop3": free_port()}
        listen = {name: [] for name in ("smtp", "submissions", "submission", "imap", "imaps", "pop3", "pop3s",
                                        "managesieve")}
        for name, port in self.ports.items():
            listen[name] = [f"127.0.0.1:{port}"]
        # Plaintext login on loopback for both sides (Dovecot gets disable_plaintext_auth = no):
        # TLS is not what is measured here. Limits are raised to let the load in, as for the peers.
        sections = {
            "server": {"hostname": HOSTNAME, "data_dir": str(self.data_dir), "event_loop": loop,
                       "log_level": "info", "shutdown_grace": 2.0,
                       "user": "root",  # the bench runs in root's private temp folders
                       **({} if background_index else {"background_index": False})},
            "listen": listen,
            "smtp": {"max_connections": 2000, "max_connections_per_ip": 2000},
            "imap": {"allow_plaintext_auth": True, "max_connections": 30000,
                     "max_connections_per_ip": 30000},
            "pop3": {"allow_plaintext_auth": True},
            "delivery": {"outbound": False},
            "senderauth": {"enabled": senderauth},
        }
        lines = []
        for section, keys in sections.items():
            lines.append(f"[{section}]")
            for k, v in keys.items():
                if isinstance(v, bool):
                    v = "true" if v else "false"
                elif isinstance(v, str):
                    v = f'"{v}"'
                elif isinstance(v, list):
                    v = "[" + ", ".join(f'"{x}"' for x in v) + "]"
                lines.append(f"{k} = {v}")
            lines.append("")
        self.config = self.dir / "config.toml"
        self.config.write_text("\n".join(lines))
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, input: str | None = None) -> None:
        subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(self.config)],
                       input=input, text=True, check=True, capture_output=True, cwd=REPO)

    def add_user(self, user: str) -> None:
        self.cli("user", "add", f"{user}@{DOMAIN}", "--password-stdin", "--allow-weak", input=PASSWORD + "\n")

    def setup(self, users: list[str]) -> None:
        """The domain and accounts (argon2 hashes), made with the CLI before the start."""
        self.cli("domain", "add", DOMAIN)
        for u in users:
            self.add_user(u)

    def start(self) -> None:
        self.log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailstack", "serve", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: self._up(), 30, what="mailstack listeners")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mailstack exited with {self.proc.returncode}; see {self.dir / 'server.log'}")
        return all(accepting(p) for p in self.ports.values())

    def maildir(self, user: str) -> Path:
        return self.data_dir / "mail" / DOMAIN / user

    def indexer_done(self) -> bool:
        """Has the background indexer (store/background.py) finished its pass over the
        mailboxes placed before the start?  (True when it is off.)"""
        text = (self.dir / "server.log").read_text(errors="replace")
        return "background index: done" in text or "background_index = false" in self.config.read_text()

    def wait_indexer(self, timeout: float = 600.0) -> float:
        """Seconds waited until indexer_done()."""
        t0 = time.monotonic()
        while not self.indexer_done():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("the background index did not finish")
            time.sleep(0.1)
        return time.monotonic() - t0

    def roots(self, service: str) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# --- postfix --------------------------------------------------------------------------
POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n - n - {maxproc} smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """Postfix as Debian ships it, with its defaults for everything that costs time
    (fsync of the queue file before 250, one cleanup per message, qmgr, the virtual(8)
    Maildir delivery agent, which fsyncs too), on a private config directory."""
    name = "postfix"

    def __init__(self, workdir: Path, sessions: int = 100) -> None:
        # The peers' unprivileged users (postfix, dovecot, nobody) must reach their files.
        os.chmod(workdir, 0o755)
        self.dir = workdir / "postfix"
        self.conf = self.dir / "etc"
        self.conf.mkdir(parents=True)
        self.mail = self.dir / "mail"
        self.mail.mkdir()
        os.chown(self.mail, MAIL_UID, MAIL_GID)
        self.ports = {"smtp": free_port()}
        # The peers' mail lives where Dovecot can read it too: <dir>/mail/<user>/
        vmailbox = self.conf / "vmailbox"
        self.vmailbox = vmailbox
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {HOSTNAME}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = texthash:{vmailbox}
virtual_mailbox_base = {self.mail}
virtual_uid_maps = static:{MAIL_UID}
virtual_gid_maps = static:{MAIL_GID}
virtual_minimum_uid = 100
message_size_limit = 26214400
maillog_file = {self.dir}/maillog
maillog_file_prefixes = {self.dir}
biff = no
append_dot_mydomain = no
smtpd_banner = $myhostname ESMTP
""")
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.ports["smtp"], maxproc=sessions))
        vmailbox.write_text("")

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True, text=True)

    def start(self, users: list[str]) -> None:
        self.vmailbox.write_text("".join(f"{u}@{DOMAIN} {u}/\n" for u in users))
        (self.dir / "queue").mkdir(exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        shutil.chown(self.dir / "data", "postfix")
        # post-install makes the queue's subdirectories with their owners and modes.
        r = subprocess.run(["postfix", "-c", str(self.conf), "set-permissions", "create-missing"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"postfix set-permissions failed: {r.stdout}{r.stderr}")
        for u in users:
            self.prepare_maildir(u)
        # Postfix reports a bad start only to syslog (or a tty): ask `script` for a tty.
        r = subprocess.run(["script", "-qec", f"postfix -c {self.conf} start", "/dev/null"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}")
        wait_for(lambda: accepting(self.ports["smtp"]), 30, what="postfix smtpd")

    def master_pid(self) -> int:
        return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def maildir(self, user: str) -> Path:
        return self.mail / user

    def prepare_maildir(self, user: str) -> Path:
        root = self.maildir(user)
        for sub in ("", "new", "cur", "tmp"):
            (root / sub).mkdir(exist_ok=True)
            os.chown(root / sub, MAIL_UID, MAIL_GID)
        return root

    def roots(self, service: str) -> list[int]:
        return [self.master_pid()]

    def stop(self) -> None:
        try:
            pid = self.master_pid()
        except (OSError, ValueError):
            return
        self._postfix("stop")
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, what="postfix master to exit", interval=0.05)


# --- dovecot --------------------------------------------------------------------------
class Dovecot:
    """Dovecot 2.3 with a private config: imap + pop3, passwd-file, Maildir at the Postfix
    virtual(8) location, fsync defaults.

    Password scheme: mailstack stores argon2 hashes and caches successful verifications
    (HMAC of account + password), so its 10,000 logins cost one argon2 and 10,000 HMACs.
    Dovecot's auth cache keeps the stored hash and verifies it again on every login, and
    verifies in its single auth process: with ARGON2ID, 200 logins take 20 s and 10,000
    would take a quarter of an hour. So by default Dovecot gets {PLAIN} (as cheap per
    login as mailstack's cache hit) and the figures compare sessions, not password
    hashing; scheme="ARGON2ID" measures the other thing. Login
    processes in Dovecot's "high-performance" mode (one per core, many clients each),
    the setting Dovecot's documentation gives for busy servers; one imap process per
    session, as by default."""
    name = "dovecot"

    def __init__(self, workdir: Path, mail: Path, max_sessions: int = 12000, scheme: str = "PLAIN") -> None:
        self.scheme = scheme
        # base_dir holds unix sockets: keep its path short (108-byte limit).
        self.dir = workdir / "dovecot"
        self.dir.mkdir(parents=True)
        self.mail = mail
        self.ports = {"imap": free_port(), "pop3": free_port()}
        self.config = self.dir / "dovecot.conf"
        self.passwd = self.dir / "passwd"
        self.max_sessions = max_sessions
        self.base_dir = self.dir / "run"

    def start(self, users: list[str]) -> None:
        hashed = subprocess.run(["doveadm", "pw", "-s", self.scheme, "-p", PASSWORD], capture_output=True,
                                text=True, check=True).stdout.strip()
        self.passwd.write_text("".join(f"{u}@{DOMAIN}:{hashed}\n" for u in users))
        n = self.max_sessions
        self.config.write_text(f"""\
protocols = imap pop3
listen = 127.0.0.1
base_dir = {self.base_dir}
state_dir = {self.dir}/state
log_path = {self.dir}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_cache_size = 10M
mail_location = maildir:{self.mail}/%n
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
mail_max_userip_connections = {n + 100}
default_client_limit = {n * 2 + 100}
default_process_limit = 200
passdb {{
  driver = passwd-file
  args = {self.passwd}
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={self.mail}/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.ports["imap"]}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = {os.cpu_count() or 1}
  client_limit = {n + 100}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.ports["pop3"]}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap {{
  process_limit = {n + 100}
}}
service anvil {{
  client_limit = {n * 2 + 1000}
}}
service auth {{
  client_limit = {n * 2 + 1000}
}}
""")
        # dovecot daemonizes; its children inherit stdout/stderr, so no pipes here (they would
        # never reach EOF).
        with open(self.dir / "start.log", "w+") as out:
            rc = subprocess.run(["dovecot", "-c", str(self.config)], stdout=out, stderr=out).returncode
            out.seek(0)
            if rc != 0:
                raise RuntimeError(f"dovecot failed to start: {out.read()}")
        wait_for(lambda: all(accepting(p) for p in self.ports.values()), 30, what="dovecot listeners")

    def master_pid(self) -> int:
        return int((self.base_dir / "master.pid").read_text().split()[0])

    def maildir(self, user: str) -> Path:
        return self.mail / user

    def roots(self, service: str) -> list[int]:
        return [self.master_pid()]

    def stop(self) -> None:
        try:
            pid = self.master_pid()
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, what="dovecot master to exit", interval=0.05)
