"""CLI: `mailstack dkim keygen DOMAIN [--selector S]` and `mailstack dns DOMAIN [--ip IP]`.

cli.py imports this module and calls add_commands(subparsers); each handler is
run(args, cfg) -> exit code.
"""
from __future__ import annotations

import ipaddress
import sys

from . import dkim, dnsrecords
from .nexthop import to_alabel


def add_commands(subparsers) -> None:
    k = subparsers.add_parser("dkim", help="DKIM signing keys")
    ksub = k.add_subparsers(dest="action", metavar="ACTION")
    ksub.required = True
    gen = ksub.add_parser("keygen", help="make a signing key for a domain and print its DNS record")
    gen.add_argument("domain", help="the mail domain, e.g. example.com")
    gen.add_argument("--selector", help="selector (default: dkim.selector from the config)")
    gen.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096),
                     help="RSA key size (default 2048)")
    gen.add_argument("--force", action="store_true", help="replace an existing key (re-publish the record!)")
    gen.set_defaults(func=run_dkim_keygen)

    d = subparsers.add_parser("dns", help="print the DNS records to publish for a domain (MX, SPF, DKIM, DMARC, PTR)")
    d.add_argument("domain", help="the mail domain, e.g. example.com")
    d.add_argument("--ip", action="append", default=[], help="a public address of this host (repeatable)")
    d.set_defaults(func=run_dns)


def _domain(text: str) -> str:
    try:
        domain = to_alabel(text)
    except ValueError as e:
        raise SystemExit(f"mailstack: {e}")
    if "." not in domain and domain != "localhost":
        raise SystemExit(f"mailstack: {text!r} is not a domain name")
    return domain


def _warn_if_not_local(cfg, domain: str) -> None:
    from .directory import Directory
    if not Directory(cfg.data_dir).is_local_domain(domain):
        print(f"mailstack: warning: {domain} is not a local domain (mailstack domain add {domain})", file=sys.stderr)


def run_dkim_keygen(args, cfg) -> int:
    domain = _domain(args.domain)
    selector = args.selector or cfg.dkim.selector
    if not selector.isascii() or not all(c.isalnum() or c in "-_" for c in selector):
        print(f"mailstack: selector {selector!r} must be letters, digits, '-' or '_'", file=sys.stderr)
        return 2
    try:
        path = dkim.generate_key(cfg.data_dir, domain, selector, bits=args.bits, force=args.force)
    except FileExistsError as e:
        print(f"mailstack: {e}", file=sys.stderr)
        return 1
    _warn_if_not_local(cfg, domain)
    if selector != cfg.dkim.selector:
        print(f"mailstack: note: dkim.selector is {cfg.dkim.selector!r}; this key is used while "
              f"{domain} has no key with that selector", file=sys.stderr)
    print(f"; key written to {path}; publish this record, then mail from {domain} is signed")
    print(f"{selector}._domainkey.{domain}.\t3600\tIN\tTXT\t"
          f"{dnsrecords.txt_value(dkim.public_record(path.read_bytes()))}")
    return 0


def run_dns(args, cfg) -> int:
    domain = _domain(args.domain)
    for ip in args.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            print(f"mailstack: --ip {ip!r} is not an IP address", file=sys.stderr)
            return 2
    _warn_if_not_local(cfg, domain)
    recs, notes = dnsrecords.records(cfg, domain, args.ip)
    print(dnsrecords.render(recs, notes), end="")
    return 0
