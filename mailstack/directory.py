"""Domains, accounts, aliases and password hashes.

Three files under data_dir, each readable and editable by a person:

    domains    one local domain per line
    accounts   user@domain:<argon2 hash>          (like Dovecot's passwd-file)
    aliases    source: target, target, ...        (like Postfix's virtual table)
               "@domain: target" is the catch-all of that domain
    quotas     user@domain: storage=1G messages=10000   (the account's own limits; a
               missing key = quota.default_*, 0 = no limit; sizes take K/M/G/T)

Lines starting with '#' are comments. The CLI rewrites them atomically
(tmp file, fsync, rename); the server re-reads them when their mtime changes,
so edits take effect without a restart.  A file that does not parse completely (cut
short, not UTF-8, a malformed line) is refused as a whole: the last good directory
stays in force, and the refusal is logged once per change of the file.

Names every mail server must answer for (RFC 5321 4.5.1, RFC 2142, Postfix's
mydestination habits): postmaster@ and abuse@ every local domain, the bare
`postmaster`, and root/postmaster/MAILER-DAEMON (or any system user) without a
domain, @localhost or @<server.hostname> go to the postmaster account — unless an
alias or account of that exact name says otherwise.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import os
import pwd
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .fsutil import atomic_write

MAX_ALIAS_DEPTH = 10
MAX_EXPANSION = 1000

# Local parts that every local domain has (RFC 5321 4.5.1, RFC 2142) unless set up otherwise.
ROLE_NAMES = frozenset({"postmaster", "abuse"})
# Names of this host itself (no domain, @localhost, @<hostname>) that reach the postmaster.
SYSTEM_NAMES = frozenset({"postmaster", "abuse", "root", "mailer-daemon"})
# A stored hash must be complete: a cut line is refused, not taken for a wrong password.
_HASH_RE = re.compile(r"^\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{16,}$")
# Local parts an account may have: what the store accepts as a directory name, and a
# plain RFC 5321 dot-string (no quoting, no routing characters).
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$&'*+\-=?^_`{|}~]+(\.[A-Za-z0-9!#$&'*+\-=?^_`{|}~]+)*$")

_hasher = PasswordHasher()

# argon2 verifications run here, not in the default executor: they are CPU-bound (and use
# ~64 MiB each), so one thread per core is what the machine can do at once, and a burst of
# logins must not hold up the disk work queued in the default executor behind them.
_argon2_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _argon2_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _argon2_executor
    if _argon2_executor is None:
        _argon2_executor = concurrent.futures.ThreadPoolExecutor(
            max(1, min(os.cpu_count() or 1, 8)), thread_name_prefix="argon2")
    return _argon2_executor


class DirectoryError(Exception):
    """A request the directory cannot carry out; str() says why."""


def normalize_address(address: str) -> str:
    """Lower-case, IDNA-encode the domain. Local parts are matched case-insensitively (as Postfix does)."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip().lower()
    return f"{local.lower()}@{normalize_domain(domain)}"


def normalize_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return domain


