"""The real sync clients the tests drive, configured in one place: mbsync (Debian's isync)
and offlineimap3, each over IMAPS to a test server on loopback, into a local Maildir."""
from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
from pathlib import Path


def mbsync(workdir: Path, *, port: int, user: str, password: str, cert: Path,
           two_way: bool = True, debug: bool = False) -> tuple[Path, "callable"]:
    """Write an mbsyncrc syncing the account into `workdir/mail`; returns that Maildir root
    and a function that runs one sync (asserting success) and returns its output.
    `two_way`: every folder, created and expunged both ways (what a user syncs with);
    otherwise INBOX down only."""
    local = workdir / "mail"
    local.mkdir()
    if two_way:
        channel = "Patterns *\nCreate Both\nExpunge Both\n"
        store_extra = "SubFolders Verbatim\n"
    else:
        channel = "Patterns INBOX\nCreate Near\n"
        store_extra = ""
    rc = workdir / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount remote
Host 127.0.0.1
Port {port}
User {user}
Pass {password}
SSLType IMAPS
CertificateFile {cert}

IMAPStore remote
Account remote

MaildirStore local
Path {local}/
Inbox {local}/INBOX
{store_extra}
Channel sync
Far :remote:
Near :local:
{channel}SyncState *
""")

    def run() -> str:
        argv = ["mbsync", *(["-D"] if debug else []), "-c", str(rc), "-a"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    return local, run


def offlineimap(workdir: Path, *, port: int, user: str, password: str, cert: Path) -> Path:
    """Sync the account's INBOX once with offlineimap3 (pinning the server certificate by
    its fingerprint) into `workdir/oi`; returns that Maildir root."""
    exe = shutil.which("offlineimap3") or shutil.which("offlineimap")
    assert exe, "offlineimap3 is not installed (apt-get install offlineimap3)"
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    local = workdir / "oi"
    rc = workdir / "offlineimaprc"
    rc.write_text(f"""
[general]
accounts = test
metadata = {workdir}/meta
ui = quiet

[Account test]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {local}

[Repository remote]
type = IMAP
remotehost = 127.0.0.1
remoteport = {port}
remoteuser = {user}
remotepass = {password}
ssl = yes
cert_fingerprint = {hashlib.sha512(der).hexdigest()}
folderfilter = lambda f: f == "INBOX"
""")
    r = subprocess.run([exe, "-c", str(rc), "-o", "-u", "quiet"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    return local


def maildir_files(folder: Path) -> list[Path]:
    """The messages of one local Maildir folder, new/ then cur/, each sorted."""
    return [p for sub in ("new", "cur") for p in sorted((folder / sub).iterdir())]
