"""Greylisting with a real retrying MTA: Debian's Postfix, started by the test with a private
config and queue directory on loopback ports, relays into mailstack from 127.0.0.77 (its
smtp_bind_address).  mailstack answers the first attempt 451 4.7.1; Postfix defers and
retries (minimal_backoff_time / queue_run_delay of a second), and the message arrives
once the greylist delay has passed.  The triplet survives `kill -9` of mailstack."""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import MailServer, free_port, wait_for

ALICE, PASSWORD = "alice@example.test", "secret pw"
GREY_DELAY = 2.0

MASTER_CF = """\
127.0.0.1:{port} inet n - n - 10 smtpd
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
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    def __init__(self, workdir: Path, relay_port: int) -> None:
        os.chmod(workdir, 0o755)
        self.dir = workdir / "postfix"
        self.conf = self.dir / "etc"
        self.conf.mkdir(parents=True)
        self.port = free_port()
        self.maillog = self.dir / "maillog"
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.example.org
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relay_port}
smtp_bind_address = 127.0.0.77
smtp_tls_security_level = none
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
smtp_connection_cache_on_demand = no
alias_maps =
alias_database =
maillog_file = {self.maillog}
maillog_file_prefixes = {self.dir}
biff = no
""")
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))

    def start(self) -> None:
        (self.dir / "queue").mkdir(exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        shutil.chown(self.dir / "data", "postfix")
        r = subprocess.run(["postfix", "-c", str(self.conf), "set-permissions", "create-missing"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        # Postfix reports a bad start only to syslog or a tty: `script` gives it a tty.
        r = subprocess.run(["script", "-qec", f"postfix -c {self.conf} start", "/dev/null"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

        def accepting():
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=2).quit()
                return True
            except OSError:
                return False

        wait_for(accepting, 30, what="postfix smtpd")

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError):
            return
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, what="postfix master to exit", interval=0.05)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("greylist")
    (base / "mailstack").mkdir()
    srv = MailServer(base / "mailstack", listeners=("smtp",), overrides={
        "defense": {"greylist": True, "greylist_delay": GREY_DELAY, "greylist_auto_allow": 3}})
    srv.add_domain("example.test")
    srv.add_user(ALICE, PASSWORD)
    srv.add_user("bob@example.test", PASSWORD)
    srv.start()
    # Postfix's own users must reach its directories: pytest's tmp root is 0700.
    pf_dir = Path(tempfile.mkdtemp(prefix="mailstack-postfix-"))
    postfix = Postfix(pf_dir, srv.ports["smtp"])
    try:
        postfix.start()
        yield srv, postfix
    finally:
        postfix.stop()
        srv.stop()
        shutil.rmtree(pf_dir, ignore_errors=True)


def send_via_postfix(postfix: Postfix, sender: str, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as s:
        s.sendmail(sender, [rcpt], f"From: <{sender}>\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())


def arrived(srv, rcpt: str, subject: str) -> bool:
    return any(f"Subject: {subject}".encode() in m for m in srv.inbox_messages(rcpt))


def test_postfix_retries_and_the_message_arrives_after_the_delay(env):
    srv, postfix = env
    t0 = time.monotonic()
    send_via_postfix(postfix, "news@remote.example.org", ALICE, "greylisted once")
    # Postfix was told to try later ...
    wait_for(lambda: re.search(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451 4\.7\.1 Greylisted, "
                               r"please try again later", postfix.log()), 30, what="postfix deferral")
    assert re.search(r"info defense: \[127\.0\.0\.77\] greylist: new triplet from=<news@remote\.example\.org> "
                     r"to=<alice@example\.test>: 451 4\.7\.1$", srv.log(), re.M)
    # ... retried on its own, and the message arrived once the delay had passed.
    wait_for(lambda: arrived(srv, ALICE, "greylisted once"), 60, what="delivery after greylisting")
    assert time.monotonic() - t0 >= GREY_DELAY
    wait_for(lambda: re.search(r"\[127\.0\.0\.77\] greylist: triplet passed from=<news@remote\.example\.org> "
                               r"to=<alice@example\.test>", srv.log()), 10, what="pass log line")
    # Postfix logs the delivery once our 250 is in; the message can be in the Maildir first
    # (local mail is delivered before the 250).
    wait_for(lambda: "status=sent" in postfix.log(), 10, what="postfix status=sent")


def test_known_triplet_survives_kill_9_and_passes_at_once(env):
    srv, postfix = env
    srv.kill()  # no clean shutdown: the greylist state must be on disk already
    srv.start()
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10, source_address=("127.0.0.77", 0),
                      local_hostname="relay.example.org") as s:
        s.ehlo()
        s.mail("news@remote.example.org")
        assert s.rcpt(ALICE)[0] == 250  # the triplet passed before the kill
        assert s.rcpt("bob@example.test") == (451, b"4.7.1 Greylisted, please try again later")  # a new one


def test_exempt_network_is_not_greylisted(env):
    srv, postfix = env
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10, source_address=("127.0.0.1", 0),
                      local_hostname="relay.example.org") as s:  # exempt_networks (default: 127.0.0.1)
        s.ehlo()
        s.mail("someone@remote.example.org")
        assert s.rcpt(ALICE)[0] == 250