def split_address(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain


@dataclass(frozen=True)
class Resolution:
    """What one recipient address means here.

    kind: "local" (one account), "alias" (targets), "unknown" (a local domain, but no such
    user: refuse at RCPT), "remote" (not a local domain).
    """

    kind: str
    account: str | None = None
    targets: tuple[str, ...] = ()


def _read_lines(path: Path) -> list[str]:
    """The meaningful lines of one directory file. DirectoryError when it is not UTF-8 or does not
    end with a newline (every writer ends it with one: a missing one means the file was cut)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DirectoryError(f"{path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DirectoryError(f"{path}: not UTF-8 (byte {e.start})") from None
    if text and not text.endswith("\n"):
        raise DirectoryError(f"{path}: the last line is incomplete (no newline at the end: file cut short?)")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


_COUNT_FORMAT = ("# mailstack accounts file: {} entries (after editing by hand, correct the number "
                 "or delete this line)\n")
_COUNT_RE = re.compile(rb"# mailstack accounts file: (\d+) entries")


def _declared_count(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            m = _COUNT_RE.match(f.readline(200))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def check_local_part(local: str) -> str | None:
    """Why `local` cannot be an account's local part (None when it can)."""
    if not local:
        return "empty local part"
    if len(local) > 64:
        return "local part longer than 64 characters"
    if not _LOCAL_RE.match(local) or local in (".", ".."):
        return "local part may hold only letters, digits and !#$&'*+-=?^_`{|}~ with single dots between"
    return None


def check_password_strength(password: str, min_length: int) -> str | None:
    """Why `password` is too weak (None when it is not)."""
    if len(password) < min_length:
        return f"password shorter than {min_length} characters"
    if password.lower() in COMMON_PASSWORDS or len(set(password)) < 3:
        return "password is one of the most common ones"
    return None


def _system_users() -> frozenset[str]:
    try:
        return frozenset(p.pw_name.lower() for p in pwd.getpwall())
    except OSError:
        return frozenset()


def _tracked(base: type, changing: tuple[str, ...]) -> type:
    """A dict or set subclass that tells every Directory holding it of each change in place
    (their look-up memo is then dropped): `changing` names the methods that change it."""

    def __init__(self, data=(), changed=None) -> None:
        base.__init__(self, data)
        self._changed = [changed] if changed is not None else []  # every Directory holding it

    def tell_first(method):
        def changing_method(self, *args, **kwargs):
            for changed in self._changed:
                changed()
            return method(self, *args, **kwargs)
        changing_method.__name__ = method.__name__
        return changing_method

    methods = {name: tell_first(getattr(base, name)) for name in changing}
    return type(f"Tracked{base.__name__.title()}", (base,),
                {"__slots__": ("_changed",), "__init__": __init__, **methods})


_TrackedDict = _tracked(dict, ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update",
                               "setdefault"))
_TrackedSet = _tracked(set, ("add", "discard", "remove", "pop", "clear", "update", "difference_update",
                             "intersection_update", "symmetric_difference_update", "__ior__", "__iand__",
                             "__isub__", "__ixor__"))


# What resolve() and expand() read: assigning any of these, or changing one of the
# containers in place, drops their memo.
_LOOKUP_STATE = frozenset({"domains", "accounts", "aliases", "system_users", "hostname", "plus_separator",
                           "postmaster", "srs_reverse"})
MEMO_MAX = 50_000  # addresses remembered (a flood of made-up ones only clears it now and then)


