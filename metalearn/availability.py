"""When a site is reachable: a seeded on/off schedule on the run's clock.

A real edge site comes and goes (a phone on a charger, a vehicle in range, a gateway on a
maintenance window). :class:`OnOffSchedule` models it as an alternating renewal process: on
periods and off periods drawn from exponential distributions with the configured means, the
site on at time 0 (so every site can start its actor and warm up), seeded by the run seed and
the site's name, so the cloud (which calls only available sites) and the site (which leaves
when its on period ends, even mid-round) derive the same schedule without talking, and a rerun
or a resumed run sees it again.

Times are seconds of the run's clock: the driver's counted training time (what a checkpoint
stores as ``elapsed_s``), so a stopped and resumed run continues the schedule where it was,
and the pause between does not count.
"""

from __future__ import annotations

import bisect

import numpy as np

from metalearn.sites import site_seed

_AVAILABILITY = 5  # a stream of site_seed of its own


class OnOffSchedule:
    """Alternating on/off periods of a site, drawn lazily as far as asked."""

    def __init__(self, seed: int, site: str, mean_on_s: float, mean_off_s: float) -> None:
        if mean_on_s <= 0 or mean_off_s <= 0:
            raise ValueError(f"mean on and off periods must be > 0, got {mean_on_s}, "
                             f"{mean_off_s}")
        self.mean_on_s, self.mean_off_s = float(mean_on_s), float(mean_off_s)
        self._rng = np.random.default_rng(site_seed(seed, site, _AVAILABILITY))
        self._edges = [0.0]  # times the state flips; on in [e0, e1), off in [e1, e2), ...

    def _cover(self, t: float) -> None:
        while self._edges[-1] <= t:
            on = len(self._edges) % 2 == 1  # the period that starts at the last edge
            mean = self.mean_on_s if on else self.mean_off_s
            self._edges.append(self._edges[-1] + float(self._rng.exponential(mean)))

    def _period(self, t: float) -> int:
        """Index of the period holding ``t`` (even: on)."""
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
