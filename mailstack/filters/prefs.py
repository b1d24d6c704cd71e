"""Per-user filter preferences: one small JSON file per account, <data_dir>/prefs/<account>.json.

Kept apart from the directory (accounts, passwords) on purpose: it is the user's choice
about their own mail, read at delivery, edited by `mailstack user prefs`.  Today one
setting: `spam_folder` = "junk" (default: spam goes to the Junk folder) or "inbox".
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ..directory import normalize_address
from ..fsutil import atomic_write

DEFAULTS = {"spam_folder": "junk"}
CHOICES = {"spam_folder": ("junk", "inbox")}
MAX_SIZE = 64 * 1024


def prefs_path(data_dir: Path, account: str) -> Path:
    name = normalize_address(account)
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"{account!r}: not an account name")
    return Path(data_dir) / "prefs" / f"{name}.json"


def read(data_dir: Path, account: str) -> dict:
    """The account's preferences, defaults filled in (a missing or broken file = defaults)."""
    prefs = dict(DEFAULTS)
    try:
        with open(prefs_path(data_dir, account), "rb") as f:
            raw = json.loads(f.read(MAX_SIZE))
    except (OSError, ValueError):
        return prefs
    if isinstance(raw, dict):
        for key, choices in CHOICES.items():
            if raw.get(key) in choices:
                prefs[key] = raw[key]
    return prefs


def write(data_dir: Path, account: str, changes: dict) -> dict:
    prefs = read(data_dir, account)
    prefs.update(changes)
    path = prefs_path(data_dir, account)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(prefs, indent=1, sort_keys=True) + "\n").encode(), mode=0o644)
    return prefs


async def spam_to_inbox(data_dir: Path, account: str) -> bool:
    """Does this account want its spam in INBOX?  (Read in a thread: it is a file.)"""
    prefs = await asyncio.to_thread(read, data_dir, account)
    return prefs["spam_folder"] == "inbox"
