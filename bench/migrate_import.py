"""Importer memory at scale: `mailstack import imap` of a large generated account out of a real
Dovecot, with the importer's RSS sampled from /proc every 50 ms (peak = VmHWM).

    python bench/migrate_import.py --messages 20000 --size 50000 --big 2 --big-size 20000000

Generates the account straight into the Dovecot user's Maildir (files in cur/, spread over
--folders folders, average --size bytes each, plus --big messages of --big-size bytes), lets
Dovecot index it, then runs the importer as its own process and reports messages, bytes,
time, rate and peak RSS.  Run as root (Dovecot drops to nobody).  Not collected by pytest.
"""
from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from dovecot_fixture import Dovecot  # noqa: E402
from harness import MailServer  # noqa: E402


def generate(maildir: Path, messages: int, size: int, folders: int, big: int, big_size: int,
             uid: int, gid: int) -> int:
    """Write the account; returns total bytes (as Dovecot will serve them, CRLF)."""
    total = 0
    dirs = [maildir] + [maildir / f".Folder{i}" for i in range(1, folders)]
    for d in dirs:
        for sub in ("cur", "new", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if d != maildir:
            (d / "maildirfolder").touch()
    filler = base64.encodebytes(os.urandom(max(size, 1000)))
    now = int(time.time())
    for i in range(messages + big):
        d = dirs[i % len(dirs)]
        n = big_size if i >= messages else size
        head = (f"From: s{i}@example.org\nTo: u@example.test\nSubject: message {i}\n"
                f"Message-ID: <bench{i}@example.org>\n\n").encode()
        body = (filler * (n // len(filler) + 1))[:max(0, n - len(head))]
        data = head + body
        name = f"{now - i}.M{i}P1.bench,S={len(data)}:2,{'S' if i % 3 else ''}"
        with open(d / "cur" / name, "wb") as f:
            f.write(data)
        total += len(data) + data.count(b"\n")
    subprocess.run(["chown", "-R", f"{uid}:{gid}", str(maildir)], check=True)
    return total


def peak_rss(cmd: list[str], stdin: bytes) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS KiB, stderr tail) of a process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stdin.write(stdin)
    proc.stdin.close()
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace")
    return proc.returncode, time.monotonic() - t0, peak, err[-600:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=int, default=50000, help="bytes per ordinary message")
    ap.add_argument("--folders", type=int, default=5)
    ap.add_argument("--big", type=int, default=2, help="extra large messages")
    ap.add_argument("--big-size", type=int, default=20_000_000)
    args = ap.parse_args()

    dc = Dovecot()
    work = Path(tempfile.mkdtemp(prefix="msb-migrate-"))
    try:
        dc.add_user("u@example.test", "pw")
        t0 = time.monotonic()
        total = generate(dc.maildir("u@example.test"), args.messages, args.size, args.folders, args.big,
                         args.big_size, dc.uid, dc.gid)
        gen = time.monotonic() - t0
        dc.start()
        srv = MailServer(work)
        srv.add_domain("example.test")
        srv.add_user("alice@example.test", "secret")
        cmd = [sys.executable, "-m", "mailstack", "import", "imap", "alice@example.test", "--from",
               f"imaps://127.0.0.1:{dc.imaps_port}", "--login", "u@example.test", "--password-stdin",
               "--ca-file", str(dc.dir / "cert.pem"), "--config", str(srv.config_path)]
        env_note = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
        rc, secs, peak, err = peak_rss(cmd, b"pw\n")
        n = args.messages + args.big
        print(f"account: {n} messages in {args.folders} folders, {total / 2**20:.1f} MiB "
              f"(largest {max(args.big_size if args.big else 0, args.size) / 2**20:.2f} MiB), generated in {gen:.1f}s")
        print(f"import: exit {rc}, {secs:.1f}s, {n / secs:.0f} msg/s, {total / 2**20 / secs:.1f} MiB/s, "
              f"importer peak RSS {peak / 1024:.1f} MiB  ({env_note})")
        print(err.strip().splitlines()[-1] if err.strip() else "")
        return rc
    finally:
        dc.cleanup()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
