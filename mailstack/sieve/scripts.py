"""Users' Sieve scripts on disk, and the small per-user memory (vacation, duplicate).

    <data_dir>/sieve/users/<account>/<name>.sieve   one file per script
    <data_dir>/sieve/users/<account>/ACTIVE          the active script's name (absent = none)
    <data_dir>/sieve/users/<account>/memory.json     vacation sent-to and duplicate ids, with expiry
    <data_dir>/sieve/global/<name>.sieve            scripts for `include :global`

Every write is atomic (temporary file, fsync, rename).  Blocking: callers on the event
loop use asyncio.to_thread.  Compiled scripts are cached by (path, mtime, size).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..fsutil import atomic_write
from .checker import Script, compile_script
from .parser import SieveSyntaxError

MAX_NAME = 128
MEMORY_ENTRIES = 5000  # per kind and account; the oldest are forgotten first


class ScriptError(Exception):
    """A request refused; str() is one line for a user (ManageSieve NO, CLI error)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # ManageSieve response code: NONEXISTENT, ACTIVE, ALREADYEXISTS, QUOTA/...


_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


def valid_name(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME and not name.startswith(".") and name != "ACTIVE"
            and _BAD_NAME.search(name) is None)


_cache: "OrderedDict[tuple, Script]" = OrderedDict()
_cache_lock = threading.Lock()
CACHE_SIZE = 512


# --- "this account has no script": asked for every message, known without a read ------------
MEMO_SECONDS = 1.0  # a hand edit of the files (not through ManageSieve or the CLI) is seen within this,
                    # as the directory's files are (server.DIRECTORY_POLL_SECONDS)
MEMO_MAX = 100_000


class NoScripts:
    """The accounts whose delivery found no script at all (and when): most accounts have none,
    and a delivery would otherwise read the script folder in a worker thread for every message.

    Exact for every change made through ScriptStore's writes (ManageSieve, in this process)
    and `mailstack sieve ...` (the CLI tells the server over the control socket): each calls
    changed(), which forgets the account before the write's caller hears "done".  A read that
    began before a change does not record its (old) answer: note() takes the generation seen
    before the read, and any change since then makes it refuse.  One per script folder, not
    per ScriptStore (a reload may make a second store for the same folder)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}  # account -> monotonic time its (empty) read began
        self.generation = 0

    def known(self, account: str) -> bool:
        """On the loop: no script as of less than MEMO_SECONDS ago."""
        since = self._since.get(account.lower())
        return since is not None and time.monotonic() - since < MEMO_SECONDS

    def note(self, account: str, generation: int, began: float) -> None:
        with self._lock:
            if generation != self.generation:
                return  # changed while it was read: the answer may be old
            if len(self._since) >= MEMO_MAX:
                self._since.clear()
            self._since[account.lower()] = began

    def changed(self, account: str | None = None) -> None:
        """Scripts of `account` (None: of anyone) changed: forget what is known."""
        with self._lock:
            self.generation += 1
            if account is None:
                self._since.clear()
            else:
                self._since.pop(account.lower(), None)


_no_scripts: dict[str, NoScripts] = {}
_no_scripts_lock = threading.Lock()


def no_scripts_for(root: str) -> NoScripts:
    with _no_scripts_lock:
        memo = _no_scripts.get(root)
        if memo is None:
            memo = _no_scripts[root] = NoScripts()
        return memo


def load_compiled(path: "Path | str", max_size: int) -> Script | None:
    """The compiled script at path (cached), None if there is no such file.
    Raises SieveSyntaxError if it does not compile, OSError if unreadable."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        script = _cache.get(key)
        if script is not None:
            _cache.move_to_end(key)
            return script
    if st.st_size > max_size:
        raise SieveSyntaxError(f"script too large ({st.st_size} > {max_size} bytes)", 1, 1)
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    script = compile_script(text, max_size)
    with _cache_lock:
        _cache[key] = script
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return script


def global_script_error(path: str) -> str | None:
    """For config checks of sieve.before/after: why the script at path cannot be used, or None."""
    if not path:
        return None
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    try:
        compile_script(text)
    except SieveSyntaxError as e:
        return f"{path}: {e}"
    return None


