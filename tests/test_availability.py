"""The seeded on/off schedule of a site that comes and goes (metalearn.availability)."""

from __future__ import annotations

import itertools

import pytest

from metalearn.availability import OnOffSchedule


def test_the_schedule_is_seeded_alternating_and_has_the_configured_means() -> None:
    a = OnOffSchedule(3, "site-1", mean_on_s=2.0, mean_off_s=6.0)
    b = OnOffSchedule(3, "site-1", mean_on_s=2.0, mean_off_s=6.0)
    assert b.is_on(5_000.0) == a.is_on(5_000.0)  # asked in another order: the same periods
    assert a.periods(5_000.0) == b.periods(5_000.0)
    assert a.periods(5_000.0) != OnOffSchedule(3, "site-2", 2.0, 6.0).periods(5_000.0)
    assert a.is_on(0.0)  # every site starts on
    periods = a.periods(20_000.0)
    ons = [end - start for start, end in periods]
    offs = [nxt[0] - cur[1] for cur, nxt in itertools.pairwise(periods)]
    assert sum(ons) / len(ons) == pytest.approx(2.0, rel=0.1)
    assert sum(offs) / len(offs) == pytest.approx(6.0, rel=0.1)
    start, end = periods[3]
    assert a.is_on(start) and a.on_until(start) == end and a.on_until((start + end) / 2) == end
    assert not a.is_on(end) and a.on_until(end) == end  # off: it ends where it is
    with pytest.raises(ValueError, match="must be > 0"):
        OnOffSchedule(0, "s", 0.0, 1.0)
