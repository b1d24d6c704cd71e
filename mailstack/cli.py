"""`mailstack serve | config check | domain | user | alias | queue | mailq | sendmail | dkim | dns`.

One verb per action, as Postfix's postqueue/postsuper/postconf give.  Every command
takes `--config FILE` (default: $MAILSTACK_CONFIG, else ./config.toml) anywhere on
the line.  Errors are one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import os
import sys

from . import __version__
from . import config as config_mod
from .config import ConfigError
from .directory import Directory, DirectoryError, check_password_strength, normalize_address

# Modules that add their own subcommands: add_commands(subparsers); handlers run(args, cfg) -> int.
PLUGIN_COMMANDS = ("mailstack.queue.admin", "mailstack.outbound_cli", "mailstack.status",
                   "mailstack.filters.cli", "mailstack.sieve.cli", "mailstack.migrate.cli")


SYSTEM_CONFIG = "/etc/mailstack/config.toml"


def default_config_path() -> str:
    """$MAILSTACK_CONFIG, else ./config.toml, else /etc/mailstack/config.toml (where `sendmail`
    run by cron or PHP, in any directory, finds it)."""
    if os.environ.get("MAILSTACK_CONFIG"):
        return os.environ["MAILSTACK_CONFIG"]
    if not os.path.exists("config.toml") and os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    return "config.toml"


def _extract_config(argv: list[str]) -> tuple[list[str], str | None]:
    """Take `--config F` / `--config=F` / `-c F` out of argv wherever it stands."""
    out, path, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, path


def _die(message: str, code: int = 1) -> int:
    print(f"mailstack: {message}", file=sys.stderr)
    return code


# --- serve / config ---------------------------------------------------------------------
def cmd_serve(args, cfg) -> int:
    from .server import serve
    return serve(cfg)


def cmd_config_check(args, cfg) -> int:
    """Like postconf: every key; `KEY...` only those; `-n` only what differs from the defaults."""
    if args.keys:
        try:
            print(config_mod.dump_keys(cfg, args.keys, changed_only=args.non_default), end="")
        except ConfigError as e:
            return _die(str(e))
        return 0
    print(f"# {cfg.path}: OK", file=sys.stderr)
    print(config_mod.dump(cfg, changed_only=args.non_default), end="")
    return 0


def cmd_config_sample(args, cfg) -> int:
    print(config_mod.sample(), end="")
    return 0


# --- directory edits ----------------------------------------------------------------------
def _directory(cfg) -> Directory:
    return Directory.for_config(cfg)


def _notify_server(cfg) -> None:
    """Ask a running server to re-read the directory now (it also notices within a second)."""
    try:
        control = importlib.import_module("mailstack.queue.control")
        control.request(cfg, {"action": "reload-directory"}, timeout=2)
    except Exception:
        pass


def _read_password(args, cfg) -> str:
    if getattr(args, "password_stdin", False) or not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            raise DirectoryError("the two passwords differ")
    if not password:
        raise DirectoryError("empty password")
    weak = check_password_strength(password, cfg.accounts.min_password_length)
    if weak and not args.allow_weak:
        raise DirectoryError(f"{weak} (accounts.min_password_length; --allow-weak to accept it anyway)")
    return password


def _edit(cfg, change, message: str) -> int:
    """Apply `change` to the directory, save it atomically, tell a running server, say `message`."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = _directory(cfg)
    change(directory)
    directory.save()
    _notify_server(cfg)
    print(message)
    return 0


def cmd_domain(args, cfg) -> int:
    if args.action == "list":
        for d in sorted(_directory(cfg).domains):
            print(d)
        return 0
    if args.action == "add":
        return _edit(cfg, lambda d: d.add_domain(args.domain), f"domain {args.domain} added")
    return _edit(cfg, lambda d: d.del_domain(args.domain), f"domain {args.domain} removed")


