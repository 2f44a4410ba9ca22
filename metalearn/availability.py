"""When a site is reachable: its on periods on the run's clock, drawn from a seeded
distribution (:class:`OnOffSchedule`) or read from a trace file (:class:`TraceSchedule`;
the file's format: :func:`cluster.traces.read_trace`).

A real edge site comes and goes (a phone on a charger, a vehicle in range, a gateway on a
maintenance window). :class:`OnOffSchedule` models it as an alternating renewal process: on
periods and off periods drawn from exponential distributions with the configured means, the
site on at time 0 (so every site can start its actor and warm up), seeded by the run seed and
the site's name, so the cloud (which calls only available sites) and the site (which leaves
when its on period ends, even mid-round) derive the same schedule without talking, and a rerun
or a resumed run sees it again. :class:`TraceSchedule` replays recorded on periods instead
(what the topology's trace file says), optionally repeating them.

Times are seconds of the run's clock: the driver's counted training time (what a checkpoint
stores as ``elapsed_s``), so a stopped and resumed run continues the schedule where it was,
and the pause between does not count.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np

from metalearn.sites import site_seed

_AVAILABILITY = 5  # a stream of site_seed of its own


class Schedule:
    """On periods as a sorted list of edges ``[s0, e0, s1, e1, ...]`` (on in ``[s, e)``),
    extended lazily from :meth:`_more` as far as asked."""

    def __init__(self) -> None:
        self._edges: list[float] = []
        self._source: Iterator[tuple[float, float]] = self._more()
        self._peeked: tuple[float, float] | None = None

    def _more(self) -> Iterator[tuple[float, float]]:
        raise NotImplementedError

    def _peek(self) -> tuple[float, float] | None:
        if self._peeked is None:
            self._peeked = next(self._source, None)
        return self._peeked

    def _cover(self, t: float) -> None:
        """Extend the edges past ``t`` (or to the schedule's end), and the last period by any
        that touch it (so ``on_until`` sees where an on stretch really ends)."""
        while (nxt := self._peek()) is not None and (
                not self._edges or self._edges[-1] <= t or nxt[0] <= self._edges[-1]):
            self._peeked = None
            if self._edges and nxt[0] <= self._edges[-1]:
                self._edges[-1] = nxt[1]
            else:
                self._edges.extend(nxt)

    def _period(self, t: float) -> int:
        """Index of the edge at or before ``t`` (even: on; odd or -1: off)."""
        if t < 0:
            raise ValueError(f"the run clock starts at 0, got {t}")
        self._cover(t)
        return bisect.bisect_right(self._edges, t) - 1

    def is_on(self, t: float) -> bool:
        return self._period(t) % 2 == 0

    def on_until(self, t: float) -> float:
        """When the on period holding ``t`` ends (``t`` itself when the site is off)."""
        i = self._period(t)
        return self._edges[i + 1] if i % 2 == 0 else t

    def periods(self, until: float) -> list[tuple[float, float]]:
        """The on periods ``[start, end)`` that begin before ``until`` (for reports)."""
        self._cover(until)
        return [(self._edges[i], self._edges[i + 1]) for i in range(0, len(self._edges) - 1, 2)
                if self._edges[i] < until]

    def on_fraction(self, until: float) -> float:
        """The share of ``[0, until)`` the site is on."""
        return sum(min(e, until) - s for s, e in self.periods(until)) / until


class OnOffSchedule(Schedule):
    """Alternating on/off periods of a site, exponential with the given means, on at 0."""

    def __init__(self, seed: int, site: str, mean_on_s: float, mean_off_s: float) -> None:
        if mean_on_s <= 0 or mean_off_s <= 0:
            raise ValueError(f"mean on and off periods must be > 0, got {mean_on_s}, "
                             f"{mean_off_s}")
        self.mean_on_s, self.mean_off_s = float(mean_on_s), float(mean_off_s)
        self._rng = np.random.default_rng(site_seed(seed, site, _AVAILABILITY))
        super().__init__()

    def _more(self) -> Iterator[tuple[float, float]]:
        start = 0.0
        while True:
            end = start + float(self._rng.exponential(self.mean_on_s))
            yield start, end
            start = end + float(self._rng.exponential(self.mean_off_s))


class TraceSchedule(Schedule):
    """Recorded on periods of a site (off between them); with ``repeat_s`` the trace starts
    over every ``repeat_s`` seconds, else the site stays away after its last period."""

    def __init__(self, on_periods: Sequence[tuple[float, float]],
                 repeat_s: float | None = None) -> None:
        self.on_periods = tuple((float(s), float(e)) for s, e in on_periods)
        check_periods(self.on_periods, repeat_s)
        self.repeat_s = None if repeat_s is None else float(repeat_s)
        super().__init__()

    def _more(self) -> Iterator[tuple[float, float]]:
        shift = 0.0
        while True:
            for start, end in self.on_periods:
                yield start + shift, end + shift
            if self.repeat_s is None or not self.on_periods:
                return
            shift += self.repeat_s


def check_periods(periods: Sequence[tuple[float, float]], repeat_s: float | None) -> None:
    """Sorted, non-overlapping ``[start, end)`` periods from 0 on, within ``repeat_s``."""
    last_end = 0.0
    for start, end in periods:
        if not 0 <= start < end:
            raise ValueError(f"on period [{start:g}, {end:g}) needs 0 <= start_s < end_s")
        if start < last_end:
            raise ValueError(f"on period [{start:g}, {end:g}) starts before the previous one "
                             f"ends ({last_end:g}): periods must be sorted and not overlap")
        last_end = end
    if repeat_s is not None and (repeat_s <= 0 or repeat_s < last_end):
        raise ValueError(f"repeat_s {repeat_s:g} must be > 0 and at least the last period's "
                         f"end ({last_end:g} s)")
