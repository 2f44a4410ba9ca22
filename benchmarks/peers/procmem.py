"""Peak memory of a group of processes, sampled in a background thread.

Used by both benchmark sides (the project venv has no psutil, Flower's venv does), so it reads
``/proc`` through :mod:`cluster.procs`, which imports nothing outside the standard library: run
from the repository root (``python -m benchmarks.peers...``), Flower's interpreter finds it
there. Linux only.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.procs import Proc, descendants, process_table, pss_bytes, rss_bytes

RAY_PATTERNS: tuple[str, ...] = (
    "raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private", "default_worker.py",
    "log_monitor.py", "monitor.py", "dashboard_agent", "runtime_env", "plasma_store",
)


def matching(table: Mapping[int, Proc], patterns: Iterable[str],
             must_contain: str | None = None) -> set[int]:
    """Pids whose command line contains any pattern (and ``must_contain``, if given); never
    this process."""
    pats = tuple(patterns)
    me = os.getpid()
    return {p.pid for p in table.values()
            if p.pid != me and p.cmdline and any(x in p.cmdline for x in pats)
            and (must_contain is None or must_contain in p.cmdline)}


def process_label(proc: Proc | None, pid: int) -> str:
    """A short name for a process: Ray's title (``ray::EdgeNode``, ``raylet``) or argv[0:2]
    (argv[0:3] for ``python -m MODULE``)."""
    words = proc.cmdline.split() if proc else []
    if not words:
        return f"pid {pid}"
    if words[0].startswith("ray::"):
        return words[0]
    shown = 3 if words[1:2] == ["-m"] else 2
    return " ".join(Path(w).name if "/" in w else w for w in words[:shown])[:60]


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

    def pids(self, table: Mapping[int, Proc] | None = None) -> set[int]:
        """The group right now (in ``table``, a fresh process table by default)."""
        table = process_table() if table is None else table
        group: set[int] = set()
        if self.root_pid is not None:
            group |= descendants(table, [self.root_pid])
        if self.patterns:
            group |= matching(table, self.patterns, self.must_contain)
        if self.extra is not None:
            group |= set(self.extra())
        return group

    def sample(self) -> None:
        """Take one sample and update the peaks."""
        table = process_table()
        group = self.pids(table)
        rss = {p: rss_bytes(p) for p in group}
        if sum(rss.values()) > self.peak_rss:
            self.peak_rss = sum(rss.values())
            self.peak_breakdown = sorted(
                ((process_label(table.get(p), p), round(b / 2**20, 1)) for p, b in rss.items()),
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


if __name__ == "__main__":  # quick look: python -m benchmarks.peers.procmem PID -> one sample
    import json
    import sys

    s = PeakMemSampler(root_pid=int(sys.argv[1]) if len(sys.argv) > 1 else os.getpid())
    s.sample()
    print(json.dumps(s.result()))

