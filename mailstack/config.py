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
    secret: bool = False  # never printed by `config check`


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
    "managesieve": ("0.0.0.0:4190", "ManageSieve (RFC 5804): users upload their Sieve filters; STARTTLS, "
                    "then AUTHENTICATE PLAIN"),
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
        "idle_refresh": Key("float", 30.0, "Seconds between looks at the mailbox during IDLE, to notice "
                            "changes made by other programs (in-process deliveries are pushed at once).",
                            min=0.05, max=3600),
    },
    "pop3": {
        "allow_plaintext_auth": Key("bool", False, "Allow USER/PASS and AUTH before TLS. Leave off."),
        "idle_timeout": Key("float", 600.0, "Seconds of silence before the session is closed; RFC 1939 "
                            "asks for at least 10 minutes.", min=1, max=86400),
        "max_connections": Key("int", 1000, "Concurrent POP3 sessions.", min=1, max=1000000),
        "max_connections_per_ip": Key("int", 100, "Concurrent POP3 sessions from one client address.",
                                      min=1, max=1000000),
        "max_line_length": Key("int", 4096, "Longest command line in bytes, CRLF included (RFC 2449 asks "
                               "for 255; AUTH PLAIN responses can be longer).", min=512, max=1 * MiB),
        "max_commands": Key("int", 1000000, "Commands one session may send before it is closed.",
                            min=10, max=2**31),
        "max_errors": Key("int", 20, "Malformed or unknown commands tolerated in one session before "
                          "-ERR and disconnect.", min=1, max=10000),
    },
    "proxy": {
        "trusted": Key("cidrs", [], "Addresses of proxies (HAProxy, Traefik, Docker's proxy) whose connections "
                       "must start with a PROXY protocol v1 or v2 header giving the real client address; "
                       "empty = off (turning it on or off takes a restart)."),
        "timeout": Key("float", 5.0, "Seconds a trusted proxy may take to send the PROXY header before the "
                       "connection is closed.", min=0.1, max=300),
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
        "remote_concurrency": Key("int", 100, "Messages handed to the outbound SMTP client at once "
                                  "(connections are limited by delivery.max_connections).",
                                  min=1, max=1000),
    },
    "delivery": {
        "plus_separator": Key("str", "+", "Recipient delimiter: user+tag@domain is delivered to user@domain. "
                              "Empty = off."),
        "outbound": Key("bool", True, "Deliver mail for remote recipients over SMTP (MX, relayhost or "
                        "transports). Off = no SMTP client: remote recipients stay deferred."),
        "relayhost": Key("str", "", "Send all remote mail through this host (Postfix relayhost): \"[host]:port\" "
                         "connects to host directly, \"host\" looks up its MX first. Empty = MX routing.",
                         check=lambda v: _nexthop_error(v) if v else None),
        "relayhost_username": Key("str", "", "AUTH user name for the relayhost (sent only over TLS). "
                                  "Empty = no AUTH."),
        "relayhost_password": Key("str", "", "AUTH password for the relayhost (never printed by "
                                  "`config check`; keep this file mode 0600).", secret=True),
        "relayhost_implicit_tls": Key("bool", False, "Speak TLS to the relayhost from the first byte (port "
                                      "465, RFC 8314) instead of STARTTLS (Postfix smtp_tls_wrappermode); "
                                      "the certificate is checked only with tls_security_level = verify."),
        "transports": Key("table", {}, "Per-domain next hop overriding relayhost and MX, e.g. "
                          "{ \"example.org\" = \"[10.0.0.5]:25\" } (Postfix transport_maps).",
                          check=lambda t: next(filter(None, (_nexthop_error(v, k) for k, v in t.items())), None)),
        "port": Key("int", 25, "TCP port for next hops that name none: MX hosts of recipient domains, "
                    "relayhost or transports without \":port\" (Postfix smtp_tcp_port).", min=1, max=65535),
        "tls_security_level": Key("enum", "may", "STARTTLS policy of the SMTP client (Postfix "
                                  "smtp_tls_security_level): none, may (opportunistic, unverified), encrypt "
                                  "(TLS required, unverified), verify (TLS required, certificate and MX host "
                                  "name checked).", choices=("none", "may", "encrypt", "verify")),
        "tls_ca_file": Key("path", "", "PEM CA certificates trusted by `verify`. Empty = the system's CA store."),
        "helo_name": Key("str", "", "Name sent in EHLO/HELO. Empty = server.hostname."),
        "connect_timeout": Key("float", 30.0, "Seconds to wait for a TCP connection and the greeting "
                               "(Postfix smtp_connect_timeout).", min=0.1, max=3600),
        "command_timeout": Key("float", 300.0, "Seconds to wait for the reply to a command, and for each "
                               "chunk of message text to be sent (Postfix smtp_*_timeout).", min=0.1, max=3600),
        "data_timeout": Key("float", 600.0, "Seconds to wait for the reply after the final \".\" "
                            "(Postfix smtp_data_done_timeout).", min=0.1, max=3600),
        "destination_concurrency": Key("int", 20, "Deliveries in progress at once to one destination "
                                       "(Postfix default_destination_concurrency_limit).", min=1, max=10000),
        "max_connections": Key("int", 100, "Outbound SMTP deliveries in progress at once, all destinations "
                               "together (Postfix default_process_limit).", min=1, max=100000),
        "destination_recipient_limit": Key("int", 50, "Recipients per SMTP transaction (Postfix "
                                           "default_destination_recipient_limit).", min=1, max=100000),
        "connection_cache_time": Key("float", 2.0, "Seconds an idle connection is kept for the next message "
                                     "to the same destination; 0 = no reuse (Postfix "
                                     "smtp_connection_cache_time_limit).", min=0, max=300),
        "connection_reuse_time": Key("float", 300.0, "Seconds after which a connection is no longer reused "
                                     "(Postfix smtp_connection_reuse_time_limit).", min=1, max=86400),
        "mx_address_limit": Key("int", 5, "Server addresses tried per delivery attempt, over all MX hosts "
                                "(Postfix smtp_mx_address_limit).", min=1, max=100),
        "inet_protocols": Key("enum", "all", "Address families used to reach remote servers; `all` tries "
                              "IPv4 addresses before IPv6.", choices=("all", "ipv4", "ipv6")),
    },
    "dns": {
        "nameservers": Key("strlist", [], "Resolvers to ask, as \"host\" or \"host:port\" (\"[::1]:53\"). "
                           "Empty = those of /etc/resolv.conf.",
                           check=lambda v: next(filter(None, (_nameserver_error(x) for x in v)), None)),
        "timeout": Key("float", 10.0, "Seconds one DNS lookup may take over all tries; a timeout defers "
                       "delivery.", min=0.1, max=300),
    },
    "dkim": {
        "enabled": Key("bool", True, "Sign outbound mail whose From: domain has a key in <data_dir>/dkim/."),
        "selector": Key("str", "mail", "Selector used by `mailstack dkim keygen` and preferred when signing "
                        "(key file <data_dir>/dkim/<domain>.<selector>.key).",
                        check=lambda v: None if v and v.isascii() and all(c.isalnum() or c in "-_" for c in v)
                        else "must be letters, digits, '-' or '_'"),
    },
    # --- sieve / managesieve (issue 15) ------------------------------------------------
    "sieve": {  # sieve.before/after must name a script that compiles: checked at start, not at a delivery
        "enabled": Key("bool", True, "Run users' Sieve filters (and the global ones) at local delivery."),
        "before": Key("path", "", "A global Sieve script run for every account before the user's own "
                      "(Pigeonhole's sieve_before). Empty = none.",
                      check=lambda v: __import__("mailstack.sieve.scripts", fromlist=["_"]).global_script_error(v)),
        "after": Key("path", "", "A global Sieve script run for every account after the user's own "
                     "(Pigeonhole's sieve_after). Empty = none.",
                     check=lambda v: __import__("mailstack.sieve.scripts", fromlist=["_"]).global_script_error(v)),
        "max_script_size": Key("int", 64 * 1024, "Largest Sieve script, in bytes.", min=1024, max=16 * MiB),
        "max_scripts": Key("int", 20, "Sieve scripts one account may store.", min=1, max=10000),
        "max_steps": Key("int", 10000, "Commands and tests one delivery may evaluate (across every "
                         "script); more is a run-time error and the message goes to INBOX.", min=100,
                         max=10_000_000),
        "max_actions": Key("int", 32, "Actions one delivery may take (fileinto, redirect, ...).", min=1, max=1000),
        "max_redirects": Key("int", 4, "Redirects one delivery may make.", min=0, max=100),
        "max_include_depth": Key("int", 5, "How deep `include` may nest.", min=1, max=50),
        "vacation_min_period": Key("float", 86400.0, "Shortest time between two vacation replies to one "
                                   "sender, in seconds; a shorter :days/:seconds is raised to it.",
                                   min=0, max=90 * 86400),
        "vacation_max_period": Key("float", 90 * 86400.0, "Longest time between two vacation replies to one "
                                   "sender, in seconds.", min=0, max=365 * 86400),
    },
    "managesieve": {
        "max_connections": Key("int", 1000, "Concurrent ManageSieve sessions.", min=1, max=100000),
        "max_connections_per_ip": Key("int", 20, "Concurrent ManageSieve sessions from one address.",
                                      min=1, max=100000),
        "idle_timeout": Key("float", 1800.0, "Seconds of silence before the session is closed.",
                            min=10, max=86400),
        "max_line_length": Key("int", 8192, "Longest command line, in bytes, literals excluded.",
                               min=1024, max=1 * MiB),
    },
    "metrics": {
        "listen": Key("str", "", "Serve Prometheus metrics (GET /metrics) on this \"host:port\", e.g. "
                      "\"127.0.0.1:9100\". Keep it on loopback or a private network: it is plain HTTP "
                      "without authentication. Empty = off.",
                      check=lambda v: _hostport_error(v) if v else None),
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
            if SCHEMA[section][key].secret and value:
                out.append(f'{key} = "********"  # set, not shown')
                continue
            out.append(f"{key} = {_render(value)}")
        out.append("")
    return "\n".join(out)


SECTION_DOCS = {
    "server": "The process: names, where state lives, logging, privileges.",
    "listen": "Listeners: a list of \"host:port\" per protocol; [] turns one off.",
    "tls": "Certificates and TLS versions, shared by every listener.",
    "smtp": "SMTP in (25, 465, 587): limits and policy.",
    "imap": "IMAP (143, 993).",
    "pop3": "POP3 (110, 995).",
    "proxy": "PROXY protocol from trusted proxies in front of every listener.",
    "auth": "Failed-login slow-down, shared by SMTP AUTH, IMAP and POP3.",
    "queue": "The queue: retries, lifetime, local delivery.",
    "delivery": "Delivery: addresses and outbound SMTP.",
    "dns": "The resolver used for outbound routing (MX, A/AAAA).",
    "dkim": "DKIM signing of outbound mail from local domains.",
    "sieve": "Sieve filtering at local delivery (RFC 5228 and extensions).",
    "managesieve": "ManageSieve (RFC 5804, port 4190): where users upload their Sieve scripts.",
    "metrics": "Prometheus metrics over HTTP (off unless `listen` is set).",
}


def sample() -> str:
    """A config file with every key, its default and its explanation (the bundled config.toml)."""
    import textwrap

    defaults = from_dict({}, base=Path("."))
    out = ["# mailstack configuration. Every key is listed with its default value and what it does;",
           "# `mailstack config check` validates this file and prints the effective settings.",
           "# Sizes are in bytes, times in seconds.", ""]
    for section, keys in SCHEMA.items():
        out.append(f"# --- {SECTION_DOCS.get(section, section)}")
        out.append(f"[{section}]")
        for key, spec in keys.items():
            for line in textwrap.wrap(spec.doc, 88):
                out.append(f"# {line}")
            value = spec.default
            if spec.kind == "path" or (section == "server" and key == "hostname"):
                value = spec.default  # keep the raw default ("" = derived), not the resolved one
            elif spec.kind in ("addrs", "cidrs"):
                value = [str(v) for v in spec.default]
            else:
                value = getattr(defaults.sections[section], key)
            out.append(f"{key} = {_render(value)}")
            out.append("")
    return "\n".join(out)


def _nexthop_error(value: str, domain: str | None = None) -> str | None:
    from .nexthop import parse_nexthop
    try:
        parse_nexthop(value)
    except ValueError as e:
        return f"{domain}: {e}" if domain else str(e)
    return None


def _hostport_error(value: str) -> str | None:
    try:
        parse_hostport("", value)
    except ConfigError:
        return f"{value!r} is not host:port (e.g. \"127.0.0.1:9100\")"
    return None


def _nameserver_error(value: str) -> str | None:
    from .nexthop import parse_nameserver
    try:
        parse_nameserver(value)
    except ValueError as e:
        return str(e)
    return None


def reference_markdown() -> str:
    """The README's reference of every key (`mailstack config reference`)."""
    out = []
    for section, keys in SCHEMA.items():
        out.append(f"#### [{section}] — {SECTION_DOCS.get(section, '')}\n")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for key, spec in keys.items():
            default = spec.default
            if spec.kind in ("addrs", "cidrs"):
                default = [str(v) for v in default]
            shown = _render(default).replace("|", "\\|")
            doc = spec.doc.replace("|", "\\|")
            out.append(f"| `{section}.{key}` | `{shown}` | {doc} |")
        out.append("")
    return "\n".join(out)
