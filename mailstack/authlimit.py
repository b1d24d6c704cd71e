"""Kept so existing imports work: the login throttle is now the shared guard against
password guessing, mailstack.defense.guard.LoginGuard (parallel cap, block window,
per-address and per-account delays, the owner never slowed from an address he used)."""
from __future__ import annotations

from .defense.guard import LoginGuard as LoginThrottle

__all__ = ["LoginThrottle"]
