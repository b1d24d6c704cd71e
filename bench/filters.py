"""What content filtering costs per message: mailstack without filters, with rspamd over
/checkv2, and (optionally) the same "no filter" server from another checkout, side by side.

    python bench/filters.py                           # 300 messages per server, one session
    python bench/filters.py --messages 1000 --baseline /work/main   # + the code of another checkout

Each server gets the same messages over one SMTP session, one at a time; the figure is the
time from the end of DATA to "250" (what a filter adds to every message), and messages/s.
rspamd runs on loopback with a private config and a real loopback DNS server answering
NXDOMAIN at once (no network here: without it, each DNS list lookup would wait a timeout).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from dnsserver import DNSServer  # noqa: E402
from filter_daemons import Rspamd  # noqa: E402
from harness import MailServer  # noqa: E402
from rawclient import SMTP  # noqa: E402

USER = "bench@example.test"


def message(i: int) -> bytes:
    words = " ".join(f"word{(i * 7 + k) % 997}" for k in range(400))
    return (f"From: sender{i}@example.org\r\nTo: {USER}\r\nSubject: message {i}\r\n"
            f"Message-ID: <bench.{i}@example.org>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n"
            f"{words}\r\n").encode()


def measure(port: int, count: int) -> dict:
    smtp = SMTP(port)
    latencies = []
    started = time.perf_counter()
    for i in range(count):
        smtp.command(f"MAIL FROM:<sender{i}@example.org>")
        smtp.command(f"RCPT TO:<{USER}>")
        smtp.command("DATA", expect=b"3")
        smtp.send(message(i) + b".\r\n")
        t0 = time.perf_counter()
        line = smtp.reply()
        latencies.append(time.perf_counter() - t0)
        if not line.startswith(b"250"):
            raise RuntimeError(f"end of DATA: {line!r}")
    total = time.perf_counter() - started
    smtp.close()
    latencies.sort()
    return {"median_ms": statistics.median(latencies) * 1000,
            "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
            "per_s": count / total}


def run_server(tmp: Path, name: str, filters: dict, code: Path, count: int) -> dict:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code)  # the server (and its CLI) import this checkout
    try:
        (tmp / name).mkdir()
        srv = MailServer(tmp / name, overrides={"filters": filters, "server": {"log_level": "warning"}},
                         listeners=("smtp",))
        srv.add_domain("example.test")
        srv.add_user(USER, "pw")
        with srv.start():
            measure(srv.ports["smtp"], min(20, count))  # warm up
            return measure(srv.ports["smtp"], count)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--baseline", type=Path, help="another checkout (e.g. /work/main) measured without filters too")
    p.add_argument("--rounds", type=int, default=3, help="rounds, servers alternating; medians reported")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="msb-filters-"))
    tmp.chmod(0o755)
    dns = DNSServer({}).start()  # every name NXDOMAIN, at once
    rspamd = Rspamd(tmp, dns_address=dns.address)
    runs: dict[str, list[dict]] = {}
    try:
        rspamd.start()
        servers = []
        if args.baseline:
            servers.append((f"no filter (baseline {args.baseline})", {}, args.baseline))
        servers.append(("no filter", {}, REPO))
        servers.append(("rspamd /checkv2", {"rspamd_url": rspamd.url}, REPO))
        for round_ in range(args.rounds):
            for i, (name, filters, code) in enumerate(servers):
                runs.setdefault(name, []).append(run_server(tmp, f"r{round_}s{i}", filters, code, args.messages))
    finally:
        rspamd.stop()
        dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [(name, {k: statistics.median(r[k] for r in rs) for k in rs[0]}) for name, rs in runs.items()]
    print(f"\n{args.messages} messages of ~{len(message(0))} bytes, one SMTP session, one at a time; "
          f"median of {args.rounds} rounds")
    print(f"{'server':44} {'end of DATA->250 median':>24} {'p95':>9} {'msg/s':>8}")
    for name, r in rows:
        print(f"{name:44} {r['median_ms']:21.2f} ms {r['p95_ms']:6.2f} ms {r['per_s']:8.1f}")
    plain = dict(rows)["no filter"]
    filtered = dict(rows)["rspamd /checkv2"]
    print(f"\nrspamd adds {filtered['median_ms'] - plain['median_ms']:.2f} ms per message (median), "
          f"{filtered['p95_ms'] - plain['p95_ms']:.2f} ms at p95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
