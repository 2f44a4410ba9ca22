"""The time-to-accuracy benchmark's cells are valid runs of the setting the issue names (8 sites,
a 4x speed spread, 20 % unavailability), and its table reads times off the clock curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.time_to_accuracy import MODES, cell_config, main, site_speeds, table, time_to
from experiments.config import parse_config
from metalearn.availability import OnOffSchedule


def args(tmp_path: Path) -> object:
    import argparse

    return argparse.Namespace(sites=8, spread=4.0, unavailability=0.2, mean_on_s=120.0,
                              tasks_per_site=4, budget_s=3600.0, deadline_frac=0.5,
                              budget_frac=1.0, max_local_steps=8, local_lr=0.1, buffer_size=4,
                              final_episodes=600, seed=0, out=tmp_path / "t.jsonl")


def test_every_mode_is_a_valid_config_of_8_sites_4x_apart_away_a_fifth_of_the_time(
        tmp_path: Path) -> None:
    speeds = site_speeds(8, 4.0)
    assert speeds[0] == 1.0 and speeds[-1] == 0.25 and speeds == sorted(speeds, reverse=True)
    for mode in MODES:
        cfg = parse_config(cell_config(mode, args(tmp_path), round_s=6.0))
        fed = cfg.federated
        sites = fed.resolved_topology().sites
        assert [s.speed for s in sites] == speeds and cfg.train.time_budget_s == 3600.0
        on = sites[3].availability
        away = 1 - OnOffSchedule(0, "site-3", on.mean_on_s, on.mean_off_s).on_fraction(5e5)
        assert away == pytest.approx(0.2, abs=0.02)
    assert parse_config(cell_config("deadline", args(tmp_path), 6.0)).federated.deadline_s == 3.0
    budget = parse_config(cell_config("budget_fednova", args(tmp_path), 6.0)).federated
    assert budget.local_time_budget_s == 6.0 and budget.aggregator.name == "fednova"
    assert parse_config(cell_config("fedbuff", args(tmp_path), None)).federated.mode == "async"


def test_the_table_reads_time_to_target_off_the_curve(tmp_path: Path) -> None:
    curve = [[60.0, 5, 0.41, 0.02], [120.0, 11, 0.55, 0.02], [180.0, 16, 0.62, 0.02]]
    assert time_to(curve, 0.5) == 120.0 and time_to(curve, 0.7) is None
    rows = tmp_path / "t.jsonl"
    common = {"budget_s": 180.0, "median_round_s": 1.0, "updates_per_round": 7.0,
              "settings": {}, "ci95": 0.02}
    rows.write_text("\n".join(json.dumps({**common, **r}) for r in [
        {"mode": "wait_for_all", "rounds": 16, "accuracy": 0.62, "curve": curve},
        {"mode": "fedbuff", "rounds": 40, "accuracy": 0.66,
         "curve": [[60.0, 12, 0.52, 0.02], [120.0, 25, 0.6, 0.02], [180.0, 40, 0.66, 0.02]]},
    ]) + "\n")
    text = table(rows, [0.5, 0.7])
    assert "| fedbuff | – | 40 | 1.00 | 7.00 | 60 (2.00×) | not reached | 66.0 ± 2.0 |" \
        in text, text
    with pytest.raises(SystemExit, match="unknown mode 'sync'"):
        main(["--modes", "sync", "--out", str(rows)])
