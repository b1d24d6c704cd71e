"""Least privilege: when started as root, switch to an unprivileged user once ports are bound
and keys are read."""
from __future__ import annotations

import logging
import os
import pwd

log = logging.getLogger("mailstack.server")


class PrivilegeError(Exception):
    pass


def drop_privileges(cfg) -> None:
    name = cfg.server.user
    if not name or os.getuid() != 0:
        return
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"server.user: no such user {name!r}") from None
    _chown_tree(cfg.data_dir, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("running as user %s (uid %d)", name, pw.pw_uid)


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
