"""Persistent-sessions stress: many IMAP sessions (and a POP3 client) on one mailbox of the
real server (`python -m mailstack serve`, uvloop), each session's view model-checked after
every response (tests/viewcheck.py).  Prints the number of view errors; 0 is the target.

    python bench/views.py                       # 10 sessions, 600 s, POP3 on, uvloop
    python bench/views.py --seconds 120 --sessions 6 --no-pop3 --loop asyncio

Not a test: nothing here is collected by pytest.  Exit status 1 when any view error was
seen.  Loopback only; stops by itself after --seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import MailServer  # noqa: E402
from viewcheck import run_mix  # noqa: E402

USER, PASSWORD = "stress@example.test", "stress-pw"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--no-pop3", action="store_true")
    ap.add_argument("--reconnect-every", type=int, default=0,
                    help="log out and in again every N operations (0: sessions persist)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="msviews-") as tmp:
        srv = MailServer(Path(tmp), loop=args.loop,
                         overrides={"imap": {"allow_plaintext_auth": True},
                                    "pop3": {"allow_plaintext_auth": True}})
        srv.add_domain("example.test")
        srv.add_user(USER, PASSWORD)
        srv.start()
        started = time.monotonic()
        try:
            async def progress(shared, deadline):
                while time.monotonic() < deadline:
                    await asyncio.sleep(min(30, max(0.1, deadline - time.monotonic())))
                    print(f"{time.monotonic() - started:6.0f}s  ops {sum(shared.ops.values())}  "
                          f"view errors {len(shared.errors)}", flush=True)

            async def run():
                return await run_mix("127.0.0.1", srv.ports["imap"], USER, PASSWORD,
                                     sessions=args.sessions, seconds=args.seconds,
                                     pop3_port=None if args.no_pop3 else srv.ports["pop3"],
                                     seed=args.seed, reconnect_every=args.reconnect_every,
                                     on_progress=progress)
            # create the second mailbox through IMAP itself
            async def prepare():
                from viewcheck import IMAPChecker, Shared  # noqa: PLC0415
                c = IMAPChecker("prep", Shared())
                await c.connect("127.0.0.1", srv.ports["imap"], USER, PASSWORD)
                await c.command("CREATE Other")
                await c.close()
            asyncio.run(prepare())
            shared = asyncio.run(run())
        finally:
            code = srv.stop()
        elapsed = time.monotonic() - started
        print(f"\nran {elapsed:.0f} s: {args.sessions} IMAP sessions"
              f"{'' if args.no_pop3 else ' + 1 POP3 client'} on one mailbox, loop {args.loop}, "
              f"server exit {code}")
        print(f"operations: {sum(shared.ops.values())} {dict(sorted(shared.ops.items()))}")
        print(f"view errors: {len(shared.errors)}")
        for kind, n in shared.kinds().items():
            print(f"  {n:5d}  {kind}")
        for e in shared.errors[:5]:
            print("   ", e[:400])
        tracebacks = srv.log().count("Traceback")
        print(f"server log tracebacks: {tracebacks}")
        return 1 if shared.errors or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
