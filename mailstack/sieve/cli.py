"""CLI: `mailstack sieve list|get|put|activate|deactivate|delete USER [NAME]` and
`mailstack sieve test SCRIPT MESSAGE [--envelope-from A] [--envelope-to B]`.

`test` parses and runs a script against a message file without delivering anything and
prints the actions, one per line (Pigeonhole's sieve-test); a bad script exits 1 with
the error (line and column) on stderr.
"""
from __future__ import annotations

import sys

from ..directory import normalize_address
from .checker import compile_script
from .interpreter import Context, Host, evaluate
from .message import SieveMessage
from .parser import SieveSyntaxError
from .scripts import ScriptError, ScriptStore


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("sieve", help="users' Sieve filters: manage and test scripts")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    for name, helptext, with_name in (
            ("list", "list a user's scripts (the active one marked)", False),
            ("get", "print a script", True),
            ("put", "store a script read from stdin (checked first)", True),
            ("activate", "make a script the active one", True),
            ("deactivate", "no active script", False),
            ("delete", "delete a script (not the active one)", True)):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("user", help="the account, e.g. alice@example.test")
        if with_name:
            c.add_argument("name", help="the script's name")
        c.set_defaults(func=run)
    t = sub.add_parser("test", help="run a script against a message file and print the actions")
    t.add_argument("script", help="the Sieve script file")
    t.add_argument("message", help="the message file (as it would arrive)")
    t.add_argument("--envelope-from", default="", help="envelope sender (default: the null sender)")
    t.add_argument("--envelope-to", default="", help="envelope recipient")
    t.set_defaults(func=run_test, needs_config=False)  # works on any machine: defaults are enough


def _err(msg: str) -> int:
    print(f"mailstack: {msg}", file=sys.stderr)
    return 1


def run(args, cfg) -> int:
    store = ScriptStore(cfg.data_dir, cfg.sieve.max_scripts, cfg.sieve.max_script_size)
    try:
        account = normalize_address(args.user)
    except Exception as e:
        return _err(str(e))
    from ..directory import Directory
    if args.action in ("put", "activate") and not Directory(cfg.data_dir).account_exists(account):
        return _err(f"{account}: no such account (mailstack user add {account})")
    try:
        if args.action == "list":
            for name, active in store.list(account):
                print(f"{name}{'  ACTIVE' if active else ''}")
        elif args.action == "get":
            sys.stdout.write(store.get(account, args.name))
        elif args.action == "put":
            store.put(account, args.name, sys.stdin.read())
        elif args.action == "activate":
            store.set_active(account, args.name)
        elif args.action == "deactivate":
            store.set_active(account, None)
        elif args.action == "delete":
            store.delete(account, args.name)
    except SieveSyntaxError as e:
        return _err(f"script error: {e}")
    except (ScriptError, OSError) as e:
        return _err(str(e))
    if args.action not in ("list", "get"):
        _notify_server(cfg, account)
    return 0


def _notify_server(cfg, account: str) -> None:
    """A running server that knew this account had no script forgets it now, so the next
    message is filtered (without this, within scripts.MEMO_SECONDS)."""
    try:
        from ..queue import control
        control.request(cfg, {"action": "sieve-changed", "account": account}, timeout=2)
    except Exception:  # no server, or not ours to reach: it notices within MEMO_SECONDS
        pass


class _FileHost(Host):
    """includes from the script's own folder (personal) for a dry run."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def load_include(self, name, is_global):
        from pathlib import Path
        p = Path(self.folder) / f"{name}.sieve"
        if not p.exists():
            return None
        return compile_script(p.read_text("utf-8", "replace"))


def run_test(args, cfg) -> int:
    import os
    from pathlib import Path

    from .. import config as config_mod
    cfg = cfg or config_mod.from_dict({}, Path("."))
    try:
        with open(args.script, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        with open(args.message, "rb") as f:
            raw = f.read()
    except OSError as e:
        return _err(f"{e.filename}: {e.strerror}")
    try:
        script = compile_script(text, cfg.sieve.max_script_size)
    except SieveSyntaxError as e:
        return _err(f"{args.script}: {e}")
    from .deliver import environment, limits_from
    ctx = Context(SieveMessage(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")),
                  envelope_from=args.envelope_from, envelope_to=args.envelope_to,
                  account=args.envelope_to, environment=environment(cfg, {}), limits=limits_from(cfg),
                  host=_FileHost(os.path.dirname(os.path.abspath(args.script))))
    result = evaluate([script], ctx)
    if result.error:
        print(f"mailstack: run-time error: {result.error} (the message would be kept in INBOX)",
              file=sys.stderr)
    for action in result.actions:
        print(action.describe())
    return 0
