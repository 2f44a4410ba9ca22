"""Peak memory of a group of processes, sampled in a background thread from /proc.

Used by both benchmark sides (the project venv has no psutil, Flower's venv does), so it reads
/proc directly and imports nothing outside the standard library. Linux only.

Two ways to choose the group, combinable:

* ``root_pid``: that process and all of its descendants. ``ray.init()`` starts gcs_server,
  raylet, the dashboard and (through the raylet) every worker as descendants of the driver, so
  the driver's tree is the whole embedded cluster -- and it excludes clusters that other people
  run on the same host.
* ``patterns``: any process whose command line contains one of the substrings (e.g. for a
  cluster started by ``ray start``, which is not a child of the driver); ``must_contain``
  narrows that to command lines also holding e.g. a session directory or port.

RSS summed over processes counts shared pages (torch's libraries, Ray's plasma store) once per
process, so it over-states the real footprint; PSS (from ``smaps_rollup``) splits shared pages
between their users and sums to what the group really holds. Both peaks are reported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY_PATTERNS: tuple[str, ...] = (
    "raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "default_worker.py",
    "log_monitor.py", "monitor.py", "dashboard_agent", "runtime_env", "plasma_store",
)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids for every live process (one pass over /proc/*/stat)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root_pid: int) -> set[int]:
    """``root_pid`` and every process below it."""
    kids = _children_map()
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(kids.get(pid, ()))
    return found


def cmdline(pid: int) -> str:
    """The process's command line with NULs as spaces ('' if it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def matching(patterns: Iterable[str], must_contain: str | None = None) -> set[int]:
    """Pids whose command line contains any pattern (and ``must_contain``, if given)."""
    pats = tuple(patterns)
    me = os.getpid()
    out: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        line = cmdline(int(name))
        if line and any(p in line for p in pats) and (must_contain is None or must_contain in line):
            out.add(int(name))
    return out


def process_label(pid: int) -> str:
    """A short name for a process: Ray's title (``ray::EdgeNode``, ``raylet``) or argv[0:2]."""
    words = cmdline(pid).split()
    if not words:
        return f"pid {pid}"
    if words[0].startswith("ray::"):
        return words[0]
    return " ".join(Path(w).name if "/" in w else w for w in words[:2])[:60]


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/statm (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class PeakMemSampler:
    """Samples the group's summed RSS/PSS every ``interval_s`` until stopped; keeps the peaks.

    Use as a context manager around the workload, then read :meth:`result`.
    """

    root_pid: int | None = None
    patterns: Sequence[str] = ()
    must_contain: str | None = None
    extra: Callable[[], Iterable[int]] | None = None  # e.g. a detached cluster's processes
    interval_s: float = 0.25
    with_pss: bool = True
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    samples: int = 0
    #: At the RSS peak: (what the process is, RSS MiB), largest first; says where memory went.
    peak_breakdown: list[tuple[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def pids(self) -> set[int]:
        """The group right now."""
        group: set[int] = set()
        if self.root_pid is not None:
            group |= descendants(self.root_pid)
        if self.patterns:
            group |= matching(self.patterns, self.must_contain)
        if self.extra is not None:
            group |= set(self.extra())
        return group

    def sample(self) -> None:
        """Take one sample and update the peaks."""
        group = self.pids()
        rss = {p: rss_bytes(p) for p in group}
        if sum(rss.values()) > self.peak_rss:
            self.peak_rss = sum(rss.values())
            self.peak_breakdown = sorted(
                ((process_label(p), round(b / 2**20, 1)) for p, b in rss.items()),
                key=lambda item: -item[1])
        if self.with_pss:
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in group))
        self.peak_procs = max(self.peak_procs, len(group))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> PeakMemSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="procmem", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.result()

    def __enter__(self) -> PeakMemSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def result(self) -> dict[str, Any]:
        """Peaks in bytes and MiB, ready for a JSON line."""
        return {
            "peak_rss_bytes": self.peak_rss, "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "peak_pss_bytes": self.peak_pss, "peak_pss_mib": round(self.peak_pss / 2**20, 1),
            "peak_procs": self.peak_procs, "mem_samples": self.samples,
            "peak_breakdown": self.peak_breakdown,
        }


if __name__ == "__main__":  # quick look: python procmem.py PID  -> one sample of that tree
    import json
    import sys

    s = PeakMemSampler(root_pid=int(sys.argv[1]) if len(sys.argv) > 1 else os.getpid())
    s.sample()
    print(json.dumps(s.result()))

