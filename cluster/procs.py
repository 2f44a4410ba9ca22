"""Everything edgemeta reads from ``/proc``: the process table, and a process's memory (Linux).

The local launcher finds and stops exactly the processes of one Ray node with it, without
touching anyone else's: ``ray stop`` matches processes by name on the whole host, while these
helpers work from what the launcher recorded, the session id of each node's ``ray start``
(every Ray process of that node inherits it), the descendants of those processes (``ray job``
drivers open sessions of their own), and processes whose command line names the node's temp
dir. The benchmarks use the same table for CPU time by process and for peak memory.

Standard library only, and nothing else of edgemeta: Flower's virtualenv imports it too (through
``benchmarks/peers/procmem.py``), so the peer's memory is read by the same code as ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    state: str  # R, S, D, Z (zombie), X (dead), ...
    comm: str
    cmdline: str  # arguments joined by spaces; "" for kernel threads
    cpu_s: float  # user + system CPU seconds used so far

    @property
    def live(self) -> bool:
        return self.state not in ("Z", "X")


def process_table() -> dict[int, Proc]:
    """A snapshot of every process, from /proc."""
    table: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat_text = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ... utime stime ...": comm may hold spaces and
        # parentheses, so fields are counted from the last ")"; utime and stime are stat's
        # 14th and 15th fields, 12th and 13th after comm.
        comm = stat_text[stat_text.index("(") + 1:stat_text.rindex(")")]
        fields = stat_text[stat_text.rindex(")") + 2:].split()
        pid = int(entry.name)
        table[pid] = Proc(pid, int(fields[1]), int(fields[3]), fields[0], comm, cmdline.strip(),
                          (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def descendants(table: Mapping[int, Proc], roots: Iterable[int]) -> set[int]:
    """``roots`` and every process below them in ``table``."""
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def session_pids(table: Mapping[int, Proc], sessions: Iterable[int]) -> list[int]:
    """Live processes in any of ``sessions`` (ids <= 0 are ignored)."""
    wanted = {s for s in sessions if s > 0}
    return [p.pid for p in table.values() if p.sid in wanted and p.live]


def owned_pids(table: Mapping[int, Proc], sessions: Iterable[int], marker: str) -> list[int]:
    """Live processes of ``sessions``, those whose command line contains ``marker``, and all
    their descendants; never this process."""
    roots = set(session_pids(table, sessions))
    roots |= {p.pid for p in table.values() if marker and marker in p.cmdline and p.live}
    pids = {p for p in descendants(table, roots) if p in table and table[p].live}
    pids.discard(os.getpid())
    return sorted(pids)


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/statm (0 if the process is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_bytes().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (0 if unreadable): shared pages split
    between their users, so it sums over processes to what a group really holds."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def send(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); return those left."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        table = process_table()
        left = [p for p in pids if p in table and table[p].live]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def terminate(pids: Iterable[int], grace_s: float) -> list[int]:
    """SIGTERM, up to ``grace_s`` to exit, then SIGKILL; return the pids that needed SIGKILL."""
    pids = list(pids)
    send(pids, signal.SIGTERM)
    left = wait_gone(pids, grace_s)
    if left:
        send(left, signal.SIGKILL)
        wait_gone(left, 5.0)
    return left