class Directory:
    def __setattr__(self, name: str, value) -> None:
        if name in _LOOKUP_STATE:
            # Containers are tracked, so that an edit in place (the CLI's, a reload's, a
            # test's) drops the memo too.  Every change of lookup state goes through here.
            # One assigned from another Directory (the server's reload) stays shared, as a
            # plain one would: both are told of its changes.
            if isinstance(value, (_TrackedDict, _TrackedSet)):
                if self._lookup_changed not in value._changed:
                    value._changed.append(self._lookup_changed)
            elif type(value) is dict:
                value = _TrackedDict(value, self._lookup_changed)
            elif type(value) in (set, frozenset) and name == "domains":
                value = _TrackedSet(value, self._lookup_changed)
            object.__setattr__(self, name, value)
            self._lookup_changed()
        else:
            object.__setattr__(self, name, value)

    def _lookup_changed(self) -> None:
        self.__dict__["_resolved"] = {}
        self.__dict__["_expanded"] = {}

    def __init__(self, data_dir: Path | str, plus_separator: str = "+", hostname: str = "",
                 postmaster: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.plus_separator = plus_separator
        self.hostname = hostname.lower().rstrip(".")  # names of this host are local (see resolve)
        self.postmaster = postmaster  # accounts.postmaster; "" = the first account made
        self.domains: set[str] = set()
        self.accounts: dict[str, str] = {}  # address -> hash, in the order they were made
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.quotas: dict[str, dict[str, int]] = {}  # account -> {"storage": bytes, "messages": n}
        self.system_users: frozenset[str] = frozenset()
        self._mtimes: tuple = ()
        self._refused: tuple | None = None  # the file versions last refused: not re-read until they change
        # Verified-password cache: argon2 costs ~50 ms of CPU; a client that logs in
        # again with the same password (IMAP clients open several connections) should not
        # pay it each time.  Keyed by an HMAC with a per-process secret, never the password.
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[str, bytes, float]] = {}  # account -> (hash, token, when)
        self._inflight: dict[tuple[str, bytes], asyncio.Future] = {}  # verifications running now
        # senderauth/forward.py: address -> original sender for our SRS addresses, "" when
        # forged or expired, None when not SRS (installed by the server when SRS is on).
        self.srs_reverse = None
        self.load()

    @classmethod
    def for_config(cls, cfg) -> "Directory":
        """The directory of a configuration: data_dir, plus separator, host name, postmaster."""
        return cls(cfg.data_dir, cfg.delivery.plus_separator, cfg.server.hostname,
                   getattr(getattr(cfg, "accounts", None), "postmaster", ""))

    # --- files -----------------------------------------------------------------
    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self.data_dir / "domains", self.data_dir / "accounts", self.data_dir / "aliases"

    @property
    def quota_path(self) -> Path:
        return self.data_dir / "quotas"

    def _stat(self) -> tuple:
        out = []
        for p in (*self.paths, self.quota_path):
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def load(self) -> None:
        """(Re)read the three files. Raises DirectoryError naming the file and line on bad content."""
        mtimes = self._stat()
        domains_p, accounts_p, aliases_p = self.paths
        domains = {normalize_domain(d) for d in _read_lines(domains_p)}
        accounts: dict[str, str] = {}
        lines = _read_lines(accounts_p)
        for n, line in enumerate(lines, 1):
            addr, sep, pwhash = line.partition(":")
            pwhash = pwhash.strip()
            # An argon2 hash must be complete: a line cut short is refused, not taken for a wrong
            # password.  (Anything else is kept: it simply never verifies, i.e. a locked account.)
            if not sep or "@" not in addr or not pwhash or (pwhash.startswith("$argon2")
                                                            and not _HASH_RE.match(pwhash)):
                raise DirectoryError(f"{accounts_p}: line {n}: expected user@domain:<complete argon2 hash>")
            accounts[normalize_address(addr)] = pwhash
        expected = _declared_count(accounts_p)
        if expected is not None and expected != len(lines):
            # A cut exactly at a line end looks well-formed: the count the CLI wrote says otherwise.
            raise DirectoryError(f"{accounts_p}: {len(lines)} entries, but its first line says {expected} (cut "
                                 "short? after a hand edit, correct or delete that line)")
        aliases: dict[str, tuple[str, ...]] = {}
        for n, line in enumerate(_read_lines(aliases_p), 1):
            src, sep, dst = line.partition(":")
            targets = tuple(normalize_address(t) for t in dst.replace(",", " ").split())
            if not sep or "@" not in src or not targets:
                raise DirectoryError(f"{aliases_p}: line {n}: expected source@domain: target[, target...]")
            aliases[normalize_address(src)] = targets
        quotas = _read_quotas(self.quota_path)
        self.domains, self.accounts, self.aliases, self._mtimes = domains, accounts, aliases, mtimes
        self.quotas = quotas
        self.system_users = _system_users()
        self._verified.clear()
        self._refused = None

    def reload_if_changed(self) -> bool:
        """Re-read the files if any changed on disk. Cheap: three stat() calls.  A version that
        was refused (DirectoryError, raised once) is not read again until the files change."""
        stat = self._stat()
        if stat == self._mtimes or stat == self._refused:
            return False
        try:
            self.load()
        except DirectoryError:
            self._refused = stat
            raise
        return True

    def save(self) -> None:
        domains_p, accounts_p, aliases_p = self.paths
        self.data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(domains_p, "".join(f"{d}\n" for d in sorted(self.domains)).encode(), mode=0o600)
        # In the order made (not sorted): the first account is the default postmaster.
        header = _COUNT_FORMAT.format(len(self.accounts))
        atomic_write(accounts_p, (header + "".join(f"{a}:{h}\n" for a, h in self.accounts.items())).encode(),
                     mode=0o600)
        atomic_write(aliases_p,
                     "".join(f"{s}: {', '.join(t)}\n" for s, t in sorted(self.aliases.items())).encode(),
                     mode=0o600)
        if self.quotas or self.quota_path.exists():
            atomic_write(self.quota_path, _format_quotas(self.quotas), mode=0o600)
        self._mtimes = self._stat()

    # --- lookups -------------------------------------------------------------------
    def is_local_domain(self, domain: str) -> bool:
        return normalize_domain(domain) in self.domains

    def _strip_plus(self, address: str) -> str:
        local, domain = split_address(address)
        sep = self.plus_separator
        if sep and sep in local:
            return f"{local.split(sep, 1)[0]}@{domain}"
        return address

    def postmaster_account(self) -> str | None:
        """Where postmaster mail goes: accounts.postmaster when it names an account (or an alias),
        else the first account made; None while there is no account."""
        if self.postmaster:
            pm = normalize_address(self.postmaster)
            if pm in self.accounts or pm in self.aliases:
                return pm
        return next(iter(self.accounts), None)

    def is_host_name(self, domain: str) -> bool:
        """No domain, localhost or this host's own name (Postfix's $myhostname, localhost)."""
        return not domain or domain in ("localhost", "localhost.localdomain") or domain == self.hostname

    def resolve(self, address: str) -> Resolution:
        """Resolve one envelope recipient. Address tricks (%, !, quoted @) are never
        interpreted as routing: such a local part is just an unknown user.

        Remembered per address until the lookup state changes (__setattr__, the tracked
        containers): SMTP resolves each recipient three to five times a message.  SRS
        addresses are not remembered (their answer depends on the time)."""
        memo = self._resolved
        res = memo.get(address)
        if res is None:
            res, stable = self._resolve(address)
            if stable:
                if len(memo) >= MEMO_MAX:
                    memo.clear()
                memo[address] = res
        return res

    def _resolve(self, address: str) -> tuple[Resolution, bool]:
        res = self._resolve_now(address)
        srs = self.srs_reverse is not None and normalize_address(address)[:4] in ("srs0", "srs1")
        return res, not srs

    def _resolve_now(self, address: str) -> Resolution:
        address = normalize_address(address)
        local, domain = split_address(address) if "@" in address else (address, "")
        if self.srs_reverse is not None and local[:4] in ("srs0", "srs1"):
            original = self.srs_reverse(address)
            if original is not None:  # a bounce to forwarded mail, or a forged/expired address
                return Resolution("alias", targets=(original,)) if original else Resolution("unknown")
        if domain not in self.domains:
            if not self.is_host_name(domain):
                return Resolution("remote")
            # This host's own names: root, postmaster, cron's mail for system users.
            base = self._strip_plus(f"{local}@x").rpartition("@")[0]
            if base in SYSTEM_NAMES or base in self.system_users:
                return self._to_postmaster()
            return Resolution("unknown")
        for candidate in dict.fromkeys((address, self._strip_plus(address))):
            if candidate in self.aliases:
                return Resolution("alias", targets=self.aliases[candidate])
            if candidate in self.accounts:
                return Resolution("local", account=candidate)
        if f"@{domain}" in self.aliases:
            return Resolution("alias", targets=self.aliases[f"@{domain}"])
        if self._strip_plus(address).rpartition("@")[0] in ROLE_NAMES:
            return self._to_postmaster()
        return Resolution("unknown")

    def _to_postmaster(self) -> Resolution:
        pm = self.postmaster_account()
        return Resolution("alias", targets=(pm,)) if pm else Resolution("unknown")

    def _expand_now(self, address: str) -> tuple[list[str], list[str], bool]:
        """expand() without its memo; the flag: no SRS address on the way (rememberable)."""
        stable = [True]
        local: dict[str, None] = {}
        remote: dict[str, None] = {}
        seen: set[str] = set()

        def walk(addr: str, depth: int) -> None:
            if addr in seen or depth > MAX_ALIAS_DEPTH or len(local) + len(remote) >= MAX_EXPANSION:
                return
            seen.add(addr)
            res = self.resolve(addr)
            if self.srs_reverse is not None and addr[:4] in ("srs0", "srs1"):
                stable[0] = False
            if res.kind == "local":
                local[res.account] = None
            elif res.kind == "remote":
                remote[normalize_address(addr)] = None
            elif res.kind == "alias":
                for target in res.targets:
                    # an alias pointing at itself (e.g. keep a copy) means the account of that name
                    if target == normalize_address(addr) and target in self.accounts:
                        local[target] = None
                    else:
                        walk(target, depth + 1)

        walk(normalize_address(address), 0)
        return list(local), list(remote), stable[0]

    def expand(self, address: str) -> tuple[list[str], list[str]]:
        """Expand aliases recursively -> (local accounts, remote addresses), de-duplicated.
        Unknown local targets and loops are dropped (a loop cannot grow the list).
        Remembered as resolve() is; never through an SRS address (time-dependent)."""
        memo = self._expanded
        hit = memo.get(address)
        if hit is None:
            local, remote, stable = self._expand_now(address)
            hit = (tuple(local), tuple(remote))
            if stable:
                if len(memo) >= MEMO_MAX:
                    memo.clear()
                memo[address] = hit
        return list(hit[0]), list(hit[1])

    def owns_address(self, account: str, address: str) -> bool:
        """May `account` use `address` as envelope sender? Its own address (with or without a
        +tag), or an alias whose expansion includes the account."""
        account = normalize_address(account)
        address = normalize_address(address)
        if address == account or self._strip_plus(address) == account:
            return True
        for candidate in (address, self._strip_plus(address)):
            if candidate in self.aliases:
                local, _ = self.expand(candidate)
                if account in local:
                    return True
        return False

    def account_exists(self, account: str) -> bool:
        return normalize_address(account) in self.accounts

    # --- credentials -----------------------------------------------------------------
    def _cache_id(self, account: str, password: bytes) -> bytes:
        return hmac.new(self._cache_key, account.encode() + b"\0" + password, hashlib.sha256).digest()

    # Verified passwords are remembered this long (Dovecot's auth_cache_ttl is one hour).
    CACHE_TTL = 3600.0

    def _cached(self, account: str, stored: str, token: bytes) -> bool:
        cached = self._verified.get(account)
        if not cached or cached[0] != stored or time.monotonic() - cached[2] > self.CACHE_TTL:
            return False
        return hmac.compare_digest(cached[1], token)

    def check_password(self, username: str, password: str | bytes) -> str | None:
        """Blocking (argon2): call through authenticate() from the event loop."""
        account = normalize_address(username)
        if isinstance(password, str):
            password = password.encode("utf-8")
        stored = self.accounts.get(account)
        if stored is None:
            # Spend the same time as a real check so that timing does not reveal accounts.
            try:
                _hasher.verify(_dummy_hash(), password)
            except VerificationError:
                pass
            return None
        token = self._cache_id(account, password)
        if self._cached(account, stored, token):
            return account
        try:
            _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        # Keyed to the stored hash: a new password (or a reload with another hash) forgets it.
        self._verified[account] = (stored, token, time.monotonic())
        return account

    async def authenticate(self, username: str, password: str | bytes) -> str | None:
        """Verify credentials off the event loop. Returns the account address or None.

        A password verified within CACHE_TTL is answered on the loop (one HMAC, ~2 us) with no
        thread hand-off.  Everything else goes to the argon2 pool (one thread per core: argon2
        is CPU and ~64 MiB each, more threads would only queue in the kernel), and logins that
        arrive together with the same credentials wait for one verification instead of each
        running argon2 (an IMAP client opening several connections, a burst of reconnects)."""
        account = normalize_address(username)
        if isinstance(password, str):
            password = password.encode("utf-8")
        token = self._cache_id(account, password)
        stored = self.accounts.get(account)
        if stored is not None and self._cached(account, stored, token):
            return account
        key = (account, token)
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(_argon2_pool(), self.check_password, account, password)
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f, key=key: self._inflight.pop(key, None))
        return await asyncio.shield(fut)  # one cancelled login must not fail the others waiting

    # --- edits (CLI) -------------------------------------------------------------------
    def add_domain(self, domain: str) -> None:
        domain = normalize_domain(domain)
        if not domain or "." not in domain and domain != "localhost" or any(c in domain for c in "@ :/"):
            raise DirectoryError(f"{domain!r} is not a domain name")
        if domain in self.domains:
            raise DirectoryError(f"domain {domain} exists already")
        self.domains.add(domain)

    def del_domain(self, domain: str) -> None:
        domain = normalize_domain(domain)
        if domain not in self.domains:
            raise DirectoryError(f"no domain {domain}")
        users = [a for a in self.accounts if a.endswith("@" + domain)]
        if users:
            raise DirectoryError(f"domain {domain} still has accounts: {', '.join(users)}")
        self.domains.discard(domain)
        self.aliases = {s: t for s, t in self.aliases.items() if not s.endswith("@" + domain)}

    def _check_new_address(self, address: str) -> str:
        address = normalize_address(address)
        local, domain = split_address(address)
        reason = check_local_part(local) or (None if domain else "no domain")
        if reason is None and any(c in local for c in "%!"):
            reason = "routing characters (% !) in the local part"
        if reason:
            raise DirectoryError(f"{address!r} is not a valid address for an account: {reason}")
        if domain not in self.domains:
            raise DirectoryError(f"{domain} is not a local domain (add it with `mailstack domain add {domain}`)")
        return address

    def add_user(self, address: str, password: str) -> str:
        address = self._check_new_address(address)
        if address in self.accounts:
            raise DirectoryError(f"account {address} exists already")
        if not password:
            raise DirectoryError("empty password")
        self.accounts[address] = hash_password(password)
        return address

    def set_password(self, address: str, password: str) -> None:
        address = normalize_address(address)
        if address not in self.accounts:
            raise DirectoryError(f"no account {address}")
        if not password:
            raise DirectoryError("empty password")
        self.accounts[address] = hash_password(password)

    def del_user(self, address: str) -> None:
        address = normalize_address(address)
        if address not in self.accounts:
            raise DirectoryError(f"no account {address}")
        del self.accounts[address]
        self.quotas.pop(address, None)

    def set_quota(self, address: str, storage: int | None, messages: int | None) -> None:
        """The account's own limits (bytes, messages; 0 = no limit); None for both removes
        them (quota.default_* apply again); messages None alone keeps the current one."""
        address = normalize_address(address)
        if address not in self.accounts:
            raise DirectoryError(f"no account {address}")
        if storage is None and messages is None:
            self.quotas.pop(address, None)
            return
        own = dict(self.quotas.get(address, {}))
        if storage is not None:
            own["storage"] = storage
        if messages is not None:
            own["messages"] = messages
        self.quotas[address] = own

    def add_alias(self, source: str, targets: list[str]) -> None:
        source = normalize_address(source)
        local, domain = split_address(source)
        if domain not in self.domains:
            raise DirectoryError(f"{domain} is not a local domain")
        if not targets or any("@" not in t for t in targets):
            raise DirectoryError("an alias needs one or more target addresses (user@domain)")
        existing = self.aliases.get(source, ())
        self.aliases[source] = tuple(dict.fromkeys(existing + tuple(normalize_address(t) for t in targets)))

    def del_alias(self, source: str, targets: list[str] | None = None) -> None:
        source = normalize_address(source)
        if source not in self.aliases:
            raise DirectoryError(f"no alias {source}")
        if targets:
            keep = tuple(t for t in self.aliases[source] if t not in {normalize_address(x) for x in targets})
            if keep:
                self.aliases[source] = keep
                return
        del self.aliases[source]