def cmd_user(args, cfg) -> int:
    if args.action == "list":
        from .quotas import list_lines  # each account with its quota usage and limits
        for line in list_lines(cfg, _directory(cfg)):
            print(line)
        return 0
    if args.action == "quota":
        return cmd_user_quota(args, cfg)
    if args.action == "del":
        return _edit(cfg, lambda d: d.del_user(args.address),
                     f"account {args.address} removed (its mail is kept on disk)")
    if args.action == "add":
        # Validate the address before asking for a password and before anything is written.
        account = _directory(cfg)._check_new_address(args.address)
        if account in _directory(cfg).accounts:
            raise DirectoryError(f"account {account} exists already")
        password = _read_password(args, cfg)
        _create_mailboxes(cfg, account)
        return _edit(cfg, lambda d: d.add_user(account, password), f"account {account} added")
    password = _read_password(args, cfg)
    return _edit(cfg, lambda d: d.set_password(args.address, password), f"password of {args.address} changed")


def cmd_user_quota(args, cfg) -> int:
    """`user quota USER [SIZE|none] [--messages N]`: set, remove or (without SIZE) show."""
    from . import quotas
    directory = _directory(cfg)
    account = normalize_address(args.address)
    if account not in directory.accounts:
        raise DirectoryError(f"no account {account}")
    if args.size is None:
        if args.messages is not None:
            raise DirectoryError("--messages needs SIZE (the storage limit) too")
        usage, limits = quotas.account_usage(cfg, directory, account)
        own = "own limits" if account in directory.quotas else "default limits (quota.default_*)"
        print(f"{account}: {quotas.describe(usage, limits)} [{own}]")
        return 0
    try:
        storage, messages = quotas.parse_quota_args(args.size, args.messages)
    except ValueError as e:
        raise DirectoryError(str(e)) from None

    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.set_quota(account, storage, messages)
    directory.save()
    _notify_server(cfg)
    now = quotas.describe(*quotas.account_usage(cfg, directory, account))
    if storage is None:
        print(f"quota of {account} removed, the defaults apply: {now}")
    else:
        print(f"quota of {account} set: {now}")
    return 0


def _create_mailboxes(cfg, account: str) -> None:
    """INBOX and the special-use folders exist from the start, so clients see them at once."""
    from .events import EventBus
    from .store.base import StoreError
    from .store.maildir import MaildirStore
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        asyncio.run(MaildirStore(cfg.mail_dir, EventBus()).ensure_account(account))
    except StoreError as e:
        raise DirectoryError(f"{account}: {e}") from None


