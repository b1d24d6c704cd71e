"""The six workloads of issue 7. Each takes a started server (bench/servers.py) and its
parameters, runs against the server's real listeners, and returns a dict of figures.

CPU and memory are sampled from /proc over the server's whole process tree
(bench/proctree.py) around each workload.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import proctree
from rawclient import IMAP, POP3, SMTP
from servers import DOMAIN, PASSWORD, count_files, wait_for

BENCH = Path(__file__).resolve().parent
SENDER = "sender@example.org"


def _pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def _inbox_count(maildir: Path) -> int:
    return count_files(maildir / "new", maildir / "cur")


# --- 1. SMTP accept ------------------------------------------------------------------------
def smtp_accept(server, smtp_server, user: str, messages: int, size: int, sessions: int,
                reconnect: bool) -> dict:
    """smtp-source: `messages` messages of `size` bytes over `sessions` concurrent sessions.
    Rate to the last "250 queued" (smtp-source exits) and to the last file in the Maildir."""
    maildir = server.maildir(user)
    before_files = _inbox_count(maildir)
    roots = smtp_server.roots("smtp")
    cpu0 = proctree.sample(roots).cpu
    main0 = proctree.thread_cpu(roots[0], roots[0])
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", SENDER, "-t", f"{user}@{DOMAIN}", "-M", "client.bench.test"]
    if not reconnect:
        cmd.append("-d")  # keep each session open for its next message
    cmd.append(f"127.0.0.1:{smtp_server.ports['smtp']}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    t_queued = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({r.returncode}): {r.stdout[-500:]}{r.stderr[-500:]}")
    wait_for(lambda: _inbox_count(maildir) >= before_files + messages, 600,
             what=f"{messages} messages in {maildir}", interval=0.01)
    t_maildir = time.perf_counter() - t0
    end = proctree.sample(roots)
    main_busy = (proctree.thread_cpu(roots[0], roots[0]) - main0) / t_maildir
    return {"queued_per_s": messages / t_queued, "maildir_per_s": messages / t_maildir,
            "seconds_queued": t_queued, "seconds_maildir": t_maildir,
            "cpu_s": end.cpu - cpu0, "cpu_ms_per_msg": (end.cpu - cpu0) * 1000 / messages,
            "rss_mib": end.rss_kib / 1024, "pss_mib": end.pss_kib / 1024, "procs": end.nprocs,
            # share of one core used by the root process's main thread (mailstack: the event loop)
            "main_thread_busy": main_busy}


def _message(size: int, n: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <bench@{DOMAIN}>\r\nSubject: latency {n}\r\n"
            f"Message-ID: <lat{n}.{time.time_ns()}@example.org>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


# --- 2. SMTP single-session latency -----------------------------------------------------------
def smtp_latency(smtp_server, user: str, messages: int, size: int) -> dict:
    """One connection, one message after another: MAIL FROM to the 250 after DATA."""
    c = SMTP(smtp_server.ports["smtp"])
    times = []
    try:
        for n in range(messages):
            body = _message(size, n)
            t0 = time.perf_counter()
            t1 = c.send_message(SENDER, f"{user}@{DOMAIN}", body)
            times.append((t1 - t0) * 1000)
        c.command("QUIT")
    finally:
        c.close()
    return {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99), "mean_ms": statistics.fmean(times)}


# --- 3. IMAP on a big mailbox ------------------------------------------------------------------
LIST_ITEMS = "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"


FETCH_BODIES_REPEATS = 5


def imap_mailbox(imap_server, user: str, expected: int, bodies: int, header_word: str, body_word: str,
                 search_body_pause: float = 0.0) -> dict:
    roots = imap_server.roots("imap")
    cpu0 = proctree.sample(roots).cpu
    out: dict = {}
    c = IMAP(imap_server.ports["imap"])
    try:
        c.login(f"{user}@{DOMAIN}", PASSWORD)
        t, lines, _ = c.timed("SELECT INBOX")
        exists = next((int(x.split()[1]) for x in lines if x.endswith(b" EXISTS\r\n")), -1)
        if exists != expected:
            raise RuntimeError(f"SELECT found {exists} messages, expected {expected}")
        out["select_cold_s"] = t
        t, lines, _ = c.timed(f"FETCH 1:* {LIST_ITEMS}")
        fetched = sum(1 for x in lines if b" FETCH " in x[:20])
        if fetched != expected:
            raise RuntimeError(f"FETCH 1:* returned {fetched} messages, expected {expected}")
        out["list_cold_s"] = t
        out["open_list_cold_s"] = out["select_cold_s"] + t
        t, lines, _ = c.timed(f'UID SEARCH SUBJECT "{header_word}"')
        out["search_header_s"] = t
        out["search_header_hits"] = sum(len(x.split()) - 2 for x in lines if x.startswith(b"* SEARCH"))
        t, lines, _ = c.timed(f'UID SEARCH BODY "{body_word}"')
        out["search_body_s"] = t
        out["search_body_hits"] = sum(len(x.split()) - 2 for x in lines if x.startswith(b"* SEARCH"))
        _sort_thread(c, expected, out, "")
        step = max(1, expected // bodies)
        seqs = ",".join(str(1 + i * step) for i in range(min(bodies, expected)))
        # Sent FETCH_BODIES_REPEATS times, the median kept: one ~2 ms answer was one sample, and
        # a scheduling hiccup of the machine (or of this client) made it 2-18 ms from run to
        # run (docs/benchmarks.md, issue 16, session 6).  Neither server caches bodies: each
        # FETCH reads the files again, from the page cache on both.
        times, sizes = [], set()
        for _ in range(FETCH_BODIES_REPEATS):
            t, lines, lit = c.timed(f"FETCH {seqs} BODY.PEEK[]")
            times.append(t)
            sizes.add(lit)
        if len(sizes) != 1:
            raise RuntimeError(f"the same FETCH of bodies returned {sorted(sizes)} bytes")
        out["fetch_bodies_s"] = statistics.median(times)
        out["fetch_bodies_first_s"] = times[0]
        out["fetch_bodies_mib"] = lit / 2**20
        c.command("LOGOUT")
    finally:
        c.close()
    # A second session: the mailbox as every later client sees it (index / cache warm).
    c = IMAP(imap_server.ports["imap"])
    try:
        c.login(f"{user}@{DOMAIN}", PASSWORD)
        t1, _, _ = c.timed("SELECT INBOX")
        t2, _, _ = c.timed(f"FETCH 1:* {LIST_ITEMS}")
        out["open_list_warm_s"] = t1 + t2
        time.sleep(search_body_pause)  # time for background indexing, if a server does any
        t, lines, _ = c.timed(f'UID SEARCH BODY "{body_word}"')
        out["search_body_again_s"] = t
        out["search_body_again_hits"] = sum(len(x.split()) - 2 for x in lines if x.startswith(b"* SEARCH"))
        _sort_thread(c, expected, out, "_again")
        c.command("LOGOUT")
    finally:
        c.close()
    end = proctree.sample(roots)
    out["cpu_s"] = end.cpu - cpu0
    out["rss_mib"] = end.rss_kib / 1024
    return out


def _sort_thread(c, expected: int, out: dict, suffix: str) -> None:
    """UID SORT (SUBJECT) and UID THREAD REFERENCES over the whole mailbox (RFC 5256).  The
    CRC-32 of each answer goes into the figures: equal numbers mean the same answer."""
    t, lines, _ = c.timed("UID SORT (SUBJECT) UTF-8 ALL")
    answer = b"".join(x for x in lines if x.startswith(b"* SORT")).strip()
    if len(answer.split()) - 2 != expected:
        raise RuntimeError(f"SORT returned {len(answer.split()) - 2} messages, expected {expected}")
    out["sort_subject" + suffix + "_s"] = t
    out["sort_subject" + suffix + "_crc"] = zlib.crc32(answer)
    t, lines, _ = c.timed("UID THREAD REFERENCES UTF-8 ALL")
    answer = b"".join(x for x in lines if x.startswith(b"* THREAD")).strip()
    out["thread_refs" + suffix + "_s"] = t
    out["thread_refs" + suffix + "_crc"] = zlib.crc32(answer)
    depth = threads = 0
    for ch in answer[len(b"* THREAD"):]:
        if ch == 0x28:
            threads += depth == 0
            depth += 1
        elif ch == 0x29:
            depth -= 1
    out["thread_refs" + suffix + "_threads"] = threads


# --- 4. IDLE push ------------------------------------------------------------------------------
def idle_push(smtp_server, imap_server, user: str, messages: int, timeout: float = 10.0) -> dict:
    """From the 250 of SMTP DATA to "* N EXISTS" on a session in IDLE."""
    imap = IMAP(imap_server.ports["imap"])
    smtp = SMTP(smtp_server.ports["smtp"])
    times, missed = [], 0
    try:
        imap.login(f"{user}@{DOMAIN}", PASSWORD)
        lines, _, _ = imap.command("SELECT INBOX")
        exists = next(int(x.split()[1]) for x in lines if x.endswith(b" EXISTS\r\n"))
        imap.send(b"I IDLE\r\n")
        while not imap.readline().startswith(b"+"):
            pass
        imap.sock.settimeout(timeout)
        for n in range(messages):
            t250 = smtp.send_message(SENDER, f"{user}@{DOMAIN}", _message(2048, n))
            want = exists + 1
            try:
                while True:
                    line = imap.readline()
                    parts = line.split()
                    if len(parts) == 3 and parts[2] == b"EXISTS" and int(parts[1]) >= want:
                        times.append((time.perf_counter() - t250) * 1000)
                        exists = int(parts[1])
                        break
            except TimeoutError:
                missed += 1
                exists += 1
        imap.send(b"DONE\r\n")
        smtp.command("QUIT")
    finally:
        imap.close()
        smtp.close()
    if not times:
        raise RuntimeError("no EXISTS seen in IDLE")
    return {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99), "max_ms": max(times), "missed": missed}


# --- 5. idle connections -------------------------------------------------------------------------
def idle_sessions(imap_server, user: str, counts: list[int], push=None) -> dict:
    """Resident memory of the server's process tree with N sessions logged in and in IDLE.
    The holder is a separate process, so its memory is not counted. `push`, if given, is
    called while the N sessions are held (IDLE push measured on another account's session
    with N others attached) and its figures are kept as "<N>_push_<figure>"."""
    roots = imap_server.roots("imap")
    out: dict = {}
    base = proctree.sample(roots)
    out["base_rss_mib"] = base.rss_kib / 1024
    out["base_pss_mib"] = base.pss_kib / 1024
    for n in counts:
        holder = subprocess.Popen([sys.executable, str(BENCH / "idle_holder.py"), str(imap_server.ports["imap"]),
                                   f"{user}@{DOMAIN}", PASSWORD, str(n)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready = ""
            while not ready.startswith("READY"):
                ready = holder.stdout.readline()
                if not ready:
                    raise RuntimeError("idle holder died")
                if ready.startswith("ERRORS"):
                    print(f"    {imap_server.name}: {ready.strip()}", flush=True)
            _, held, secs = ready.split()
            time.sleep(0.5)  # let the last sessions settle into IDLE (allocations done)
            s = proctree.sample(roots)
            out[f"{n}_held"] = int(held)
            out[f"{n}_login_s"] = float(secs)
            out[f"{n}_rss_mib"] = s.rss_kib / 1024
            out[f"{n}_pss_mib"] = s.pss_kib / 1024
            out[f"{n}_kib_per_session"] = (s.pss_kib - base.pss_kib) / max(1, int(held))
            # RSS growth too: PSS splits shared library pages among every process mapping them,
            # so a base sampled while other processes come and go moves it by megabytes
            out[f"{n}_rss_kib_per_session"] = (s.rss_kib - base.rss_kib) / max(1, int(held))
            out[f"{n}_procs"] = s.nprocs
            if push is not None:
                for k, v in push().items():
                    out[f"{n}_push_{k}"] = v
        finally:
            holder.stdin.close()
            holder.wait(120)
        # Sessions end on the server side only after it notices the closed sockets.
        wait_for(lambda: proctree.sample(roots).nprocs <= base.nprocs + 2, 120, what="sessions to end", interval=0.2)
        time.sleep(1.0)
    return out


# --- 6. POP3 ----------------------------------------------------------------------------------------
def pop3_retr(pop_server, user: str, expected: int) -> dict:
    roots = pop_server.roots("pop3")
    # The account's first login checks its password (mailstack: argon2, Dovecot here: PLAIN):
    # done over IMAP (LOGIN only, no mailbox opened) and timed apart, so that the first STAT
    # below is the mailbox's first listing, as big_fetch() does for its rows.
    t0 = time.perf_counter()
    c = IMAP(pop_server.ports["imap"])
    try:
        c.login(f"{user}@{DOMAIN}", PASSWORD)
        c.command("LOGOUT")
    finally:
        c.close()
    t_first_login = time.perf_counter() - t0
    cpu0 = proctree.sample(roots).cpu
    c = POP3(pop_server.ports["pop3"])
    try:
        t0 = time.perf_counter()
        c.command(f"USER {user}@{DOMAIN}")
        c.command(f"PASS {PASSWORD}")
        stat = c.command("STAT").split()
        t_open = time.perf_counter() - t0
        if int(stat[1]) != expected:
            raise RuntimeError(f"STAT says {stat[1]} messages, expected {expected}")
        t0 = time.perf_counter()
        total = 0
        for i in range(1, expected + 1):
            total += c.multiline(f"RETR {i}")
        t_retr = time.perf_counter() - t0
        c.command("QUIT")
    finally:
        c.close()
    c = POP3(pop_server.ports["pop3"])  # a second session: sizes and index known by now
    try:
        t0 = time.perf_counter()
        c.command(f"USER {user}@{DOMAIN}")
        c.command(f"PASS {PASSWORD}")
        c.command("STAT")
        t_again = time.perf_counter() - t0
        c.command("QUIT")
    finally:
        c.close()
    end = proctree.sample(roots)
    return {"first_login_s": t_first_login, "login_stat_s": t_open, "login_stat_again_s": t_again, "retr_s": t_retr,
            "retr_mib": total / 2**20, "cpu_s": end.cpu - cpu0}
