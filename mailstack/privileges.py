"""Least privilege: when started as root, switch to an unprivileged user once ports are bound
and keys are read (server.user).

The server calls drop_privileges() after binding (listeners not yet accepting) and before
the control socket, the queue and the first connection; the CLI calls act_as_server_user()
so that the files it writes under data_dir (accounts, queue files) stay readable by the
server, which no longer runs as root.
"""
from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

log = logging.getLogger("mailstack.server")


class PrivilegeError(Exception):
    """Privileges cannot be dropped; str() is the one line to print."""


DEFAULT_USER = "mailstack"


def server_user(cfg) -> str:
    return cfg.server.user or DEFAULT_USER


def drop_privileges(cfg) -> None:
    """As root: hand data_dir to server.user and become that user, for good (Postfix never keeps
    root either).  The default user `mailstack` is created as a system account when missing, as a
    distribution package would; server.user = "root" keeps root, with a warning.  Not root:
    nothing to drop."""
    name = server_user(cfg)
    if os.getuid() != 0:
        return
    if name == "root":
        log.warning("running as root because server.user = \"root\"; an unprivileged user is safer")
        return
    pw = _lookup_or_create(name, cfg.data_dir)
    if pw.pw_uid == 0:
        raise PrivilegeError(f"server.user: {name!r} is root (uid 0); name an unprivileged user")
    _check_reachable(Path(cfg.data_dir), pw, "server.data_dir")
    # Modules are imported lazily, some after the switch: the code must stay reachable too.
    _check_reachable(Path(__file__).resolve().parent, pw, "the mailstack code in")
    _chown_tree(cfg.data_dir, pw.pw_uid, pw.pw_gid)
    _become(pw)
    log.info("running as user %s (uid %d, gid %d)", name, pw.pw_uid, pw.pw_gid)


def act_as_server_user(cfg) -> None:
    """For CLI commands run as root: act as server.user when the data directory already
    belongs to it, so that what the command writes stays the server's.  Before the first
    start (no data_dir yet) stay root; the server hands everything over when it starts."""
    name = server_user(cfg)
    if name == "root" or os.getuid() != 0:
        return
    try:
        pw = pwd.getpwnam(name)
        owner = os.stat(cfg.data_dir).st_uid
    except (KeyError, OSError):
        return
    if pw.pw_uid != 0 and owner == pw.pw_uid:
        _become(pw)


def _lookup_or_create(name: str, home) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name != DEFAULT_USER:
        raise PrivilegeError(f"server.user: no such user {name!r} (create it: useradd --system "
                             f"--shell /usr/sbin/nologin {name})")
    # The default account is ours to make, as Debian's postfix package makes `postfix`.
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
           "--shell", "/usr/sbin/nologin", "--comment", "mailstack mail server", name]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise PrivilegeError(f"server.user: no user {name!r} and {useradd}: {e.strerror}; create it "
                             f"(useradd --system {name}) or set server.user") from None
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise PrivilegeError(f"server.user: no user {name!r} and creating it failed: {reason}")
    pw = pwd.getpwnam(name)
    log.warning("created system user %s (uid %d) to run the server as (server.user)", name, pw.pw_uid)
    return pw


def _check_reachable(data_dir: Path, pw: pwd.struct_passwd, what: str) -> None:
    """The user must be able to reach data_dir (and the code) once it is no longer root: every
    directory above needs search permission for it. Refuse in one line rather than fail later."""
    groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    for d in reversed(data_dir.resolve().parents):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise PrivilegeError(f"server.user: {pw.pw_name!r} cannot reach {what} {data_dir}: {d} is mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}; install in a directory others can enter "
                                 f"(e.g. /opt/mailstack), chmod o+x {d}, or set server.user = \"root\"")


def _become(pw: pwd.struct_passwd) -> None:
    # Groups first (needs root), then the gid, then the uid: the other order would leave
    # root's groups behind.  initgroups keeps the user's own supplementary groups, e.g.
    # Debian's ssl-cert, which lets a reload read keys under /etc/ssl/private.
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError(f"server.user: still able to become root after switching to {pw.pw_name!r}")


def _chown_tree(root, uid: int, gid: int) -> None:
    """Hand the data directory to the unprivileged user (files the CLI made as root included)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            try:
                st = os.lstat(name)
                if st.st_uid != uid or st.st_gid != gid:
                    os.lchown(name, uid, gid)
            except FileNotFoundError:
                pass