_QUOTA_KEYS = ("storage", "messages")


def _read_quotas(path: Path) -> dict[str, dict[str, int]]:
    """The quotas file: "user@domain: storage=1G messages=1000" per line."""
    from .store.quota import parse_size
    out: dict[str, dict[str, int]] = {}
    for n, line in enumerate(_read_lines(path), 1):
        addr, sep, rest = line.partition(":")
        own: dict[str, int] = {}
        for word in rest.split():
            key, eq, value = word.partition("=")
            try:
                if key not in _QUOTA_KEYS or not eq or key in own:
                    raise ValueError
                own[key] = parse_size(value) if key == "storage" else int(value, 10)
            except ValueError:
                own = {}
                break
        if not sep or "@" not in addr or not own or any(v < 0 for v in own.values()):
            raise DirectoryError(f"{path}: line {n}: expected user@domain: storage=SIZE messages=N "
                                 "(either or both; SIZE like 500M or 2G)")
        out[normalize_address(addr)] = own
    return out


def _format_quotas(quotas: dict[str, dict[str, int]]) -> bytes:
    from .store.quota import format_size
    lines = ["# mailstack quotas: user@domain: storage=SIZE messages=N (a missing key = quota.default_*, "
             "0 = no limit)\n"]
    for addr, own in sorted(quotas.items()):
        words = []
        if "storage" in own:
            size = own["storage"]
            exact = format_size(size)
            words.append(f"storage={exact if '.' not in exact and exact[-1] != 'B' else size}")
        if "messages" in own:
            words.append(f"messages={own['messages']}")
        lines.append(f"{addr}: {' '.join(words)}\n")
    return "".join(lines).encode()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    """A hash to verify against for unknown accounts; made on first use, not at import
    (argon2 costs ~0.5 s of start-up for every CLI call otherwise)."""
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_hex(16)))
    return _DUMMY[0]


# The most common passwords of the public breach lists (top of the RockYou / NCSC lists),
# refused even when long enough.  Short on purpose: a policy floor, not a cracking list.
COMMON_PASSWORDS = frozenset("""
123456789012 1234567890123 12345678901234 123456123456 111111111111 000000000000 password1234
passwordpassword qwertyuiopas qwertyuiop12 qwerty123456 1q2w3e4r5t6y 1qaz2wsx3edc abc123abc123
iloveyou1234 letmein12345 welcome12345 administrator changeme1234 adminadmin12 trustno12345
football1234 baseball1234 sunshine1234 princess1234 dragon123456 monkey123456 master123456
superman1234 starwars1234 whatever1234 passw0rd1234 p@ssw0rd1234 password123! password12345
correcthorsebatterystaple 123123123123 987654321098 asdfghjkl123 zxcvbnm12345 qazwsxedcrfv
password 12345678 123456789 1234567890 qwertyuiop iloveyou sunshine princess football
baseball welcome letmein monkey dragon master superman starwars whatever passw0rd p@ssw0rd
abc12345 password1 password123 qwerty123 1q2w3e4r 11111111 00000000 87654321 changeme
""".split())
