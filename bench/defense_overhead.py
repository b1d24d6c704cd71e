"""What the defence (mailstack/defense) costs a clean message from a clean client:
the SMTP accept workload (bench/workloads.py, smtp-source) against

  base      a checkout without the defence (--base, e.g. /work/main)
  defaults  this checkout, default settings (the loopback client is in exempt_networks)
  checked   this checkout, the client NOT exempt: rate counters, HELO check and the
            flood admission run for every connection/message (limits raised so that a
            benchmark's 5000 messages from one address are not refused)

rounds alternate the variants so a busy moment of the machine hits all alike; the
median of each is reported with its ratio to base.

    python bench/defense_overhead.py --base /work/main --messages 5000 --rounds 3
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import servers  # noqa: E402
import workloads  # noqa: E402

CHECKED = """
[defense]
exempt_networks = []
max_connections_per_minute = 1000000
max_messages_per_minute = 1000000
max_recipients_per_minute = 1000000
"""


def run_variant(repo: Path, extra: str, args) -> dict:
    servers.REPO = repo
    work = Path(tempfile.mkdtemp(prefix="msb-defense-"))
    ms = servers.Mailstack(work)
    if extra:
        ms.config.write_text(ms.config.read_text() + extra)
    try:
        ms.setup(["bench"])
        ms.start()
        res = workloads.smtp_accept(ms, ms, "bench", args.messages, args.size, args.sessions, False)
        # CPU of the event loop's thread alone (where every check runs), per message: steadier
        # than throughput or whole-process CPU on a shared machine (fsync threads excluded).
        res["loop_ms_per_msg"] = res["main_thread_busy"] * res["seconds_maildir"] * 1000 / args.messages
        return res
    finally:
        ms.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", type=Path, required=True, help="checkout without the defence")
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    variants = {"base": (args.base, ""), "defaults": (HERE.parent, ""), "checked": (HERE.parent, CHECKED)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (repo, extra) in variants.items():
            res = run_variant(repo, extra, args)
            runs[name].append(res)
            print(f"round {r + 1} {name:9s} {res['queued_per_s']:8.1f} msg/s  {res['cpu_ms_per_msg']:.3f} ms CPU/msg  "
                  f"{res['loop_ms_per_msg']:.3f} ms loop CPU/msg", flush=True)
    # Throughput swings with whatever else the machine runs; the server's CPU time per
    # message is the steadier measure of what the checks cost.
    base = {k: statistics.median(r[k] for r in runs["base"]) for k in ("queued_per_s", "cpu_ms_per_msg",
                                                                       "loop_ms_per_msg")}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in base}
        print(f"{name:9s} median {med['queued_per_s']:8.1f} msg/s (x{med['queued_per_s'] / base['queued_per_s']:.3f})"
              f"  {med['cpu_ms_per_msg']:.3f} ms CPU/msg (x{med['cpu_ms_per_msg'] / base['cpu_ms_per_msg']:.3f})"
              f"  {med['loop_ms_per_msg']:.3f} ms loop CPU/msg (x{med['loop_ms_per_msg'] / base['loop_ms_per_msg']:.3f})"
              f"  loop rounds {[round(r['loop_ms_per_msg'], 3) for r in rs]}")


if __name__ == "__main__":
    main()
