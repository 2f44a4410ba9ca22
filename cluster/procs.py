"""The processes of one Ray node, found and stopped without touching anyone else's (Linux).

``ray stop`` matches processes by name on the whole host; these helpers work from what the
local launcher recorded instead: the session id of each node's ``ray start`` (every Ray process
of that node inherits it), the descendants of those processes (``ray job`` drivers open sessions
of their own), and processes whose command line names the node's temp dir.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    state: str  # R, S, D, Z (zombie), X (dead), ...
    comm: str
    cmdline: str

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
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
        comm = stat_text[stat_text.index("(") + 1:stat_text.rindex(")")]
        fields = stat_text[stat_text.rindex(")") + 2:].split()
        pid = int(entry.name)
        table[pid] = Proc(pid, int(fields[1]), int(fields[3]), fields[0], comm, cmdline)
    return table


def session_pids(table: Mapping[int, Proc], sessions: Iterable[int]) -> list[int]:
    """Live processes in any of ``sessions`` (ids <= 0 are ignored)."""
    wanted = {s for s in sessions if s > 0}
    return [p.pid for p in table.values() if p.sid in wanted and p.live]


def owned_pids(table: Mapping[int, Proc], sessions: Iterable[int], marker: str) -> list[int]:
    """Live processes of ``sessions``, those whose command line contains ``marker``, and all
    their descendants; never this process."""
    pids = set(session_pids(table, sessions))
    pids |= {p.pid for p in table.values() if marker and marker in p.cmdline and p.live}
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in pids and table[child].live:
                pids.add(child)
                stack.append(child)
    pids.discard(os.getpid())
    return sorted(pids)


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
