"""config.toml -> validated, typed settings.

The schema below is the single source of truth: validation, defaults, the
effective-settings dump of `mailstack config check` and the README reference are
all driven by it.  Every error names the key (`section.key`) and the reason, in
one line, so a bad configuration stops the start with a message a person can act on.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable


class ConfigError(Exception):
    """A configuration problem; str() is one line that names the key."""


@dataclass(frozen=True)
class Key:
    kind: str  # str | int | float | bool | path | enum | addrs | cidrs | strlist | table
    default: Any
    doc: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)


MiB = 1024 * 1024

# Listener defaults: the standard ports on every address.
_LISTENERS = {
    "smtp": ("0.0.0.0:25", "SMTP from the internet (MX); STARTTLS offered, no AUTH needed to receive local mail"),
    "submissions": ("0.0.0.0:465", "submission over implicit TLS (RFC 8314); AUTH required"),
    "submission": ("0.0.0.0:587", "submission; STARTTLS then AUTH required"),
    "imap": ("0.0.0.0:143", "IMAP with STARTTLS"),
    "imaps": ("0.0.0.0:993", "IMAP over implicit TLS"),
    "pop3": ("0.0.0.0:110", "POP3 with STLS"),
    "pop3s": ("0.0.0.0:995", "POP3 over implicit TLS"),
}

SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key("str", "", "Fully qualified name of this host: used in banners, HELO/EHLO, Received: "
                        "and the self-signed certificate. Empty = the system's FQDN."),
        "data_dir": Key("path", "data", "Where all state lives: queue, Maildirs, accounts, certificates. "
                        "A relative path is relative to this file's folder."),
        "user": Key("str", "", "When started as root: the unprivileged user to switch to after binding "
                    "ports and reading keys. Empty = stay as started."),
        "log_level": Key("enum", "info", "Least severe log level written to stderr.",
                         choices=("debug", "info", "warning", "error")),
        "log_format": Key("enum", "text", "Log line format: one event per line, plain text or JSON.",
                          choices=("text", "json")),
        "shutdown_grace": Key("float", 10.0, "Seconds that open sessions get to finish on SIGTERM/SIGINT "
                              "before they are closed.", min=0, max=600),
        "event_loop": Key("enum", "auto", "Event loop: `auto` uses uvloop when it is installed, else asyncio's.",
                          choices=("auto", "uvloop", "asyncio")),
        "control_socket": Key("path", "", "Unix socket the CLI uses to act on the running server "
                              "(mode 0600). Empty = <data_dir>/control.sock."),
    },
    "listen": {name: Key("addrs", [addr], doc) for name, (addr, doc) in _LISTENERS.items()},
    "tls": {
        "cert": Key("path", "", "PEM certificate chain. Empty = <data_dir>/tls/cert.pem, created self-signed "
                    "on first start if missing."),
        "key": Key("path", "", "PEM private key for `cert`. Empty = <data_dir>/tls/key.pem."),
        "min_version": Key("enum", "TLSv1.2", "Oldest TLS version accepted by every listener.",
                           choices=("TLSv1.2", "TLSv1.3")),
    },
    "smtp": {
        "max_message_size": Key("int", 25 * MiB, "Largest message accepted, in bytes (advertised as SIZE).",
                                min=1024, max=2**31),
        "max_recipients": Key("int", 1000, "Recipients per message; more get 452 4.5.3.", min=1, max=100000),
        "max_line_length": Key("int", 4096, "Longest line of message text, in bytes including CRLF "
                               "(RFC 5321 asks for 1000; real mail sometimes exceeds it).",
                               min=1000, max=1 * MiB),
        "max_connections": Key("int", 200, "Concurrent SMTP sessions across all SMTP listeners; more get "
                               "421 4.7.0.", min=1, max=100000),
        "max_connections_per_ip": Key("int", 20, "Concurrent SMTP sessions from one client address.",
                                      min=1, max=100000),
        "command_timeout": Key("float", 300.0, "Seconds a client may stay silent between commands "
                               "(RFC 5321 4.5.3.2.7 asks for at least 5 minutes).", min=1, max=3600),
        "max_session_time": Key("float", 3600.0, "Seconds one SMTP session may last in total.", min=1,
                                max=86400),
        "max_data_in_flight": Key("int", 256 * MiB, "Bytes of DATA held in memory across all sessions at "
                                  "once; a session that would exceed it gets 451 4.3.1 and may retry.",
                                  min=1 * MiB, max=2**40),
        "bare_lf": Key("enum", "reject", "What to do with a bare LF or bare CR in commands or message text: "
                       "`reject` answers 5xx (as mox does); `normalize` turns it into CRLF (as Postfix 3.9). "
                       "Either way only <CR><LF>.<CR><LF> ends DATA.", choices=("reject", "normalize")),
        "trusted_networks": Key("cidrs", [], "Client networks allowed to relay without AUTH (Postfix's "
                                "mynetworks). Empty = nobody: only authenticated users relay."),
        "max_errors": Key("int", 10, "Protocol errors tolerated in one session before 421 and disconnect.",
                          min=1, max=1000),
    },
    "imap": {
        "allow_plaintext_auth": Key("bool", False, "Allow LOGIN/AUTHENTICATE before TLS. Leave off."),
        "idle_timeout": Key("float", 1800.0, "Seconds of silence (and of IDLE) before autologout; "
                            "RFC 3501 asks for at least 30 minutes.", min=30, max=86400),
        "max_line_length": Key("int", 65536, "Longest command line, in bytes, literals excluded.",
                               min=1024, max=16 * MiB),
        "max_connections": Key("int", 20000, "Concurrent IMAP sessions.", min=1, max=1000000),
        "max_connections_per_ip": Key("int", 10000, "Concurrent IMAP sessions from one client address.",
                                      min=1, max=1000000),
    },
    "pop3": {
        "allow_plaintext_auth": Key("bool", False, "Allow USER/PASS and AUTH before TLS. Leave off."),
        "idle_timeout": Key("float", 600.0, "Seconds of silence before the session is closed; RFC 1939 "
                            "asks for at least 10 minutes.", min=30, max=86400),
        "max_connections": Key("int", 1000, "Concurrent POP3 sessions.", min=1, max=1000000),
    },
    "auth": {
        "fail_delay": Key("float", 1.0, "Delay after a failed login; it doubles with each further failure "
                          "from the same address or for the same account.", min=0, max=60),
        "fail_delay_max": Key("float", 30.0, "Cap on the failed-login delay, in seconds.", min=0, max=600),
        "fail_window": Key("float", 900.0, "Seconds after which failures are forgotten.", min=1, max=86400),
    },
    "queue": {
        "retry_min": Key("float", 300.0, "First retry delay for a deferred message, in seconds "
                         "(Postfix minimal_backoff_time).", min=0.01, max=86400),
        "retry_max": Key("float", 4000.0, "Longest retry delay; the delay doubles up to this "
                         "(Postfix maximal_backoff_time).", min=0.01, max=604800),
        "max_lifetime": Key("float", 5 * 86400.0, "Seconds a message may stay queued before it bounces "
                            "(Postfix maximal_queue_lifetime).", min=1, max=100 * 86400),
        "local_concurrency": Key("int", 20, "Messages delivered into Maildirs at once.", min=1, max=1000),
    },
    "delivery": {
        "plus_separator": Key("str", "+", "Recipient delimiter: user+tag@domain is delivered to user@domain. "
                              "Empty = off."),
    },
}


class _Section(SimpleNamespace):
    def as_dict(self) -> dict:
        return dict(vars(self))


def _check_value(name: str, key: Key, value: Any, base: Path) -> Any:
    """Convert and validate one value; raise ConfigError naming `name`."""

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{name}: {reason}")

    kind = key.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be a whole number, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got {value!r}")
        value = float(value)
    elif kind in ("str", "enum", "path"):
        if not isinstance(value, str):
            raise bad(f"must be a string, got {value!r}")
        if "\x00" in value:
            raise bad("must not contain NUL")
        if kind == "enum" and value not in key.choices:
            raise bad(f"must be one of {', '.join(key.choices)}, got {value!r}")
        if kind == "path" and value:
            value = str((base / value).resolve()) if not os.path.isabs(value) else value
    elif kind in ("addrs", "cidrs", "strlist"):
        if isinstance(value, str) and kind == "addrs":
            value = [value] if value else []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"must be a list of strings, got {value!r}")
        if kind == "addrs":
            value = [parse_hostport(name, v) for v in value]
        elif kind == "cidrs":
            try:
                value = [ipaddress.ip_network(v, strict=False) for v in value]
            except ValueError as e:
                raise bad(f"not a network address: {e}") from None
    elif kind == "table":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad(f"must be a table of strings, got {value!r}")
        value = dict(value)
    else:  # pragma: no cover - schema bug
        raise bad(f"unknown kind {kind}")
    if key.min is not None and value < key.min:
        raise bad(f"must be at least {key.min:g}, got {value!r}")
    if key.max is not None and value > key.max:
        raise bad(f"must be at most {key.max:g}, got {value!r}")
    if key.check is not None:
        reason = key.check(value)
        if reason:
            raise bad(reason)
    return value


def parse_hostport(name: str, text: str) -> tuple[str, int]:
    """'0.0.0.0:25', '[::1]:25', ':25' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: {text!r} is not host:port (e.g. \"0.0.0.0:25\" or \"[::1]:25\")")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass
