"""mailstack side by side with Postfix + Dovecot: run the workloads, print a table.

    python bench/run.py                      # every workload, peers if installed
    python bench/run.py --install-peers      # apt-get install every missing peer package (servers.PEER_PACKAGES) first
    python bench/run.py --only smtp,latency --messages 20000 --sessions 50
    python bench/run.py --no-peers           # mailstack alone

Every server runs on free 127.0.0.1 ports with a private config and data under one
temporary directory, and is stopped at the end (also on error or Ctrl-C). See
bench/README.md and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bigscale  # noqa: E402
import corpus  # noqa: E402
import workloads as wl  # noqa: E402
from servers import (MAIL_GID, MAIL_UID, Dovecot, Mailstack, Postfix, install_peers,  # noqa: E402
                     missing_peers, standard_ports_listening)

WORKLOADS = ("smtp", "latency", "imap", "push", "idle", "pop3", "big", "scale")
USERS = ["bench", "imap", "push", "idle", "pop", "big", "bigpop"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install-peers", action="store_true", help="apt-get install the peers (daemons not started)")
    p.add_argument("--no-peers", action="store_true", help="run mailstack alone")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma list of: {', '.join(WORKLOADS)}")
    p.add_argument("--messages", type=int, default=5000, help="SMTP accept: messages (default 5000)")
    p.add_argument("--size", type=int, default=4096, help="SMTP accept: message body bytes (default 4096)")
    p.add_argument("--sessions", type=int, default=20, help="SMTP accept: concurrent sessions (default 20)")
    p.add_argument("--reconnect", action="store_true", help="SMTP accept: new connection for every message")
    p.add_argument("--rounds", type=int, default=3, help="SMTP accept and latency: rounds, alternating "
                   "mailstack and peer; the table shows the median (default 3)")
    p.add_argument("--latency-messages", type=int, default=300, help="SMTP latency: messages (default 300)")
    p.add_argument("--imap-messages", type=int, default=10000, help="IMAP: messages in the mailbox (default 10000)")
    p.add_argument("--search-pause", type=float, default=0.0,
                   help="IMAP: seconds idle before the second SEARCH BODY, for both servers (default 0)")
    p.add_argument("--fetch-bodies", type=int, default=100, help="IMAP: full bodies fetched (default 100)")
    p.add_argument("--push-messages", type=int, default=100, help="IDLE push: messages (default 100)")
    p.add_argument("--idle-sessions", default="1000,10000", help="idle IMAP sessions held (default 1000,10000)")
    p.add_argument("--pop3-messages", type=int, default=1000, help="POP3: messages RETRieved (default 1000)")
    p.add_argument("--attached-push-messages", type=int, default=30,
                   help="IDLE push measured while the idle sessions are held: messages (default 30)")
    p.add_argument("--big-size", type=int, default=bigscale.BIG_SIZE, help="big: message bytes (default 50 MB)")
    p.add_argument("--big-clients", type=int, default=20, help="big: concurrent IMAP clients (default 20)")
    p.add_argument("--scale-counts", default="1000,10000,100000",
                   help="scale: mailbox sizes (default 1000,10000,100000)")
    p.add_argument("--dovecot-scheme", default="PLAIN", help="Dovecot password scheme (default PLAIN; "
                   "see servers.Dovecot for why not ARGON2ID)")
    p.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"), help="mailstack event loop")
    p.add_argument("--senderauth", default="off", choices=("on", "off"),
                   help="mailstack's SPF/DKIM/ARC/DMARC checks on port 25 (default off: Postfix as started "
                        "here checks none of them, so off compares like with like; `on` is mailstack's own "
                        "default and measures what the checks cost, DNS round trips included)")
    p.add_argument("--background-index", default="on", choices=("on", "off"),
                   help="mailstack's background indexer (server.background_index; default on). On, the "
                        "IMAP rows run once it has indexed the mailboxes placed before the start, and the "
                        "imap_cold rows measure a mailbox linked in after it (cold for both servers)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs, Maildirs)")
    return p.parse_args(argv)


# (workload, key, label, unit, higher_is_better, target ratio or None, target text)
ROWS = [
    ("smtp", "queued_per_s", "SMTP accept {messages:,} x {size} B x {sessions}, to 250", "msg/s", True, 2.0, ">= 2 x Postfix"),
    ("smtp", "maildir_per_s", "SMTP accept, to in the Maildir", "msg/s", True, None, ""),
    ("smtp", "cpu_ms_per_msg", "SMTP accept, server CPU per message", "ms", False, None, ""),
    ("smtp", "cpu_s", "SMTP accept, server CPU (all processes)", "s", False, None, ""),
    ("smtp", "senderauth_ms_per_msg", "  + sender auth (DKIM/ARC/DMARC) CPU per 4 KiB signed msg", "ms", False, None,
     "<= 0.5 ms"),
    ("smtp", "senderauth_resolver_ms_per_msg", "    same, DNS through the server's resolver (warm)", "ms", False,
     None, "<= 0.5 ms"),
    ("latency", "p50_ms", "SMTP 1 session, latency p50", "ms", False, 1.0, "<= Postfix"),
    ("latency", "p99_ms", "SMTP 1 session, latency p99", "ms", False, None, ""),
    ("imap", "select_cold_s", "IMAP SELECT {imap_messages:,} messages, first open", "s", False, None, ""),
    ("imap", "list_cold_s", "IMAP FETCH 1:* (UID FLAGS SIZE DATE ENVELOPE)", "s", False, None, ""),
    ("imap", "open_list_cold_s", "IMAP open + list, first time", "s", False, None, "< 2 s"),
    ("imap", "open_list_warm_s", "IMAP open + list, again", "s", False, None, "< 2 s"),
    ("imap", "search_header_s", "IMAP UID SEARCH SUBJECT", "s", False, None, ""),
    ("imap", "search_body_s", "IMAP UID SEARCH BODY", "s", False, None, ""),
    ("imap", "search_body_again_s", "IMAP UID SEARCH BODY, again (2nd session)", "s", False, None, ""),
    ("imap", "sort_subject_s", "IMAP UID SORT (SUBJECT)", "s", False, None, ""),
    ("imap", "thread_refs_s", "IMAP UID THREAD REFERENCES", "s", False, None, ""),
    ("imap", "sort_subject_again_s", "IMAP UID SORT (SUBJECT), again (2nd session)", "s", False, None, ""),
    ("imap", "thread_refs_again_s", "IMAP UID THREAD REFERENCES, again (2nd session)", "s", False, None, ""),
    ("imap", "fetch_bodies_s", "IMAP FETCH {fetch_bodies} full bodies (median of 5)", "s", False, None, ""),
    ("imap", "fetch_bodies_first_s", "  IMAP FETCH {fetch_bodies} full bodies, first of the 5", "s", False, None, ""),
    ("imap", "cpu_s", "IMAP workload, server CPU", "s", False, None, ""),
    ("imap", "indexer_wait_s", "  (waited for mailstack's background index before it)", "s", False, None, ""),
    ("imap_cold", "select_cold_s", "IMAP SELECT, truly cold (mailbox linked in after the start)", "s", False,
     None, ""),
    ("imap_cold", "list_cold_s", "IMAP FETCH 1:* (... ENVELOPE), truly cold", "s", False, None, ""),
    ("imap_cold", "open_list_cold_s", "IMAP open + list, truly cold", "s", False, None, ""),
    ("imap_cold", "search_header_s", "IMAP UID SEARCH SUBJECT, truly cold", "s", False, None, ""),
    ("imap_cold", "search_body_s", "IMAP UID SEARCH BODY, truly cold", "s", False, None, ""),
    ("imap_cold", "cpu_s", "IMAP workload, truly cold, server CPU", "s", False, None, ""),
    ("push", "p50_ms", "IDLE push, SMTP 250 -> EXISTS p50", "ms", False, None, ""),
    ("push", "p99_ms", "IDLE push, SMTP 250 -> EXISTS p99", "ms", False, None, "< 50 ms"),
    ("pop3", "first_login_s", "POP3 user's first login (IMAP; password check)", "s", False, None, ""),
    ("pop3", "login_stat_s", "POP3 login + STAT, first time", "s", False, None, ""),
    ("pop3", "login_stat_again_s", "POP3 login + STAT, again", "s", False, None, ""),
    ("pop3", "retr_s", "POP3 RETR {pop3_messages:,} messages", "s", False, None, ""),
]


def big_rows(a) -> list:
    mb = a.big_size / 1e6
    rows = [("big", "imap_s", f"IMAP {a.big_clients} clients FETCH BODY[] of a {mb:.0f} MB message, time", "s",
             False, None, "")]
    for proto, what in (("imap", f"  IMAP x {a.big_clients}"), ("pop3", f"POP3 RETR of the {mb:.0f} MB message")):
        if proto == "pop3":
            rows.append(("big", "pop3_s", f"{what}, time", "s", False, None, ""))
            what = "  POP3 RETR"
        rows += [
            ("big", f"{proto}_rss_before_mib", f"{what}: server RSS before", "MiB", False, None, ""),
            ("big", f"{proto}_rss_peak_mib", f"{what}: server RSS peak", "MiB", False, None, ""),
            ("big", f"{proto}_rss_after_mib", f"{what}: server RSS after", "MiB", False, None, ""),
            ("big", f"{proto}_rss_growth_mib", f"{what}: server RSS growth (peak - before)", "MiB", False, None,
             "< 100 MiB"),
        ]
    return rows


def scale_rows(counts: list[int]) -> list:
    rows = []
    for n in counts:
        big = n >= 100000
        rows += [
            ("scale", f"{n}_s", f"SELECT + FETCH 1:* (UID FLAGS), {n:,} msgs, indexed", "s", False, None,
             "< 1 s" if big else ""),
            ("scale", f"{n}_cpu_s", "  same, server CPU", "s", False, None, ""),
            ("scale", f"{n}_first_s", "  same, first time (server indexes)", "s", False, None, ""),
            ("scale", f"{n}_rss_peak_mib", f"  server RSS peak, indexed run", "MiB", False, None,
             "< 300 MiB" if big else ""),
        ]
    rows += [("scale", "indexer_done_before", "  mailstack's background index done before these rows (1 = yes)",
              "", False, None, ""),
             ("scale", "indexer_done_after", "  ... done after them (1 = yes)", "", False, None, "")]
    return rows


def idle_rows(counts: list[int]):
    rows = [("idle", "base_pss_mib", "IMAP server memory, no sessions (PSS)", "MiB", False, None, "")]
    for n in counts:
        target = "< 1024 MiB" if n == 10000 else ""
        rows += [
            ("idle", f"{n}_pss_mib", f"IMAP {n:,} sessions in IDLE, memory (PSS)", "MiB", False, None, target),
            ("idle", f"{n}_rss_mib", f"IMAP {n:,} sessions in IDLE, memory (RSS sum)", "MiB", False, None, ""),
            ("idle", f"{n}_kib_per_session", f"IMAP {n:,} sessions, memory per session", "KiB", False, None, ""),
            ("idle", f"{n}_rss_kib_per_session", f"IMAP {n:,} sessions, RSS growth per session", "KiB", False, None,
             "<= 10 KiB" if n >= 10000 else ""),
            ("idle", f"{n}_login_s", f"IMAP {n:,} sessions, time to log in all", "s", False, None, ""),
            ("idle", f"{n}_push_p50_ms", f"IDLE push p50, {n:,} other sessions attached", "ms", False, None, ""),
            ("idle", f"{n}_push_p99_ms", f"IDLE push p99, {n:,} other sessions attached", "ms", False, None,
             "< 10 ms" if n >= 10000 else ""),
        ]
    return rows


def median_of(runs: list[dict]) -> dict:
    """Figure by figure median over rounds; an error in any round is the result."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"