def cmd_alias(args, cfg) -> int:
    d = _directory(cfg)
    if args.action == "list":
        for src, targets in sorted(d.aliases.items()):
            print(f"{src}: {', '.join(targets)}")
        return 0
    if args.action == "add":
        return _edit(cfg, lambda d: d.add_alias(args.source, args.targets), f"alias {args.source} added")
    return _edit(cfg, lambda d: d.del_alias(args.source, args.targets), f"alias {args.source} changed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailstack", description="A complete mail server in one process.")
    p.add_argument("--version", action="version", version=f"mailstack {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("serve", help="run the server (SMTP, IMAP, POP3, queue) until SIGTERM",
                       description="Run the server until SIGTERM/SIGINT; SIGHUP reloads the configuration, "
                                   "accounts and certificates. Started as root, it becomes server.user "
                                   "once its ports are bound.")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="configuration: check, sample, reference")
    csub = c.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    cc = csub.add_parser("check", help="validate and print the effective settings, defaults included "
                         "(like postconf)")
    cc.add_argument("keys", nargs="*", metavar="KEY", help="print only these keys, e.g. server.hostname "
                    "(like postconf KEY)")
    cc.add_argument("-n", dest="non_default", action="store_true",
                    help="print only the settings that differ from the defaults (like postconf -n)")
    cc.set_defaults(func=cmd_config_check)
    csub.add_parser("sample", help="print a config file with every key explained"
                    ).set_defaults(func=cmd_config_sample, needs_config=False)
    csub.add_parser("reference", help="print the reference of every key as Markdown"
                    ).set_defaults(func=lambda a, c: print(config_mod.reference_markdown(), end="") or 0,
                                   needs_config=False)

    d = sub.add_parser("domain", help="local domains: add, del, list")
    dsub = d.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    dsub.add_parser("add", help="add a local domain").add_argument("domain", help="e.g. example.com")
    dsub.add_parser("del", help="remove a local domain (it must have no accounts)").add_argument(
        "domain", help="e.g. example.com")
    dsub.add_parser("list", help="the local domains, one a line")
    d.set_defaults(func=cmd_domain)

    u = sub.add_parser("user", help="accounts: add, passwd, del, list (password from a prompt or stdin, "
                       "never argv)")
    usub = u.add_subparsers(dest="action", metavar="ACTION")
    usub.required = True
    for action, text in (("add", "add an account (and its mailboxes)"), ("passwd", "change a password")):
        a = usub.add_parser(action, help=text)
        a.add_argument("address", help="user@domain, the domain a local one")
        a.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
        a.add_argument("--allow-weak", action="store_true", help="accept a password shorter than "
                       "accounts.min_password_length or a common one (for tests)")
    usub.add_parser("del", help="remove an account (its mail stays on disk)").add_argument(
        "address", help="user@domain")
    usub.add_parser("list", help="the accounts, one a line, with their quota usage and limits")
    q = usub.add_parser("quota", help="set, remove or show an account's quota (RFC 9208 STORAGE, MESSAGE)")
    q.add_argument("address", help="user@domain")
    q.add_argument("size", nargs="?", help="storage limit like 500M or 2G (K/M/G/T, powers of 1024; 0 = no "
                   "limit); \"none\" removes the account's own limits (quota.default_* apply); leave out to show")
    q.add_argument("--messages", metavar="N", help="message-count limit (0 = no limit)")
    u.set_defaults(func=cmd_user)

    al = sub.add_parser("alias", help="aliases: add, del, list (one address to many; @domain is the catch-all)")
    asub = al.add_subparsers(dest="action", metavar="ACTION")
    asub.required = True
    a = asub.add_parser("add", help="add targets to an alias (made when new)")
    a.add_argument("source", help="address in a local domain, or @domain for the catch-all")
    a.add_argument("targets", nargs="+", help="addresses, local or remote")
    a = asub.add_parser("del", help="remove an alias, or only some of its targets")
    a.add_argument("source", help="the alias address")
    a.add_argument("targets", nargs="*", help="targets to remove (none = the whole alias)")
    asub.add_parser("list", help="the aliases, one a line")
    al.set_defaults(func=cmd_alias)

    for name in PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.add_commands(sub)
    _document_config(p)
    return p


def _document_config(parser: argparse.ArgumentParser) -> None:
    """--config is taken out of argv before parsing (it may stand anywhere); list it in the
    --help of every command all the same."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _document_config(sub)
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument("-c", "--config", metavar="FILE", help="configuration file (default: "
                            "$MAILSTACK_CONFIG, else ./config.toml)")


def main(argv: list[str] | None = None) -> int:
    argv, config_path = _extract_config(list(sys.argv[1:] if argv is None else argv))
    # `sendmail` and `mailq` habits: invoked under those names, act as those commands.
    invoked = os.path.basename(sys.argv[0]) if argv is None else "mailstack"
    if invoked in ("sendmail", "mailq") and (not argv or argv[0] != invoked):
        argv = [invoked] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "needs_config", True):
            cfg = config_mod.load(config_path or default_config_path())
        else:
            cfg = None
    except ConfigError as e:
        return _die(f"config error: {e}", 2)
    if cfg is not None and args.func is not cmd_serve:  # serve drops privileges itself, later
        from .privileges import act_as_server_user
        act_as_server_user(cfg)
    try:
        return args.func(args, cfg) or 0
    except (DirectoryError, ConfigError) as e:
        return _die(str(e))
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a permission, a missing file, a full disk: one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        hint = " (run as the server's user or root)" if isinstance(e, PermissionError) else ""
        return _die(f"{where}{e.strerror or e}{hint}")


# Console scripts installed with the package (pyproject.toml), for the habits of every Unix host:
# a symlink /usr/sbin/sendmail -> this `sendmail` lets cron, mail(1), PHP and git send through mailstack.
def sendmail_main() -> int:
    return main(["sendmail", *sys.argv[1:]])


def mailq_main() -> int:
    return main(["mailq", *sys.argv[1:]])


def newaliases_main() -> int:
    from .queue.maildrop import newaliases
    return newaliases(None)


if __name__ == "__main__":
    sys.exit(main())