class Config:
    """Validated settings. Sections are attributes: cfg.smtp.max_message_size."""

    path: Path | None
    sections: dict[str, _Section]

    def __getattr__(self, item: str) -> _Section:
        try:
            return self.__dict__["sections"][item]
        except KeyError:
            raise AttributeError(item) from None

    # Derived paths, so every module agrees on the layout under data_dir.
    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def control_socket(self) -> Path:
        return Path(self.server.control_socket or self.data_dir / "control.sock")


def from_dict(raw: dict, base: Path, path: Path | None = None) -> Config:
    sections: dict[str, _Section] = {}
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a table ([{section}])")
        for key in raw[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{section}.{key}: unknown key")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        values = {}
        for key, spec in keys.items():
            name = f"{section}.{key}"
            value = given.get(key, spec.default)
            values[key] = _check_value(name, spec, value, base)
        sections[section] = _Section(**values)
    if not sections["server"].hostname:
        sections["server"].hostname = socket.getfqdn() or "localhost"
    cfg = Config(path=path, sections=sections)
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    if cfg.queue.retry_max < cfg.queue.retry_min:
        raise ConfigError("queue.retry_max: must not be smaller than queue.retry_min")
    if cfg.auth.fail_delay_max < cfg.auth.fail_delay:
        raise ConfigError("auth.fail_delay_max: must not be smaller than auth.fail_delay")
    if bool(cfg.tls.cert) != bool(cfg.tls.key):
        raise ConfigError("tls.key: tls.cert and tls.key must be given together")
    seen: dict[tuple[str, int], str] = {}
    for name, addrs in cfg.listen.as_dict().items():
        for addr in addrs:
            if addr[1] != 0 and addr in seen:
                raise ConfigError(f"listen.{name}: {addr[0]}:{addr[1]} is also used by listen.{seen[addr]}")
            seen[addr] = name


def load(path: str | os.PathLike) -> Config:
    """Read and validate a config file. Raises ConfigError (one line, naming the key)."""
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(raw, base=path.parent, path=path)


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        items = []
        for v in value:
            if isinstance(v, tuple):
                host = f"[{v[0]}]" if ":" in v[0] else v[0]
                items.append(f'"{host}:{v[1]}"')
            else:
                items.append(f'"{v}"')
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = "{v}"' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump(cfg: Config) -> str:
    """Effective settings, defaults included, as TOML (like `postconf`)."""
    out = []
    for section in SCHEMA:
        out.append(f"[{section}]")
        for key, value in cfg.sections[section].as_dict().items():
            out.append(f"{key} = {_render(value)}")
        out.append("")
    return "\n".join(out)
