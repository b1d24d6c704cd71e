"""server.tune_malloc (issue 16): blocks of 128 KiB and more stay mapped on their own and go
back to the system when freed.  glibc otherwise raises that threshold each time a mapped
block is freed, then serves such blocks from a thread's heap, where the freed memory stays
resident between long-lived small blocks: the server kept ~80 MiB more after 20 clients
streamed a 50 MB message (256 KiB pieces, worker threads) once the background indexer had
freed its big lists.  Run in a fresh interpreter: the setting is for the whole process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = r"""
import os, sys, threading
sys.path.insert(0, sys.argv[1])
from mailstack import server
server.tune_malloc()  # what the server does at start (server._main)

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def work():
    big = b"x" * (8 << 20)  # a big mapped block, freed (the indexer's lists of a big mailbox)
    del big
    before = rss_mib()
    pieces, kept = [], []
    for _ in range(200):  # 50 MiB of streaming pieces, long-lived small blocks between them
        pieces.append(b"y" * (256 << 10))
        kept.append(b"z" * 2048)
    del pieces
    grown.append(rss_mib() - before)

grown = []
worker = threading.Thread(target=work)  # as in the server's worker threads
worker.start()
worker.join()
print(grown[0])
"""


def test_freed_big_blocks_go_back_to_the_system_after_the_threshold_would_have_risen():
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(ROOT)], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    grown = float(out.stdout)
    assert grown < 5, f"{grown:.1f} MiB still resident after 50 MiB of pieces were freed"
