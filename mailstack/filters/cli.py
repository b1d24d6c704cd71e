"""`mailstack user prefs ADDRESS [--spam-folder junk|inbox]`: a user's filter preferences."""
from __future__ import annotations

import argparse
import sys

from . import prefs


def add_commands(subparsers) -> None:
    help_text = "a user's filter preferences (where spam goes)"
    user = subparsers.choices.get("user")
    actions = [a for a in getattr(user, "_actions", ()) if isinstance(a, argparse._SubParsersAction)]
    # `user prefs …` under the existing verb group; a top-level `prefs` if that group changed shape.
    parent = actions[0] if actions else subparsers
    p = parent.add_parser("prefs", help=help_text, description=help_text)
    p.add_argument("address", help="the account, e.g. bob@example.test")
    p.add_argument("--spam-folder", choices=prefs.CHOICES["spam_folder"],
                   help="junk (default): spam is delivered into the Junk folder; inbox: into INBOX")
    p.set_defaults(func=run)


def run(args, cfg) -> int:
    from ..directory import Directory, normalize_address
    directory = Directory(cfg.data_dir, cfg.delivery.plus_separator)
    account = normalize_address(args.address)
    if not directory.account_exists(account):
        print(f"mailstack: no such account: {args.address}", file=sys.stderr)
        return 1
    if args.spam_folder:
        values = prefs.write(cfg.data_dir, account, {"spam_folder": args.spam_folder})
    else:
        values = prefs.read(cfg.data_dir, account)
    for key, value in sorted(values.items()):
        print(f"{key} = {value}")
    return 0
