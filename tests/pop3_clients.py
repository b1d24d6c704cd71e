"""Run Debian's real POP3 clients (fetchmail, getmail6, curl) against a server, for tests.

Each helper takes the port, the server's certificate (the only one trusted) and returns what
the client downloaded, so the test can compare bytes.
"""
from __future__ import annotations

import mailbox
import os
import subprocess
import sys
from pathlib import Path

TLS_NAME = "mail.example.test"  # the name on the server certificate; we connect to 127.0.0.1


def _env(home: Path) -> dict:
    # Keep each client's state (fetchmail's .fetchids, getmail's oldmail) inside the test directory.
    return {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home), "LC_ALL": "C"}


def maildir_messages(path: Path) -> list[bytes]:
    md = mailbox.Maildir(str(path), factory=None, create=False)
    return sorted(bytes(m) for m in md)


def _mda(work: Path, out: Path) -> Path:
    """A delivery program: stdin -> one file in the Maildir `out`.  (The fetchers' own Maildir
    writers refuse to run as root, which the test machines are.)"""
    mda = work / "mda.py"
    mda.write_text(f"#!{sys.executable}\nimport sys, uuid\n"
                   f"open({str(out / 'new')!r} + '/' + uuid.uuid4().hex, 'wb').write(sys.stdin.buffer.read())\n")
    mda.chmod(0o700)
    return mda


def _maildir(path: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def fetchmail(work: Path, port: int, cert: Path, user: str, password: str, *, keep: bool,
              implicit_tls: bool) -> tuple[subprocess.CompletedProcess, list[bytes]]:
    """One fetchmail run (STLS on the plain port, or implicit TLS); messages land in a Maildir."""
    work.mkdir(parents=True, exist_ok=True)
    out = _maildir(work / "fetchmail-Maildir")
    tls = "ssl" if implicit_tls else "sslproto 'tls1.2+'"  # STLS is required, not just tried
    mda = _mda(work, out)
    rc = work / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f'poll {TLS_NAME} via 127.0.0.1 with proto POP3 port {port} uidl auth password\n'
        f'  user "{user}" there with password "{password}" is "{os.environ.get("USER", "root")}" here\n'
        f'  options {"keep" if keep else "nokeep"} fetchall {tls} sslcertck sslcertfile "{cert}" sslcommonname "{TLS_NAME}"\n'
        f'  mda "{mda}"\n')
    rc.chmod(0o600)
    result = subprocess.run(["fetchmail", "--nodetach", "-f", str(rc), "-i", str(work / ".fetchids"),
                             "--pidfile", str(work / "fetchmail.pid"), "-v"],
                            capture_output=True, text=True, timeout=60, env=_env(work))
    return result, maildir_messages(out)


def getmail(work: Path, port: int, cert: Path, user: str, password: str, *,
            delete: bool) -> tuple[subprocess.CompletedProcess, list[bytes]]:
    """One getmail6 run over POP3 with implicit TLS (getmail's POP3 retrievers have no STLS)."""
    work.mkdir(parents=True, exist_ok=True)
    out = _maildir(work / "getmail-Maildir")
    gdir = work / "getmail"
    gdir.mkdir(exist_ok=True)
    rc = gdir / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
        f"port = {port}\nusername = {user}\npassword = {password}\n"
        f"ca_certs = {cert}\nssl_cert_hostname = {TLS_NAME}\n\n"
        f"[destination]\ntype = MDA_external\npath = {_mda(work, out)}\nallow_root_commands = true\n\n"
        f"[options]\ndelete = {'true' if delete else 'false'}\nread_all = false\nverbose = 2\n")
    result = subprocess.run(["getmail", "--getmaildir", str(gdir), "--rcfile", "getmailrc"],
                            capture_output=True, text=True, timeout=60, env=_env(work))
    return result, maildir_messages(out)


def curl(port: int, cert: Path, user: str, password: str, path: str = "/", *, implicit_tls: bool,
         extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """curl on a POP3 URL: "/" lists (LIST), "/N" retrieves message N (RETR)."""
    scheme = "pop3s" if implicit_tls else "pop3"
    args = ["curl", "-sS", "--max-time", "30", "--cacert", str(cert),
            "--resolve", f"{TLS_NAME}:{port}:127.0.0.1", "-u", f"{user}:{password}",
            f"{scheme}://{TLS_NAME}:{port}{path}", *extra]
    if not implicit_tls:
        args.append("--ssl-reqd")  # STLS, and refuse to go on without it
    return subprocess.run(args, capture_output=True, timeout=60)
