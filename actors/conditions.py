"""A site's conditions, acted out by the site itself: its speed (a duty cycle on its compute),
its link (simulated transfers) and its availability (it leaves when its on period ends).

One :class:`SiteConditionsClock` per edge actor (:mod:`actors.edge`), reset at each call. Its
waits sleep in short slices, so a site that leaves or a call the driver cancelled stops within
``POLL_S``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from actors.contract import SiteConditions
from metalearn.availability import OnOffSchedule, Schedule, TraceSchedule

T = TypeVar("T")
POLL_S = 0.02


def availability_schedule(seed: int, site: str, conditions: SiteConditions
                          ) -> Schedule | None:
    """The site's on periods as both ends derive them (the site here, the driver from the same
    ``SiteConditions``): None when always on."""
    if conditions.traced:
        return TraceSchedule(conditions.on_periods, conditions.repeat_s)
    if conditions.comes_and_goes:
        return OnOffSchedule(seed, site, conditions.mean_on_s, conditions.mean_off_s)
    return None


class SiteLeft(RuntimeError):
    """The site's on period ended (its availability schedule) before its round did: it left
    mid-round, and the cloud treats it as a failed site for that round."""


class SiteConditionsClock:
    """Idling, transfers and leaving of one site, and what they cost in the current call.

    ``cancelled``: tells when the driver gave up on the call (the wait then raises ``stop``).
    """

    def __init__(self, site: str, seed: int, conditions: SiteConditions,
                 cancelled: Callable[[], bool], stop: Callable[[], BaseException]) -> None:
        self.site = site
        self.conditions = conditions
        self.schedule = availability_schedule(seed, site, conditions)
        self._cancelled, self._stop = cancelled, stop
        self._call_clock: tuple[float, float] | None = None  # (run clock, perf_counter) at call
        self._leaves_at: float | None = None
        self.idle_s = self.network_s = self._paced_s = self._owed = 0.0

    def begin_call(self, run_clock_s: float | None, t0: float) -> None:
        """Start a call's bookkeeping (``t0``: its ``perf_counter`` start); a site that is away
        at the call's start leaves at once."""
        self.idle_s = self.network_s = self._paced_s = self._owed = 0.0
        self._call_clock = None if run_clock_s is None else (float(run_clock_s), t0)
        self._leaves_at = None
        if self.schedule is not None and self._call_clock is not None:
            self._leaves_at = self.schedule.on_until(self._call_clock[0])
            self.still_here()

    def now(self) -> float | None:
        """The run's clock now, as this site reckons it (None when the call brought none)."""
        if self._call_clock is None:
            return None
        at, t0 = self._call_clock
        return at + (time.perf_counter() - t0)

    def still_here(self) -> None:
        """Raise :class:`SiteLeft` once the run's clock is past the site's on period."""
        now = self.now()
        if self._leaves_at is not None and now is not None and now >= self._leaves_at:
            raise SiteLeft(f"{self.site} left at {self._leaves_at:.2f} s of the run (its "
                           f"availability schedule); now {now:.2f} s")

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` in short slices, leaving (or stopping when cancelled) meanwhile."""
        end = time.perf_counter() + seconds
        while (left := end - time.perf_counter()) > 0:
            self.still_here()
            if self._cancelled():
                raise self._stop()
            time.sleep(min(POLL_S, left))
        self.still_here()

    def pace(self, work_s: float) -> None:
        """The duty cycle, after a piece of compute: a site of speed ``v`` idles
        ``work_s (1/v - 1)``, so it takes ``1/v`` times as long as its node would at any work
        (called inside the local-work clock, so a time budget sees it)."""
        self._paced_s += work_s
        idle = work_s * (1.0 / self.conditions.speed - 1.0)
        self.idle_s += idle
        self._owed += idle
        if self._owed >= POLL_S:
            self._settle()
        else:
            self.still_here()

    def _settle(self) -> None:
        """Idle what is owed, and carry over what the sleep overshot (or fell short): many
        short sleeps would otherwise each overshoot, and a slow site end up slower than its
        speed says."""
        t0 = time.perf_counter()
        self.wait(self._owed)
        self._owed -= time.perf_counter() - t0

    def paced(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` under the duty cycle: its local meta-steps pace themselves (through
        :meth:`pace`), and the rest of its compute (unpacking, packing, clipping) is paced when
        it returns, so the whole of it takes ``1/speed`` times as long."""
        self._paced_s = 0.0
        idle_before = self.idle_s
        t0 = time.perf_counter()
        out = fn(*args)
        spent = time.perf_counter() - t0 - (self.idle_s - idle_before)
        self.pace(max(0.0, spent - self._paced_s))
        if self._owed > 0:
            self._settle()
        return out

    def transfer(self, nbytes: int) -> None:
        """A simulated transfer over the site's link: ``nbytes / bandwidth`` seconds."""
        bandwidth = self.conditions.bandwidth_bytes_s
        if bandwidth is not None and nbytes > 0:
            self.network_s += nbytes / bandwidth
            self.wait(nbytes / bandwidth)
