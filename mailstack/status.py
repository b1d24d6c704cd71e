"""`mailstack status`: ask the running server how it is.

It answers on its control socket (action "status") with its listeners, open sessions,
queue sizes per state, the last delivery error and the certificate's expiry date.  This
is also the container's HEALTHCHECK: `mailstack status --quiet` exits 0 only when the
server answers and is healthy, 1 otherwise (Docker reads 0 as healthy, 1 as unhealthy;
other codes are reserved, so every failure is 1).

Healthy means: the server answered, every listener accepts connections, the queue
manager runs, and the certificate has not expired.  A certificate that expires within
CERT_WARN_DAYS is reported as a warning, not a failure (a restart would not fix it).

Assessing and rendering are plain functions over the answer (a dict), testable without
a server; `run` only adds the socket round trip.
"""
from __future__ import annotations

import datetime
import json
import sys

CERT_WARN_DAYS = 14
DEFAULT_TIMEOUT = 5.0
QUEUE_STATES = ("incoming", "active", "deferred", "hold", "maildrop")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="ask the running server: listeners, queue, last delivery error, certificate "
        "(exit 1 when it does not answer or is unhealthy: the container health check)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", "-q", action="store_true",
                     help="print nothing when healthy, only the problems when not (for health checks)")
    out.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the answer (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=run)


# --- pure: what the answer means ---------------------------------------------------------------
def _parse_time(text) -> datetime.datetime | None:
    if not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def queue_counts(status: dict) -> dict[str, int]:
    """Messages per queue state.  Accepts the server's flat {state: n} and the queue
    manager's {"states": {state: n}, ...} shapes."""
    queue = status.get("queue") or {}
    if isinstance(queue.get("states"), dict):
        queue = queue["states"]
    counts = {state: 0 for state in QUEUE_STATES}
    for state, n in queue.items():
        if isinstance(n, int) and not isinstance(n, bool):
            counts[state] = n
    return counts


def _manager(status: dict) -> dict:
    """The queue manager's own report ({"running", "states", "stats", ...}): under
    "queue_manager" next to the server's flat counts, or as "queue" itself."""
    for key in ("queue_manager", "queue"):
        value = status.get(key)
        if isinstance(value, dict) and ("running" in value or "states" in value):
            return value
    return {}


def assess(status: dict, now: datetime.datetime | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings).  Any problem makes the server unhealthy."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problems: list[str] = []
    warnings: list[str] = []
    if not status.get("ok", True):
        problems.append(f"the server answered with an error: {status.get('error', 'unknown')}")
    for listener in status.get("listeners") or []:
        if not listener.get("up"):
            problems.append(f"listener {listener.get('name')} {listener.get('address') or ''} is not "
                            "accepting connections".replace("  ", " "))
    queue = _manager(status)
    if queue.get("running") is False:
        problems.append("the queue manager is not running: accepted mail is not being delivered")
    if "postmaster" in status and not status["postmaster"]:
        warnings.append("no postmaster: mail to postmaster@ and abuse@ is refused until an account exists "
                        "(mailstack user add ...) or accounts.postmaster names one")
    if status.get("hostname_note"):
        warnings.append(status["hostname_note"])
    cert = status.get("certificate") or {}
    expiry = _parse_time(cert.get("not_after"))
    if cert and cert.get("path") and expiry is None:
        warnings.append(f"certificate {cert.get('path')}: cannot read its expiry date")
    elif expiry is not None:
        days = (expiry - now).total_seconds() / 86400
        if days <= 0:
            problems.append(f"certificate {cert.get('path')} expired on {expiry:%Y-%m-%d %H:%M} UTC")
        elif days <= CERT_WARN_DAYS:
            warnings.append(f"certificate {cert.get('path')} expires in {days:.0f} days "
                            f"({expiry:%Y-%m-%d}): replace it, then send SIGHUP")
    return problems, warnings


def render(status: dict, now: datetime.datetime | None = None) -> str:
    """The human-readable report."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problems, warnings = assess(status, now)
    host = status.get("hostname") or "mailstack"
    lines = [f"{host} (pid {status.get('pid', '?')}): {'UNHEALTHY' if problems else 'healthy'}"]
    lines += [f"  problem: {p}" for p in problems]
    lines += [f"  warning: {w}" for w in warnings]

    listeners = status.get("listeners")
    sessions = status.get("sessions") or {}
    if listeners is not None:
        lines.append("listeners:")
        if not listeners:
            lines.append("  (none configured)")
        for item in listeners:
            name = item.get("name", "?")
            state = "up" if item.get("up") else "DOWN"
            lines.append(f"  {name:<12} {item.get('address') or '-':<22} {state:<5} "
                         f"{sessions.get(name, 0)} sessions")

    counts = queue_counts(status)
    lines.append("queue: " + ", ".join(f"{state} {n}" for state, n in counts.items()))
    queue = _manager(status)
    if isinstance(queue.get("stats"), dict) and queue["stats"]:
        lines.append("since start: " + ", ".join(f"{k} {v}" for k, v in queue["stats"].items()))
    last_error = status.get("last_delivery_error")
    if last_error is None:
        last_error = queue.get("last_error")
    lines.append(f"last delivery error: {last_error or 'none'}")

    cert = status.get("certificate")
    if cert:
        expiry = _parse_time(cert.get("not_after"))
        when = (f"expires {expiry:%Y-%m-%d %H:%M} UTC ({(expiry - now).days} days)" if expiry
                else "expiry unknown")
        lines.append(f"certificate: {cert.get('path')}, {when}")
    return "\n".join(lines) + "\n"


# --- the command ----------------------------------------------------------------------------------
def fetch(cfg, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The server's status answer.  Raises ConnectionError with a one-line reason when no
    server answers."""
    from .queue.control import ControlError, request

    try:
        answer = request(cfg, {"action": "status"}, timeout=timeout)
    except ControlError as e:
        raise ConnectionError(str(e)) from None
    except OSError as e:
        raise ConnectionError(f"{cfg.control_socket}: {e.strerror or e}") from None
    if answer is None:
        raise ConnectionError(f"no server answers on {cfg.control_socket} (is `mailstack serve` running?)")
    if not isinstance(answer, dict):
        raise ConnectionError(f"{cfg.control_socket}: unexpected answer {answer!r:.200}")
    return answer


def run(args, cfg) -> int:
    try:
        status = fetch(cfg, args.timeout)
    except (ConnectionError, ValueError) as e:  # ValueError: an answer that is not JSON
        print(f"mailstack status: {e}", file=sys.stdout if args.quiet else sys.stderr)
        return 1
    problems, _ = assess(status)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    elif args.quiet:
        for p in problems:
            print(f"unhealthy: {p}")
    else:
        print(render(status), end="")
    return 1 if problems else 0
