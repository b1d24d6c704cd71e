"""CPU and memory of a process tree, read from /proc (Linux).

Postfix and Dovecot are many processes (master + daemons + one process per IMAP
session); mailstack is one. To compare like with like every figure is summed over the
whole tree under a root pid.

CPU: utime+stime of every live process in the tree plus cutime+cstime (the CPU of
children that already exited and were reaped by their parent - Postfix's smtpd and
cleanup come and go). A tree's CPU over an interval is the difference of two samples.
If a process exits between the samples and its parent is outside the tree, its CPU is
lost; here every reaper (postfix master, dovecot master) is the root of its tree, so
nothing is lost.

Memory: RSS counts a page once per process that maps it, which over-counts a forking
server (shared libraries and copy-on-write pages); PSS (proportional set size, from
smaps_rollup) splits each shared page among its users, so the PSS of a tree is what it
really costs. Both are reported; PSS is the fair one for Dovecot's 10,000 processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree_pids(root: int) -> list[int]:
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2:].split()
    # fields[0] is state (field 3 of stat(5)); utime/stime/cutime/cstime are fields 14-17
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def thread_cpu(pid: int, tid: int) -> float:
    """CPU seconds of one thread (for mailstack: tid == pid is the event loop's thread, so
    its CPU over wall time says how close the loop is to saturation)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


@dataclass
class Sample:
    cpu: float      # seconds of CPU, whole tree, since each process started
    rss_kib: int
    pss_kib: int
    nprocs: int


def sample(roots: list[int]) -> Sample:
    cpu = 0.0
    rss = pss = n = 0
    seen: set[int] = set()
    for root in roots:
        for pid in tree_pids(root):
            if pid in seen:
                continue
            seen.add(pid)
            cpu += _cpu_seconds(pid)
            r, p = _mem_kib(pid)
            rss += r
            pss += p
            n += 1
    return Sample(cpu, rss, pss, n)
