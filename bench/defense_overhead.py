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


def run_variant(repo: Path, extra: str, args) -> float:
    servers.REPO = repo
    work = Path(tempfile.mkdtemp(prefix="msb-defense-"))
    ms = servers.Mailstack(work)
    if extra:
        ms.config.write_text(ms.config.read_text() + extra)
    try:
        ms.setup(["bench"])
        ms.start()
        res = workloads.smtp_accept(ms, ms, "bench", args.messages, args.size, args.sessions, False)
        return res["queued_per_s"]
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
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (repo, extra) in variants.items():
            rate = run_variant(repo, extra, args)
            rates[name].append(rate)
            print(f"round {r + 1} {name:9s} {rate:8.1f} msg/s", flush=True)
    base = statistics.median(rates["base"])
    for name, values in rates.items():
        m = statistics.median(values)
        print(f"{name:9s} median {m:8.1f} msg/s  ratio to base {m / base:.3f}  rounds {[round(v) for v in values]}")


if __name__ == "__main__":
    main()
