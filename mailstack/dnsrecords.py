"""The DNS records an operator must publish for a mail domain (`mailstack dns DOMAIN`).

Printed in zone-file syntax, each with a comment that says why it is needed: MX
(where mail for the domain goes), A/AAAA of this host, SPF (who may send for it),
DKIM (the public key of <data_dir>/dkim/<domain>.<selector>.key), DMARC (what
receivers do with mail that fails both) and what the PTR of this host must be.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import dkim
from .nexthop import parse_nexthop, to_alabel


@dataclass
class Record:
    name: str  # fully qualified, with the final dot
    type: str
    value: str  # as it goes into a zone file
    why: str


def txt_value(text: str) -> str:
    """A TXT value in zone syntax, split into <=255-byte strings (long DKIM keys need it)."""
    data = text.encode()
    parts = ['"' + data[i:i + 255].decode() + '"' for i in range(0, len(data), 255)] or ['""']
    return parts[0] if len(parts) == 1 else "( " + " ".join(parts) + " )"


def spf_value(cfg) -> str:
    mechanisms = ["mx"]
    if cfg.delivery.relayhost:
        host = parse_nexthop(cfg.delivery.relayhost).host
        try:
            ip = ipaddress.ip_address(host)
            mechanisms.append(f"ip{ip.version}:{ip}")
        except ValueError:
            mechanisms.append(f"a:{host}")
    return "v=spf1 " + " ".join(mechanisms) + " -all"


def records(cfg, domain: str, addresses: list[str] | None = None) -> tuple[list[Record], list[str]]:
    """(records, notes) for `domain`. `addresses` are this host's public IPs, if known."""
    domain = to_alabel(domain)
    host = cfg.server.hostname.rstrip(".").lower()
    notes: list[str] = []
    if "." not in host or host.startswith("localhost") or host.endswith(".invalid"):
        # Never publish `localhost` (or a bare host name) as an MX: suggest a real name instead.
        notes.append(f"server.hostname is {host!r}, not a fully qualified domain name: the records use "
                     f"mail.{domain}; set server.hostname = \"mail.{domain}\" to match them.")
        host = f"mail.{domain}"
    out: list[Record] = [Record(f"{domain}.", "MX", f"10 {host}.", "mail for the domain is delivered to this host")]
    addrs = [ipaddress.ip_address(a) for a in (addresses or [])]
    for ip in addrs:
        out.append(Record(f"{host}.", "AAAA" if ip.version == 6 else "A", str(ip), "the MX host's address"))
    if not addrs:
        notes.append(f"{host}. needs A (and AAAA) records with this host's public addresses "
                     f"(give them with --ip to see them here).")
    out.append(Record(f"{domain}.", "TXT", txt_value(spf_value(cfg)),
                      "SPF: only the domain's MX hosts" + (" and the relayhost" if cfg.delivery.relayhost else "")
                      + " may send mail from it"))
    # The host's own name is checked by SPF too: as the HELO identity, and (SRS) as the envelope
    # sender domain of forwarded mail.
    for name in dict.fromkeys([host] + ([_srs_domain(cfg)] if cfg.senderauth.srs else [])):
        if name != domain:
            spf = "v=spf1 a -all" if name == host else f"v=spf1 a:{host} -all"
            out.append(Record(f"{name}.", "TXT", txt_value(spf),
                              "SPF for this host's name: HELO checks and the SRS senders of forwarded mail"))
    found = dkim.DKIMSigner(cfg.data_dir, cfg.dkim.selector).key_for(domain)
    if found:
        selector, pem = found
        out.append(Record(f"{selector}._domainkey.{domain}.", "TXT", txt_value(dkim.public_record(pem)),
                          "DKIM: the public key receivers check signatures with"))
        if not cfg.dkim.enabled:
            notes.append("dkim.enabled is false: mail is not signed yet.")
    else:
        notes.append(f"no DKIM key for {domain} yet: run `mailstack dkim keygen {domain}`, then run this again.")
    out.append(Record(f"_dmarc.{domain}.", "TXT",
                      txt_value(f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"),
                      "DMARC: start by only collecting reports (sent to postmaster@, which this server "
                      "accepts); move to p=quarantine once they show all your mail aligned"))
    for ip in addrs:
        out.append(Record(f"{ip.reverse_pointer}.", "PTR", f"{host}.",
                          "reverse DNS, set by whoever owns the address (your hosting provider)"))
    if not addrs:
        notes.append(f"PTR: the reverse DNS of this host's public addresses must be {host}. "
                     f"(ask whoever owns the addresses), and {host} must resolve back to them.")
    return out, notes


def _srs_domain(cfg) -> str:
    return (cfg.senderauth.srs_domain or cfg.server.hostname).rstrip(".").lower()


def render(recs: list[Record], notes: list[str]) -> str:
    lines = []
    for r in recs:
        lines.append(f"; {r.why}")
        lines.append(f"{r.name}\t3600\tIN\t{r.type}\t{r.value}")
    if notes:
        lines.append("")
        lines += [f"; NOTE: {n}" for n in notes]
    return "\n".join(lines) + "\n"
