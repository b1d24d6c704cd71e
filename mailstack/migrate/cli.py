"""`mailstack import imap USER --from imaps://host …`, `mailstack import maildir USER PATH`,
`mailstack export USER DEST [--mbox]`: added to the CLI through cli.PLUGIN_COMMANDS."""
from __future__ import annotations

import asyncio
import getpass
import ssl
import sys
from datetime import date
from pathlib import Path

from ..store.base import StoreError

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def add_commands(sub) -> None:
    imp = sub.add_parser("import", help="copy mail in: from another IMAP server or a Dovecot Maildir tree")
    isub = imp.add_subparsers(dest="source", metavar="SOURCE")
    isub.required = True

    p = isub.add_parser("imap", help="copy every folder, flag and date from an IMAP server")
    p.add_argument("user", help="the mailstack account to fill")
    p.add_argument("--from", dest="url", required=True, metavar="URL",
                   help="imaps://host[:port] (imap://host[:port] only for loopback or with --allow-plaintext)")
    p.add_argument("--login", required=True, help="login name on the source server")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    g.add_argument("--oauth2-token-stdin", action="store_true",
                   help="read an OAuth2 access token from one line of stdin (SASL XOAUTH2)")
    p.add_argument("--folders", nargs="+", default=[], metavar="FOLDER",
                   help="only these folders (and their subfolders); * and %% as in IMAP LIST")
    p.add_argument("--exclude", nargs="+", default=[], metavar="FOLDER", help="skip these folders")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="only messages received on or after this day")
    p.add_argument("--ca-file", help="trust this CA certificate file for the source (self-signed servers)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="allow imap:// (no TLS) to a non-loopback host: the password crosses the network in clear")
    p.set_defaults(func=cmd_import_imap)

    p = isub.add_parser("maildir", help="take over a Dovecot Maildir++ tree keeping UIDs, flags, keywords")
    p.add_argument("user", help="the mailstack account to fill")
    p.add_argument("path", help="the Maildir root (Dovecot's ~/Maildir)")
    p.add_argument("--pop3-uidl-format", default="%08Xu%08Xv", metavar="FORMAT",
                   help="Dovecot's pop3_uidl_format, so POP3 clients keep their UIDLs (default %(default)s)")
    p.add_argument("--new-uids", action="store_true", help="do not keep Dovecot's UIDVALIDITY/UIDs")
    p.set_defaults(func=cmd_import_maildir)

    p = sub.add_parser("export", help="write an account out as a Maildir++ tree (or mbox files)")
    p.add_argument("user", help="the mailstack account to write out")
    p.add_argument("dest", help="directory to create (must be empty or absent)")
    p.add_argument("--mbox", action="store_true", help="one mbox file per folder instead of Maildir")
    p.set_defaults(func=cmd_export)


def _die(text: str, code: int = 1) -> int:
    print(f"mailstack: {text}", file=sys.stderr)
    return code


def _account(cfg, user: str) -> str:
    from ..directory import Directory, normalize_address
    account = normalize_address(user)
    d = Directory(cfg.data_dir, cfg.delivery.plus_separator)
    if account not in d.accounts:
        raise ValueError(f"{user}: no such account (add it with `mailstack user add`)")
    return account


def imap_date(text: str) -> str:
    try:
        d = date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text}: expected YYYY-MM-DD") from None
    return f"{d.day}-{MONTHS[d.month - 1]}-{d.year}"


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_import_imap(args, cfg) -> int:
    from . import imap
    from .progress import Progress
    try:
        account = _account(cfg, args.user)
        host, port, tls = imap.parse_url(args.url)
        if not tls and not _is_loopback(host) and not args.allow_plaintext:
            return _die(f"--from {args.url}: no TLS to a remote host; use imaps:// (or --allow-plaintext)")
        since = imap_date(args.since) if args.since else None
        ctx = None
        if tls:
            ctx = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else ssl.create_default_context()
            if args.ca_file:
                ctx.check_hostname = False  # a private CA for a host reached by address
        if args.password_stdin or args.oauth2_token_stdin or not sys.stdin.isatty():
            secret = sys.stdin.readline().rstrip("\r\n")
        else:
            secret = getpass.getpass(f"Password of {args.login} at {host}: ")
        if not secret:
            return _die("empty password/token")
        source = imap.Source(host, port, tls, args.login, secret, args.oauth2_token_stdin, ctx)
        opts = imap.Options(args.folders, args.exclude, since)
        return asyncio.run(imap.run_import(cfg, account, source, opts, Progress("imported")))
    except (ValueError, imap.ImportError_, OSError, StoreError) as e:
        return _die(str(e) or type(e).__name__)


def cmd_import_maildir(args, cfg) -> int:
    from . import dovecot
    from .progress import Progress
    from ..pop3.parser import format_uidl
    try:
        if not (0 < len(format_uidl(args.pop3_uidl_format, 1, 1)) <= 70):
            raise ValueError
    except ValueError:
        return _die(f"--pop3-uidl-format {args.pop3_uidl_format!r}: only %u and %v (e.g. %08Xu%08Xv) are known")
    try:
        account = _account(cfg, args.user)
        return asyncio.run(dovecot.run_import(cfg, account, Path(args.path), Progress("imported"),
                                              args.pop3_uidl_format, keep_uids=not args.new_uids))
    except (ValueError, dovecot.TreeError, OSError, StoreError) as e:
        return _die(str(e))


def cmd_export(args, cfg) -> int:
    from . import export
    from .progress import Progress
    try:
        account = _account(cfg, args.user)
        return asyncio.run(export.run_export(cfg, account, Path(args.dest), Progress("exported"),
                                             mbox=args.mbox))
    except (ValueError, export.ExportError, OSError, StoreError) as e:
        return _die(str(e))
