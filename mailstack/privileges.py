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

log = logging.getLogger("mailstack.server")


class PrivilegeError(Exception):
    """Privileges cannot be dropped; str() is the one line to print."""


def drop_privileges(cfg) -> None:
    """As root with server.user set: hand data_dir to the user and become that user, for good.
    Otherwise nothing (not root: there is nothing to drop)."""
    name = cfg.server.user
    if not name or os.getuid() != 0:
        return
    pw = _lookup(name)
    if pw.pw_uid == 0:
        raise PrivilegeError(f"server.user: {name!r} is root (uid 0); name an unprivileged user")
    _chown_tree(cfg.data_dir, pw.pw_uid, pw.pw_gid)
    _become(pw)
    log.info("running as user %s (uid %d, gid %d)", name, pw.pw_uid, pw.pw_gid)


def act_as_server_user(cfg) -> None:
    """For CLI commands run as root: act as server.user when the data directory already
    belongs to it, so that what the command writes stays the server's.  Before the first
    start (no data_dir yet) stay root; the server hands everything over when it starts."""
    name = cfg.server.user
    if not name or os.getuid() != 0:
        return
    try:
        pw = pwd.getpwnam(name)
        owner = os.stat(cfg.data_dir).st_uid
    except (KeyError, OSError):
        return
    if pw.pw_uid != 0 and owner == pw.pw_uid:
        _become(pw)


def _lookup(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"server.user: no such user {name!r}") from None


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
