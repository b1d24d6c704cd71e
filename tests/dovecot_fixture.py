"""A real Dovecot 2.3 (Debian's dovecot-imapd) started by a test on loopback.

Private config and directories under a fresh /tmp directory (world-traversable, because the
mail processes run as the unprivileged user "nobody"); passdb/userdb from a passwd-file;
mail_location = maildir:~/Maildir (Maildir++ layout, dovecot-uidlist, dovecot-keywords).
IMAP over implicit TLS with a certificate made here, plus plain IMAP on loopback.

    dc = Dovecot(extra="mail_max_userip_connections = 2").start()
    dc.add_user("u@example.test", "pw")
    ... imaplib.IMAP4_SSL("127.0.0.1", dc.imaps_port, ssl_context=dc.client_tls())
    dc.maildir("u@example.test")      # the user's Maildir++ root
    dc.stop()
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
from pathlib import Path

from harness import free_port, wait_for

MAIL_USER = "nobody"


def _make_cert(cert: Path, key: Path) -> None:
    from mailstack.tls import make_self_signed  # noqa: PLC0415
    make_self_signed(cert, key, "dovecot.example.test")


class Dovecot:
    def __init__(self, extra: str = "", separator: str = "/") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dovecot-test-"))
        os.chmod(self.dir, 0o755)
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.users: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        pw = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        (self.dir / "home").mkdir(mode=0o755)
        (self.dir / "run").mkdir()
        _make_cert(self.dir / "cert.pem", self.dir / "key.pem")
        (self.dir / "passwd").write_text("")
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(f"""
base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.dir}/dovecot.log
instance_name = dovecot-test-{self.imap_port}
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{self.dir}/cert.pem
ssl_key = <{self.dir}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
first_valid_uid = 1
first_valid_gid = 1
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:~/Maildir
mail_uid = {self.uid}
mail_gid = {self.gid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.dir}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.dir}/passwd
  default_fields = uid={self.uid} gid={self.gid} home={self.dir}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = {separator}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox "Deleted Messages" {{
    special_use = \\Trash
  }}
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox "All Mail" {{
    special_use = \\All
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{extra}
""")

    def add_user(self, user: str, password: str) -> None:
        self.users[user] = password
        with open(self.dir / "passwd", "a") as f:
            f.write(f"{user}:{{PLAIN}}{password}::::::\n")
        # Dovecot re-reads a passwd-file whose mtime (in whole seconds) changed: make sure it did
        import time
        self._mtime = max(int(time.time()) + 1, getattr(self, "_mtime", 0) + 1)
        os.utime(self.dir / "passwd", (self._mtime, self._mtime))
        home = self.dir / "home" / user
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, self.uid, self.gid)

    def maildir(self, user: str) -> Path:
        return self.dir / "home" / user / "Maildir"

    def start(self) -> "Dovecot":
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"dovecot exited {self.proc.returncode}: {self.log()}")
            import socket
            try:
                socket.create_connection(("127.0.0.1", self.imaps_port), timeout=1).close()
                socket.create_connection(("127.0.0.1", self.imap_port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(up, 30, 0.05, "dovecot to listen")
        return self

    def log(self) -> str:
        try:
            return (self.dir / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "cert.pem"))
        ctx.check_hostname = False
        return ctx

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def fill_account(host: str, port: int, ctx: ssl.SSLContext | None, user: str, password: str,
                 big_attachment: int = 3 * 1024 * 1024) -> dict:
    """Make the generated test account over IMAP (APPEND with flags, keywords and dates):
    nested and non-ASCII folders, keywords, a large attachment.  Returns what was made:
    {folder: [(message bytes, flags set, internaldate epoch)]}."""
    import imaplib
    import time
    from email.utils import format_datetime
    from datetime import datetime, timezone

    from mailstack.imap.mutf7 import encode as mutf7

    def msg(i: int, subject: str, body: bytes = b"hello\r\n") -> bytes:
        date = format_datetime(datetime(2023, 1, 1 + i % 27, 12, 0, tzinfo=timezone.utc))
        return (f"From: Sender {i} <s{i}@example.org>\r\nTo: {user}\r\nSubject: {subject}\r\n"
                f"Date: {date}\r\nMessage-ID: <m{i}.{abs(hash(subject))}@example.org>\r\n\r\n").encode() + body

    big = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
           b"Content-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n")
    import base64
    raw = base64.encodebytes(os.urandom(big_attachment * 3 // 4)).replace(b"\n", b"\r\n")
    big_msg = (f"From: big@example.org\r\nTo: {user}\r\nSubject: big\r\nMessage-ID: <big@example.org>\r\n").encode() \
        + big + raw + b"--XX--\r\n"
    plan = {
        "INBOX": [(msg(1, "one"), {"\\Seen"}), (msg(2, "two"), {"\\Flagged", "$Label1", "Work"}),
                  (msg(3, "three"), set()), (big_msg, {"\\Seen", "$Important"})],
        "Sent": [(msg(4, "sent"), {"\\Seen"})],
        "Archive/2023/Q1": [(msg(5, "archived"), {"\\Seen", "\\Answered", "Project-X"})],
        "Entwürfe/Größe ☃": [(msg(6, "umlaut"), {"\\Draft"})],
    }
    if ctx is not None:
        c = imaplib.IMAP4_SSL(host, port, ssl_context=ctx)
    else:
        c = imaplib.IMAP4(host, port)
    c.login(user, password)
    made: dict = {}
    when = time.mktime((2023, 3, 4, 5, 6, 7, 0, 0, 0))
    for folder, msgs in plan.items():
        enc = mutf7(folder)
        if folder != "INBOX":
            typ, _ = c.create('"' + enc + '"')
            assert typ == "OK", (folder, typ)
            c.subscribe('"' + enc + '"')
        for i, (data, flags) in enumerate(msgs):
            date = when + 3600 * len(made) + i * 60
            typ, resp = c.append('"' + enc + '"', "(" + " ".join(sorted(flags)) + ")",
                                 imaplib.Time2Internaldate(date), data)
            assert typ == "OK", resp
            made.setdefault(folder, []).append((data, set(flags), int(date)))
    c.logout()
    return made
