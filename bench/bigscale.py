"""Workloads of issue 16 (large messages, scale): big-message streaming and big mailboxes.

    big      20 IMAP clients FETCH BODY.PEEK[] of one 50 MB message at once, then POP3 RETR
             of it: time and the server's memory before / at its peak / after.
    scale    mailboxes of 1,000, 10,000 and 100,000 messages (Maildir files written behind
             the server's back, then indexed by a first SELECT + FETCH): SELECT +
             FETCH 1:* (UID FLAGS) once indexed, and the server's memory while it runs.

Memory: the peak is what matters for streaming, so a thread samples the server's process
tree (RSS and PSS summed, bench/proctree.py) every 20 ms; for mailstack (one process) the
kernel's own high-water mark VmHWM, reset through /proc/PID/clear_refs before the run, is
exact and is what the table shows.
"""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import proctree
from rawclient import IMAP, POP3
from servers import DOMAIN, PASSWORD

BIG_SIZE = 50_000_000


# --- the message and the mailboxes ----------------------------------------------------------
def big_message(path: Path, size: int = BIG_SIZE, seed: int = 16) -> tuple[int, str]:
    """A CRLF text message of `size` bytes (lines of 0-120 characters, a fifth of them starting
    with a dot: RETR must dot-stuff across its pieces), written once. Returns (size, sha256)."""
    if not path.exists():
        rnd = random.Random(seed)
        head = (b"From: Big <big@bench.test>\r\nTo: big@bench.test\r\nSubject: 50 MB\r\n"
                b"Message-ID: <big-16@bench.test>\r\nDate: Tue, 01 Dec 2026 00:00:00 +0000\r\n\r\n")
        lines = []
        for _ in range(4096):  # a 240 KB block of lines, repeated with a varying first line
            n = rnd.randrange(0, 120)
            lines.append((b"." if rnd.random() < 0.2 else b"") + rnd.randbytes(n).hex()[:n].encode() + b"\r\n")
        block = b"".join(lines)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            written, i = len(head), 0
            while written < size:
                piece = (b"%d\r\n" % i + block)[:size - written]
                if written + len(piece) >= size and not piece.endswith(b"\r\n"):
                    piece = piece[:-2] + b"\r\n" if len(piece) >= 2 else b"\r\n"[:len(piece)]
                f.write(piece)
                written += len(piece)
                i += 1
        os.rename(tmp, path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def place(src: Path, maildir: Path, count: int, owner: tuple[int, int] | None, corpus_files=None,
          corpus_dir: Path | None = None) -> None:
    """Hard-link `src` (or, for a scale mailbox, the corpus files in turn) into maildir/cur/ as
    seen messages: written behind the server's back, no index."""
    cur = maildir / "cur"
    for sub in ("", "new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(maildir / sub, *owner)
    sources = set()
    for i in range(count):
        if corpus_files:
            name, size = corpus_files[i % len(corpus_files)]
            source = corpus_dir / name
        else:
            source, size = src, src.stat().st_size
        sources.add(source)
        target = cur / f"{1700000000 + i}.M{i}P16Q{i}.bench,S={size},W={size}:2,S"
        os.link(source, target)
    if owner:  # shared with mailstack's copy: readable is all Dovecot needs (it renames, never writes)
        for source in sources:
            os.chmod(source, 0o644)


# --- memory --------------------------------------------------------------------------------------
class MemoryWatch:
    """The server tree's memory before, at its peak during, and after a block."""

    def __init__(self, roots: list[int], single: bool) -> None:
        self.roots, self.single = roots, single
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = proctree.sample(self.roots)
            self.peak_rss = max(self.peak_rss, s.rss_kib)
            self.peak_pss = max(self.peak_pss, s.pss_kib)
            self._stop.wait(0.02)

    def __enter__(self) -> "MemoryWatch":
        if self.single:
            Path(f"/proc/{self.roots[0]}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.before = proctree.sample(self.roots)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.single:
            hwm = _status_kib(self.roots[0], "VmHWM")
            self.peak_rss = max(self.peak_rss, hwm)
        self.after = proctree.sample(self.roots)

    def figures(self, prefix: str) -> dict:
        mib = 1 / 1024
        return {f"{prefix}_rss_before_mib": self.before.rss_kib * mib,
                f"{prefix}_rss_peak_mib": self.peak_rss * mib,
                f"{prefix}_rss_after_mib": self.after.rss_kib * mib,
                f"{prefix}_rss_growth_mib": (self.peak_rss - self.before.rss_kib) * mib,
                f"{prefix}_pss_before_mib": self.before.pss_kib * mib,
                f"{prefix}_pss_peak_mib": self.peak_pss * mib}


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# --- big: streaming a 50 MB message ---------------------------------------------------------------
def big_fetch(server, imap_user: str, pop_user: str, clients: int, size: int, digest: str) -> dict:
    out: dict = {}
    single = server.name == "mailstack"
    roots = server.roots("imap")
    # Log in once per account first: a first login's password check and module loading are
    # not what is measured.
    for user, proto in ((imap_user, "imap"), (pop_user, "pop3")):
        if proto == "imap":
            c = IMAP(server.ports["imap"])
            c.login(f"{user}@{DOMAIN}", PASSWORD)
            c.command("EXAMINE INBOX")
            c.command("LOGOUT")
        else:
            c = POP3(server.ports["pop3"])
            c.command(f"USER {user}@{DOMAIN}")
            c.command(f"PASS {PASSWORD}")
            c.command("QUIT")
        c.close()

    errors: list = []
    hashes: list = []

    def fetch_one() -> None:
        c = IMAP(server.ports["imap"])
        try:
            c.login(f"{imap_user}@{DOMAIN}", PASSWORD)
            c.command("EXAMINE INBOX")
            c.n += 1
            tag = f"B{c.n:05d}".encode()
            c.send(tag + b" FETCH 1 BODY.PEEK[]\r\n")
            h = hashlib.sha256()
            while True:
                line = c.readline()
                if line.endswith(b"}\r\n") and b"{" in line:
                    n = int(line[line.rindex(b"{") + 1:-3])
                    while n:
                        piece = c.take(n)
                        h.update(piece)
                        n -= len(piece)
                elif line.startswith(tag + b" "):
                    if not line.startswith(tag + b" OK"):
                        raise RuntimeError(line)
                    break
            hashes.append(h.hexdigest())
            c.command("LOGOUT")
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(e)
        finally:
            c.close()

    with MemoryWatch(roots, single) as mem:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=fetch_one) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["imap_s"] = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} IMAP clients failed, first: {errors[0]!r}")
    if hashes != [digest] * clients:
        raise RuntimeError("an IMAP client got different bytes")
    out.update(mem.figures("imap"))
    out["imap_mib_per_s"] = clients * size / 2**20 / out["imap_s"]
    time.sleep(1.0)  # sessions end; memory settles

    with MemoryWatch(roots, single) as mem:
        c = POP3(server.ports["pop3"])
        try:
            c.command(f"USER {pop_user}@{DOMAIN}")
            c.command(f"PASS {PASSWORD}")
            t0 = time.perf_counter()
            total = c.multiline("RETR 1")
            out["pop3_s"] = time.perf_counter() - t0
            c.command("QUIT")
        finally:
            c.close()
    if total < size:
        raise RuntimeError(f"RETR gave {total} bytes for a {size}-byte message")
    out.update(mem.figures("pop3"))
    return out


# --- scale: 1,000 / 10,000 / 100,000 messages ------------------------------------------------------
def scale(server, users_counts: list[tuple[str, int]]) -> dict:
    out: dict = {}
    single = server.name == "mailstack"
    roots = server.roots("imap")
    for user, n in users_counts:
        c = IMAP(server.ports["imap"])
        try:
            c.login(f"{user}@{DOMAIN}", PASSWORD)
            with MemoryWatch(roots, single) as mem:
                t_sel, lines, _ = c.timed("SELECT INBOX")
                t_fetch, lines, _ = c.timed("FETCH 1:* (UID FLAGS)")
            got = sum(1 for x in lines if b" FETCH " in x[:24])
            if got != n:
                raise RuntimeError(f"{user}: FETCH 1:* gave {got} messages, expected {n}")
            out[f"{n}_first_s"] = t_sel + t_fetch
            out[f"{n}_first_rss_peak_mib"] = mem.peak_rss / 1024
            c.command("LOGOUT")
        finally:
            c.close()
        c = IMAP(server.ports["imap"])  # a second session: the mailbox is indexed now
        try:
            c.login(f"{user}@{DOMAIN}", PASSWORD)
            cpu0 = proctree.sample(roots).cpu
            with MemoryWatch(roots, single) as mem:
                t_sel, _, _ = c.timed("SELECT INBOX")
                t_fetch, lines, _ = c.timed("FETCH 1:* (UID FLAGS)")
            # the server's CPU for it: on a busy machine the wall time is mostly waiting for a core
            out[f"{n}_cpu_s"] = proctree.sample(roots).cpu - cpu0
            out[f"{n}_select_s"] = t_sel
            out[f"{n}_fetch_s"] = t_fetch
            out[f"{n}_s"] = t_sel + t_fetch
            out[f"{n}_rss_peak_mib"] = mem.peak_rss / 1024
            out[f"{n}_rss_growth_mib"] = (mem.peak_rss - mem.before.rss_kib) / 1024
            out[f"{n}_pss_peak_mib"] = mem.peak_pss / 1024
            c.command("LOGOUT")
        finally:
            c.close()
    return out
