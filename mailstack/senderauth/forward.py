"""What forwarding does to a message so the next hop's checks still pass (queue/remote.py).

  - SRS: an envelope sender outside our domains becomes SRS0=...@<srs domain>, so SPF at
    the next hop checks our domain, not the original sender's (srs.py);
  - ARC: mail received from the internet gets an ARC set sealed with our DKIM key, so the
    next hop can trust our Authentication-Results when DKIM breaks (RFC 8617).

And the way back: `install_reverse(directory, ...)` makes the directory resolve an SRS
address of ours to the original sender (a bounce), and a forged or expired one to
"unknown" (refused at RCPT).
"""
from __future__ import annotations

import dataclasses
import logging

import dkim as dkimpy

from ..dkim import DKIMSigner
from .srs import SRS, SRSError, load_keys

log = logging.getLogger("mailstack.senderauth")


def srs_domain(cfg) -> str:
    return (cfg.senderauth.srs_domain or cfg.server.hostname).lower().rstrip(".")


def make_srs(cfg) -> SRS | None:
    """The SRS rewriter, or None (logged) when its key cannot be read or made."""
    try:
        return SRS(load_keys(cfg.data_dir), srs_domain(cfg), cfg.senderauth.srs_max_age)
    except (OSError, SRSError) as e:
        log.error("SRS is off: cannot use %s/srs.key: %s", cfg.data_dir, e)
        return None


def install_reverse(directory, cfg) -> None:
    """Let directory.resolve() turn our SRS addresses back into the original sender."""
    if directory is None:
        return
    if not cfg.senderauth.srs:
        directory.srs_reverse = None
        return
    srs = make_srs(cfg)
    if srs is None:
        directory.srs_reverse = None
        return

    def reverse(address: str) -> str | None:
        if not srs.is_srs(address):
            return None
        try:
            return srs.reverse(address)
        except SRSError as e:
            log.info("refused SRS address <%s>: %s", address[:200], e)
            return ""

    directory.srs_reverse = reverse


class Forwarder:
    """Built per configuration by RemoteDelivery; seal() is blocking (call it in a thread)."""

    def __init__(self, services) -> None:
        self.services = services
        cfg = services.config
        self.cfg = cfg
        self.srs = make_srs(cfg) if cfg.senderauth.srs else None
        self.signer = DKIMSigner(cfg.data_dir, cfg.dkim.selector)

    def _ours(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        directory = self.services.directory
        return (domain in (self.cfg.server.hostname.lower(), self.srs.domain if self.srs else "")
                or (directory is not None and directory.is_local_domain(domain)))

    def rewrite(self, message):
        """The message with its envelope sender SRS-rewritten when it is not one of ours."""
        sender = message.sender
        if self.srs is None or not sender or "@" not in sender or self._ours(sender.rpartition("@")[2]):
            return message
        try:
            return dataclasses.replace(message, sender=self.srs.forward(sender))
        except SRSError:
            return message

    def _seal_key(self) -> tuple[str, str, bytes] | None:
        """(domain, selector, pem): server.hostname's domain first, then the local domains."""
        host = self.cfg.server.hostname.lower().rstrip(".")
        labels = host.split(".")
        candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
        directory = self.services.directory
        candidates += sorted(directory.domains) if directory is not None else []
        for domain in candidates:
            found = self.signer.key_for(domain)
            if found:
                return domain, found[0], found[1]
        return None

    def would_seal(self, meta: dict) -> bool:
        """Would seal() add an ARC set (which needs the message whole)?"""
        return bool(self.cfg.senderauth.arc_seal and meta.get("listener") == "smtp" and not meta.get("auth_user")
                    and self._seal_key() is not None)

    def seal(self, data: bytes, meta: dict, body_digest: bytes | None = None) -> bytes:
        """ARC set (three header lines) for mail received from the internet; b"" otherwise.
        With `body_digest` (mailstack/dkimbody.py) `data` is the header section alone."""
        if not self.cfg.senderauth.arc_seal or meta.get("listener") != "smtp" or meta.get("auth_user"):
            return b""
        key = self._seal_key()
        if key is None:
            return b""
        domain, selector, pem = key
        try:
            if body_digest is not None:  # a big message, not held whole
                from .. import dkimbody
                headers = dkimbody.arc_sign(data, body_digest, selector.encode(), domain.encode(), pem,
                                            self.cfg.server.hostname.encode())
            else:
                headers = dkimpy.arc_sign(data, selector.encode(), domain.encode(), pem,
                                          self.cfg.server.hostname.encode())
        except Exception as e:  # a message dkimpy cannot seal is still delivered
            log.warning("ARC sealing failed: %s", e)
            return b""
        return b"".join(headers)
