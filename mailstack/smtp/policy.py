"""Who may send what to whom: relay, recipient, sender and limit decisions.

Pure functions: they take facts (an address, what the directory says about it, who
the client is) and return None for "go ahead" or the full reply line to refuse with.
The session gathers the facts; nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..netutil import address_in

# Listener roles.  Port 25 receives for local addresses; the submission ports want AUTH.
STARTTLS_LISTENERS = frozenset({"smtp", "submission"})
AUTH_REQUIRED_LISTENERS = frozenset({"submission", "submissions"})
IMPLICIT_TLS_LISTENERS = frozenset({"submissions"})


@dataclass(frozen=True)
class Client:
    """What the policy needs to know about the client of one session."""

    ip: str
    listener: str
    tls: bool
    auth_user: str | None  # the account, once AUTH succeeded
    trusted: bool  # in smtp.trusted_networks


is_trusted = address_in  # a client in one of the configured networks


def auth_offered(listener: str, tls: bool) -> bool:
    """AUTH is offered only over TLS, on every SMTP listener (an authenticated user may relay via 25)."""
    return tls


def starttls_offered(listener: str, tls: bool) -> bool:
    return listener in STARTTLS_LISTENERS and not tls


def check_mail_allowed(client: Client) -> str | None:
    """May this client start a transaction at all?"""
    if client.listener in AUTH_REQUIRED_LISTENERS and client.auth_user is None:
        return "530 5.7.0 Authentication required"
    return None


def check_sender(address: str, client: Client, owns) -> str | None:
    """Envelope sender.  `owns(account, address) -> bool` is Directory.owns_address.

    An authenticated user may only use addresses that are theirs, and never the null
    sender (bounces are ours to send).  Mail from the internet may use any sender."""
    if client.auth_user is None:
        return None
    if not address:
        return "553 5.7.1 <>: Sender address rejected: not owned by user"
    if not owns(client.auth_user, address):
        return f"553 5.7.1 <{address}>: Sender address rejected: not owned by user"
    return None


def check_recipient(address: str, kind: str, client: Client) -> str | None:
    """Envelope recipient; `kind` is Directory.resolve(address).kind.

    Local addresses (accounts and aliases) are always accepted; a local domain's
    unknown user never is.  Anything else is relaying: only for authenticated users
    and trusted networks.  Address tricks (%, !, quoted @, source routes) are never
    routing here: the directory resolves them by their final domain only."""
    if kind in ("local", "alias"):
        return None
    if kind == "unknown":
        return f"550 5.1.1 <{address}>: Recipient address rejected: user unknown"
    if client.auth_user is not None or client.trusted:
        return None
    return f"554 5.7.1 <{address}>: Relay access denied"


def check_recipient_count(current: int, max_recipients: int) -> str | None:
    if current >= max_recipients:
        return "452 4.5.3 Too many recipients"
    return None


def check_declared_size(size: int | None, max_size: int) -> str | None:
    if size is not None and size > max_size:
        return "552 5.3.4 Message size exceeds fixed limit"
    return None


def check_address_charset(address: str, smtputf8: bool) -> str | None:
    """RFC 6531: non-ASCII addresses only in a transaction that declared SMTPUTF8."""
    if not smtputf8 and not address.isascii():
        return f"553 5.6.7 <{address}>: Non-ASCII address needs SMTPUTF8"
    return None