def target_met(text: str, ms, peer, higher: bool, ratio: float | None = None) -> str:
    if not text or ms is None:
        return ""
    if text.startswith((">= ", "<= ")) and not text.split()[1][0].isdigit() or ratio is not None:
        if peer is None:
            return ""
        ratio = ratio or 1.0
        return "met" if (ms >= ratio * peer if higher else ms <= ratio * peer) else "MISSED"
    limit = float(text.split()[1])
    return "met" if (ms <= limit if text.startswith("<=") else ms < limit) else "MISSED"


def table(results: dict, rows) -> str:
    head = ("figure", "unit", "mailstack", "peer", "mailstack/peer", "better", "target")
    lines = []
    for wk, key, label, unit, higher, goal, target in rows:
        if wk not in results:
            continue
        ms = results[wk].get("mailstack", {}).get(key)
        peer = results[wk].get("peer", {}).get(key)
        ratio = (ms / peer) if (ms is not None and peer) else None
        met = target_met(target, ms, peer, higher, goal)
        lines.append((label, unit, fmt(ms), fmt(peer), f"{ratio:.2f}" if ratio is not None else "-",
                      "higher" if higher else "lower", f"{target} {met}".strip()))
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]

    def row(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([row(head), sep, *(row(line) for line in lines)])


def main(argv=None) -> int:
    args = parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        print(f"unknown workload(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    idle_counts = [int(x) for x in args.idle_sessions.split(",") if x.strip()]
    scale_counts = [int(x) for x in args.scale_counts.split(",") if x.strip()]
    if args.install_peers:
        install_peers()
    with_peers = not args.no_peers
    missing = missing_peers() if with_peers else [p for p in missing_peers() if p == "postfix"]
    if missing:  # smtp-source (postfix) drives SMTP for both, so --no-peers needs postfix too
        print(f"peer packages missing: {', '.join(missing)}: run with --install-peers"
              f"{'' if 'postfix' in missing else ', or --no-peers'}", file=sys.stderr)
        return 2

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="msb-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    started = []
    results: dict = {}
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_start": os.getloadavg(), "args": vars(args) | {"json": str(args.json)}}
    try:
        ms = Mailstack(workdir, loop=args.loop, senderauth=args.senderauth == "on",
                       background_index=args.background_index == "on")
        pf = dv = None
        if with_peers:
            pf = Postfix(workdir, sessions=max(100, args.sessions))
            dv = Dovecot(workdir, pf.mail, max_sessions=max(idle_counts or [1000]) + 200,
                         scheme=args.dovecot_scheme)
        need_corpus = any(w in only for w in ("imap", "pop3", "scale"))
        if need_corpus:
            n_corpus = max(args.imap_messages if "imap" in only else 0, args.pop3_messages if "pop3" in only else 0,
                           1000)
            print(f"building corpus ({n_corpus} messages) ...", flush=True)
            files = corpus.build(workdir / "corpus", n_corpus)
        scale_users = [(f"scale{n}", n) for n in scale_counts] if "scale" in only else []
        users = USERS + ["imapcold"] + [u for u, _ in scale_users]
        # Accounts and mailbox contents are in place before the servers start.
        ms.setup(users)
        if pf:
            for u in users:
                pf.prepare_maildir(u)
        if "big" in only:
            print(f"writing the {args.big_size:,}-byte message ...", flush=True)
            big_path = workdir / "big.eml"
            big_size, big_digest = bigscale.big_message(big_path, args.big_size)
            for u in ("big", "bigpop"):
                bigscale.place(big_path, ms.maildir(u), 1, None)
                if pf:
                    bigscale.place(big_path, pf.maildir(u), 1, (MAIL_UID, MAIL_GID))
        for u, n in scale_users:
            print(f"writing the {n:,}-message mailbox ...", flush=True)
            bigscale.place(None, ms.maildir(u), n, None, files, workdir / "corpus")
            if pf:
                bigscale.place(None, pf.maildir(u), n, (MAIL_UID, MAIL_GID), files, workdir / "corpus")
        if "imap" in only:
            corpus.link_into(files[:args.imap_messages], workdir / "corpus", ms.maildir("imap"), None)
            if pf:
                corpus.link_into(files[:args.imap_messages], workdir / "corpus", pf.maildir("imap"),
                                 (MAIL_UID, MAIL_GID))
        if "pop3" in only:
            corpus.link_into(files[:args.pop3_messages], workdir / "corpus", ms.maildir("pop"), None)
            if pf:
                corpus.link_into(files[:args.pop3_messages], workdir / "corpus", pf.maildir("pop"),
                                 (MAIL_UID, MAIL_GID))
        # Listed before start(): a start that fails half-way still gets stopped below.
        started.append(ms)
        ms.start()
        if pf:
            started.append(pf)
            pf.start(users)
            started.append(dv)
            dv.start(users)
        print(f"servers up in {workdir}", flush=True)

        def both(name, fn_ms, fn_peer, rounds=1):
            """Run mailstack then the peer, `rounds` times alternating (so a busy moment of the
            machine hits both alike); keep every round and report the median of each figure."""
            runs: dict[str, list] = {"mailstack": [], "peer": []}
            for r in range(rounds):
                for label, fn in (("mailstack", fn_ms), ("peer", fn_peer)):
                    if fn is None:
                        continue
                    t0 = time.perf_counter()
                    try:
                        res = fn()
                    except Exception as e:  # a failed workload is reported, the others still run
                        res = {"error": f"{type(e).__name__}: {e}"}
                    runs[label].append(res)
                    print(f"  {name:8s} {label:9s} round {r + 1} {time.perf_counter() - t0:6.1f}s  "
                          f"{json.dumps(res, default=float)[:400]}", flush=True)
            results[name] = {label: median_of(rs) for label, rs in runs.items() if rs}
            if rounds > 1:
                results[name]["rounds"] = runs

        if "smtp" in only:
            a = (args.messages, args.size, args.sessions, args.reconnect)
            both("smtp", lambda: wl.smtp_accept(ms, ms, "bench", *a),
                 pf and (lambda: wl.smtp_accept(pf, pf, "bench", *a)), args.rounds)
            import senderauth as senderauth_bench  # bench/senderauth.py: in-process, no server
            figure = senderauth_bench.measure(2000, 4096)["data_cpu_ms_per_msg"]
            results["smtp"].setdefault("mailstack", {})["senderauth_ms_per_msg"] = figure
            print(f"  senderauth verification CPU {figure:.3f} ms per 4 KiB signed message", flush=True)
            figure = senderauth_bench.measure(2000, 4096, resolver="server")["data_cpu_ms_per_msg"]
            results["smtp"]["mailstack"]["senderauth_resolver_ms_per_msg"] = figure
            print(f"  senderauth verification CPU {figure:.3f} ms, DNS through the server's resolver", flush=True)
        if "latency" in only:
            both("latency", lambda: wl.smtp_latency(ms, "bench", args.latency_messages, args.size),
                 pf and (lambda: wl.smtp_latency(pf, "bench", args.latency_messages, args.size)), args.rounds)
        if any(w in only for w in ("idle", "big", "scale", "imap", "push", "pop3")):
            # The memory and IMAP/POP3 rows are taken once mailstack's background index is done
            # with the mailboxes placed before the start (it ran during the SMTP rounds): its
            # transient state is not a session's cost.  The wait is printed and kept.
            waited_total = ms.wait_indexer()
            results.setdefault("indexer", {})["mailstack"] = {"wait_s": waited_total}
            print(f"  waited {waited_total:.1f} s for mailstack's background index", flush=True)
        if "idle" in only:
            m = args.attached_push_messages

            def push(smtp_server, imap_server):
                return (lambda: wl.idle_push(smtp_server, imap_server, "push", m)) if m else None
            both("idle", lambda: wl.idle_sessions(ms, "idle", idle_counts, push(ms, ms)),
                 dv and (lambda: wl.idle_sessions(dv, "idle", idle_counts, push(pf, dv))))
        if "big" in only:
            a = ("big", "bigpop", args.big_clients, big_size, big_digest)
            both("big", lambda: bigscale.big_fetch(ms, *a), dv and (lambda: bigscale.big_fetch(dv, *a)))
        if "scale" in only:
            def scale_ms():
                # measured while the background index works on the mailboxes, or after: said
                done_before = ms.indexer_done()
                out = bigscale.scale(ms, scale_users)
                return {**out, "indexer_done_before": float(done_before), "indexer_done_after": float(ms.indexer_done())}
            both("scale", scale_ms, dv and (lambda: bigscale.scale(dv, scale_users)))
        if "imap" in only:
            a = (args.imap_messages, args.fetch_bodies, corpus.HEADER_WORD, corpus.BODY_WORD, args.search_pause)
            # The mailbox was placed before the start: mailstack's first rows measure it once
            # the background index is done with it (what a user logging in after a migration
            # meets); the wait is reported.  The truly cold figures: imap_cold below.
            waited = ms.wait_indexer()
            print(f"  waited {waited:.1f} s for mailstack's background index", flush=True)

            def imap_ms():
                return {**wl.imap_mailbox(ms, "imap", *a), "indexer_wait_s": waited}
            both("imap", imap_ms, dv and (lambda: wl.imap_mailbox(dv, "imap", *a)))
            # A mailbox linked in now, after the start and after the background pass: nothing
            # indexes it before the first client, on either server.
            corpus.link_into(files[:args.imap_messages], workdir / "corpus", ms.maildir("imapcold"), None)
            if pf:
                corpus.link_into(files[:args.imap_messages], workdir / "corpus", pf.maildir("imapcold"),
                                 (MAIL_UID, MAIL_GID))
            both("imap_cold", lambda: wl.imap_mailbox(ms, "imapcold", *a),
                 dv and (lambda: wl.imap_mailbox(dv, "imapcold", *a)))
        if "push" in only:
            both("push", lambda: wl.idle_push(ms, ms, "push", args.push_messages),
                 pf and (lambda: wl.idle_push(pf, dv, "push", args.push_messages)))
        if "pop3" in only:
            both("pop3", lambda: wl.pop3_retr(ms, "pop", args.pop3_messages),
                 dv and (lambda: wl.pop3_retr(dv, "pop", args.pop3_messages)))
    finally:
        for s in reversed(started):
            try:
                s.stop()
            except Exception as e:
                print(f"stopping {s.name} failed: {e}", file=sys.stderr)
        meta["loadavg_end"] = os.getloadavg()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [(w, k, label.format(**vars(args)), *rest) for w, k, label, *rest in ROWS] + idle_rows(idle_counts) \
        + big_rows(args) + scale_rows(scale_counts)
    print()
    print(f"mailstack vs Postfix 3.7 (SMTP) + Dovecot 2.3 (IMAP/POP3), {meta['date']}, "
          f"{meta['cpus']} CPUs, load average {meta['loadavg_start'][0]:.1f} at start, "
          f"{meta['loadavg_end'][0]:.1f} at end")
    print(table(results, rows))
    errors = [(w, who, r["error"]) for w, d in results.items() for who, r in d.items()
              if isinstance(r, dict) and "error" in r]
    for w, who, e in errors:
        print(f"ERROR {w} ({who}): {e}")
    leftover = standard_ports_listening()
    if leftover:
        print(f"WARNING: something listens on standard mail port(s) {leftover} (not started by this run "
              "unless --install-peers let a daemon start)")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
