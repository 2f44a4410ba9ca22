"""When a site that comes and goes is on: the seeded on/off schedule and the trace file
(metalearn.availability, cluster.traces, the topology's ``availability``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cluster.topology import Topology, TopologyError, parse_topology
from cluster.traces import read_trace, trace_periods
from metalearn.availability import OnOffSchedule, TraceSchedule


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


# --------------------------------------------------------------------------- traces

def test_a_trace_schedule_replays_its_periods_merges_touching_ones_and_repeats() -> None:
    once = TraceSchedule([(2.0, 5.0), (5.0, 6.0), (8.0, 9.0)])
    assert not once.is_on(0.0) and not once.is_on(1.99)  # a trace need not start on
    assert once.is_on(2.0) and once.on_until(3.0) == 6.0  # [2, 5) and [5, 6): one period
    assert not once.is_on(6.0) and once.on_until(7.0) == 7.0
    assert once.is_on(8.5) and not once.is_on(9.0) and not once.is_on(1e6)  # away after it
    assert once.periods(100.0) == [(2.0, 6.0), (8.0, 9.0)]
    looped = TraceSchedule([(0.0, 3.0), (7.0, 10.0)], repeat_s=10.0)
    assert looped.is_on(21.0) and not looped.is_on(15.0) and not looped.is_on(25.0)
    assert looped.on_until(8.0) == 13.0  # [7, 10) runs on into the next cycle's [10, 13)
    assert looped.on_fraction(1_000.0) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="starts before the previous one ends"):
        TraceSchedule([(0.0, 3.0), (2.0, 4.0)])
    with pytest.raises(ValueError, match="repeat_s 3 must be > 0 and at least"):
        TraceSchedule([(0.0, 4.0)], repeat_s=3.0)


def test_trace_files_in_csv_and_jsonl_read_alike(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("site,start_s,end_s,note\nb,4,6,x\na,0,1.5,\nb,0,2,\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"site": "a", "start_s": 0, "end_s": 1.5}\n'
                     '{"site": "b", "start_s": 4, "end_s": 6}\n'
                     '{"site": "b", "start_s": 0, "end_s": 2}\n')
    want = {"a": ((0.0, 1.5),), "b": ((0.0, 2.0), (4.0, 6.0))}
    assert read_trace(csv) == want and read_trace(jsonl) == want
    assert trace_periods(csv, "b") == want["b"]
    with pytest.raises(ValueError, match=r"t.csv has no period of 'c' \(it has a, b\)"):
        trace_periods(csv, "c")


@pytest.mark.parametrize(("name", "text", "message"), [
    ("x.csv", "site,start\na,0\n", r"lacks column\(s\) \['start_s', 'end_s'\]"),
    ("x.csv", "site,start_s,end_s\na,0,1\na,3,2\n", r"line 3: needs 0 <= start_s < end_s"),
    ("x.csv", "site,start_s,end_s\na,0,soon\n", r"line 2: start_s .* must be numbers"),
    ("x.csv", "site,start_s,end_s\na,0,5\nb,0,1\na,4,6\n",
     r"on periods of a on lines 2 and 4 overlap"),
    ("x.jsonl", '{"site": "a", "start_s": 0, "end_s": 1}\nnot json\n', r"cannot be read"),
    ("x.csv", "", r"cannot be read"),
    ("x.txt", "site,start_s,end_s\n", r"unknown format '.txt'; use .csv or .jsonl"),
])
def test_a_bad_trace_is_refused_in_one_line_naming_file_and_line(
        tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_trace(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_topology_names_the_setting_of_a_trace_it_cannot_use(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("site,start_s,end_s\nphone-7,0,4\n")

    def topology(availability: dict) -> Topology:
        return parse_topology({"sites": [{"name": "site-0", "availability": availability}]})

    ok = topology({"trace": str(trace), "trace_site": "phone-7", "repeat_s": 5})
    assert ok.sites[0].availability.on_periods("site-0") == ((0.0, 4.0),)
    for availability, message in [
        ({"trace": str(trace)}, r"sites.0: availability.trace: trace .* has no "
                                r"period of 'site-0' \(it has phone-7\)"),
        ({"trace": str(tmp_path / "gone.csv")}, r"availability.trace: trace .* does not exist"),
        ({"trace": str(trace), "trace_site": "phone-7", "repeat_s": 3},
         r"availability.repeat_s 3 is shorter than the trace"),
        ({"trace": str(trace), "mean_on_s": 1}, r"either mean_on_s/mean_off_s or trace"),
        ({"mean_on_s": 1}, r"needs mean_on_s and mean_off_s .* or trace"),
        ({"mean_on_s": 1, "mean_off_s": 1, "repeat_s": 2}, r"belong to a trace"),
    ]:
        with pytest.raises(TopologyError, match=message):
            topology(availability)