class ScriptStore:
    def __init__(self, data_dir: os.PathLike | str, max_scripts: int = 20, max_size: int = 64 * 1024) -> None:
        self.root = Path(data_dir) / "sieve"
        self.root_str = str(self.root)
        self.max_scripts, self.max_size = max_scripts, max_size
        self.no_scripts = no_scripts_for(self.root_str)

    def user_dir(self, account: str) -> Path:
        account = account.lower()
        if not account or "/" in account or account.startswith("."):
            raise ScriptError(f"bad account name {account!r}")
        return self.root / "users" / account

    def global_dir(self) -> Path:
        return self.root / "global"

    def _path(self, account: str, name: str) -> Path:
        if not valid_name(name):
            raise ScriptError(f"bad script name {name!r}")
        return self.user_dir(account) / f"{name}.sieve"

    # --- reading ------------------------------------------------------------------------
    def active_name(self, account: str) -> str | None:
        try:
            name = (self.user_dir(account) / "ACTIVE").read_text("utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return name if valid_name(name) and (self.user_dir(account) / f"{name}.sieve").exists() else None

    def list(self, account: str) -> list[tuple[str, bool]]:
        d = self.user_dir(account)
        try:
            names = sorted(p.name[:-6] for p in d.iterdir() if p.name.endswith(".sieve"))
        except FileNotFoundError:
            return []
        active = self.active_name(account)
        return [(n, n == active) for n in names if valid_name(n)]

    def get(self, account: str, name: str) -> str:
        try:
            return self._path(account, name).read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            raise ScriptError(f"no script named {name!r}", "NONEXISTENT") from None

    def active_script(self, account: str) -> Script | None:
        """The user's active script, compiled (cached), or None.  Raises SieveSyntaxError.
        Runs for every delivery: plain os calls, no pathlib."""
        account = account.lower()
        if not account or "/" in account or account.startswith("."):
            return None
        folder = os.path.join(self.root_str, "users", account)
        try:
            with open(os.path.join(folder, "ACTIVE"), "rb") as f:
                name = f.read().decode("utf-8", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not valid_name(name):
            return None
        return load_compiled(os.path.join(folder, name + ".sieve"), self.max_size)

    def personal_include(self, account: str, name: str) -> Script | None:
        if not valid_name(name):
            return None
        return load_compiled(self.user_dir(account) / f"{name}.sieve", self.max_size)

    def global_include(self, name: str) -> Script | None:
        if not valid_name(name):
            return None
        return load_compiled(self.global_dir() / f"{name}.sieve", self.max_size)

    # --- quota ----------------------------------------------------------------------------
    def have_space(self, account: str, name: str, size: int) -> None:
        """Raises ScriptError(QUOTA/...) when a script of `size` bytes named `name` would not fit."""
        if size > self.max_size:
            raise ScriptError(f"script is larger than {self.max_size} bytes", "QUOTA/MAXSIZE")
        names = [n for n, _ in self.list(account)]
        if name not in names and len(names) >= self.max_scripts:
            raise ScriptError(f"no more than {self.max_scripts} scripts", "QUOTA/MAXSCRIPTS")

    # --- writing ---------------------------------------------------------------------------
    def put(self, account: str, name: str, text: str) -> None:
        """Check (compile) and store.  Raises SieveSyntaxError or ScriptError."""
        path = self._path(account, name)
        data = text.encode("utf-8")
        self.have_space(account, name, len(data))
        compile_script(text, self.max_size)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            atomic_write(path, data)
        finally:  # ACTIVE may name this script: it may exist now
            self.no_scripts.changed(account)

    def set_active(self, account: str, name: str | None) -> None:
        try:
            self._set_active(account, name)
        finally:
            self.no_scripts.changed(account)

    def _set_active(self, account: str, name: str | None) -> None:
        d = self.user_dir(account)
        if not name:
            try:
                (d / "ACTIVE").unlink()
            except FileNotFoundError:
                pass
            return
        if not self._path(account, name).exists():
            raise ScriptError(f"no script named {name!r}", "NONEXISTENT")
        atomic_write(d / "ACTIVE", name.encode("utf-8"))

    def delete(self, account: str, name: str) -> None:
        path = self._path(account, name)
        if not path.exists():
            raise ScriptError(f"no script named {name!r}", "NONEXISTENT")
        if self.active_name(account) == name:
            raise ScriptError("the active script cannot be deleted", "ACTIVE")
        path.unlink()
        self.no_scripts.changed(account)

    def rename(self, account: str, old: str, new: str) -> None:
        src, dst = self._path(account, old), self._path(account, new)
        if not src.exists():
            raise ScriptError(f"no script named {old!r}", "NONEXISTENT")
        if dst.exists():
            raise ScriptError(f"a script named {new!r} exists", "ALREADYEXISTS")
        was_active = self.active_name(account) == old
        try:
            os.rename(src, dst)  # ACTIVE may name `new`: it may exist now
            if was_active:
                atomic_write(self.user_dir(account) / "ACTIVE", new.encode("utf-8"))
        finally:
            self.no_scripts.changed(account)


class Memory:
    """Per-account remembered keys with expiry: vacation (who got a reply) and duplicate ids.

    Loaded before a script runs (so the interpreter asks it without I/O) and saved after
    the actions were carried out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, float]] = {"vacation": {}, "duplicate": {}}
        self.dirty = False

    @classmethod
    def load(cls, path: Path) -> "Memory":
        m = cls(path)
        try:
            raw = json.loads(path.read_text("utf-8"))
            now = time.time()
            for kind in m.data:
                m.data[kind] = {k: float(v) for k, v in raw.get(kind, {}).items() if float(v) > now}
        except (FileNotFoundError, ValueError, AttributeError, TypeError):
            pass
        return m

    def seen(self, kind: str, key: str) -> bool:
        exp = self.data[kind].get(key)
        return exp is not None and exp > time.time()

    def remember(self, kind: str, key: str, seconds: float) -> None:
        table = self.data[kind]
        table.pop(key, None)
        table[key] = time.time() + seconds
        while len(table) > MEMORY_ENTRIES:
            table.pop(next(iter(table)))
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, json.dumps(self.data).encode("utf-8"))
        self.dirty = False
