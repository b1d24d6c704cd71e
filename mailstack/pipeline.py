"""Which checks an SMTP session runs, in which order (see smtp/hooks.py for the contract).

    connect ─▶ defense (DNSBL, pregreet, per-IP limits) ─▶ HELO/MAIL ─▶ senderauth (SPF)
       ─▶ RCPT (policy, greylist, rate limits) ─▶ DATA ─▶ senderauth (DKIM, ARC, DMARC)
       ─▶ filters (milter, rspamd, spamd, clamd) ─▶ cleanup ─▶ spool ─▶ 250

Each package contributes its stages from the configuration; a package with nothing
configured contributes none, so a plain server pays nothing for them.
"""
from __future__ import annotations


def build_stages(services) -> tuple:
    """The stage tuple for new SMTP sessions under services.config."""
    stages: list = []
    # Order matters: defence first (cheap refusals), then who sent it, then what it says.
    from .defense.stage import DefenseStage
    stages.append(DefenseStage(services))
    from .quotas import stages as quota_stages  # full mailboxes: 452/552 at RCPT and DATA (cheap)
    stages += quota_stages(services)
    from .senderauth import forward, stage as senderauth
    forward.install_reverse(services.directory, services.config)  # bounces to SRS addresses
    stages += senderauth.build(services)
    from .filters.chain import build as build_filters  # content filters (milter, rspamd, spamd, clamd)
    stages += filter(None, [build_filters(services)])
    from .sieve.stage import stages as sieve_stages  # last: the recipient's own reject (RFC 5429)
    stages += sieve_stages(services)
    return tuple(stages)
