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
from .directory import Directory, DirectoryError, normalize_address

# Modules that add their own subcommands: add_commands(subparsers); handlers run(args, cfg) -> int.
PLUGIN_COMMANDS = ("mailstack.queue.admin", "mailstack.outbound_cli", "mailstack.status",
                   "mailstack.migrate.cli")


def default_config_path() -> str:
    return os.environ.get("MAILSTACK_CONFIG") or "config.toml"


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
    print(f"# {cfg.path}: OK", file=sys.stderr)
    print(config_mod.dump(cfg), end="")
    return 0


def cmd_config_sample(args, cfg) -> int:
    print(config_mod.sample(), end="")
    return 0


# --- directory edits ----------------------------------------------------------------------
def _directory(cfg) -> Directory:
    return Directory(cfg.data_dir, cfg.delivery.plus_separator)


def _notify_server(cfg) -> None:
    """Ask a running server to re-read the directory now (it also notices within a second)."""
    try:
        control = importlib.import_module("mailstack.queue.control")
        control.request(cfg, {"action": "reload-directory"}, timeout=2)
    except Exception:
        pass


def _read_password(args) -> str:
    if getattr(args, "password_stdin", False) or not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise DirectoryError("the two passwords differ")
    return first


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
        for a in sorted(_directory(cfg).accounts):
            print(a)
        return 0
    if args.action == "del":
        return _edit(cfg, lambda d: d.del_user(args.address),
                     f"account {args.address} removed (its mail is kept on disk)")
    password = _read_password(args)
    if args.action == "add":
        account = normalize_address(args.address)
        result = _edit(cfg, lambda d: d.add_user(account, password), f"account {account} added")
        _create_mailboxes(cfg, account)
        return result
    return _edit(cfg, lambda d: d.set_password(args.address, password), f"password of {args.address} changed")


def _create_mailboxes(cfg, account: str) -> None:
    """INBOX and the special-use folders exist from the start, so clients see them at once."""
    from .events import EventBus
    from .store.maildir import MaildirStore
    asyncio.run(MaildirStore(cfg.mail_dir, EventBus()).ensure_account(account))


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

    s = sub.add_parser("serve", help="run the server (SMTP, IMAP, POP3, queue) until SIGTERM")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    csub.add_parser("check", help="validate and print the effective settings, defaults included"
                    ).set_defaults(func=cmd_config_check)
    csub.add_parser("sample", help="print a config file with every key explained"
                    ).set_defaults(func=cmd_config_sample, needs_config=False)
    csub.add_parser("reference", help="print the reference of every key as Markdown"
                    ).set_defaults(func=lambda a, c: print(config_mod.reference_markdown(), end="") or 0,
                                   needs_config=False)

    d = sub.add_parser("domain", help="local domains")
    dsub = d.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    for action in ("add", "del"):
        dsub.add_parser(action).add_argument("domain")
    dsub.add_parser("list")
    d.set_defaults(func=cmd_domain)

    u = sub.add_parser("user", help="accounts (password read from a prompt or stdin, never argv)")
    usub = u.add_subparsers(dest="action", metavar="ACTION")
    usub.required = True
    for action in ("add", "passwd"):
        a = usub.add_parser(action)
        a.add_argument("address")
        a.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    usub.add_parser("del").add_argument("address")
    usub.add_parser("list")
    u.set_defaults(func=cmd_user)

    al = sub.add_parser("alias", help="aliases (one address to many; @domain is the catch-all)")
    asub = al.add_subparsers(dest="action", metavar="ACTION")
    asub.required = True
    a = asub.add_parser("add")
    a.add_argument("source")
    a.add_argument("targets", nargs="+")
    a = asub.add_parser("del")
    a.add_argument("source")
    a.add_argument("targets", nargs="*")
    asub.add_parser("list")
    al.set_defaults(func=cmd_alias)

    for name in PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.add_commands(sub)
    return p


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


if __name__ == "__main__":
    sys.exit(main())
