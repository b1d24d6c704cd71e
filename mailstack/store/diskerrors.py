"""Disk errors as store errors: a full disk (ENOSPC, EDQUOT) or a failing one must give the
client a clear NO / -ERR and leave the session going, never a dropped connection.

Each write path of the store undoes what it had made before the error (see maildir.py);
this module only names the error."""
from __future__ import annotations

import errno
import functools

from .base import StoreError, StoreFull, StoreIOError

FULL = {errno.ENOSPC, errno.EDQUOT}


def as_store_error(e: OSError) -> StoreError:
    if e.errno in FULL:
        return StoreFull("Not enough disk space")
    return StoreIOError(f"Disk error: {e.strerror or e.__class__.__name__}")


def disk_errors(fn):
    """Decorate an async store method: OSError out of it becomes StoreFull / StoreIOError."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except StoreError:
            raise
        except OSError as e:
            raise as_store_error(e) from e
    return wrapper
