"""`edgemeta tune`: a Ray Tune search over config keys with ASHA, its results table, a best
config that `edgemeta train` reads, and Tune's restore of the same experiment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from experiments.config import ConfigError, load_config
from experiments.search import BEST_FILE, RESULTS_FILE, load_space, tune_config_file

BASE = {
    "name": "sin", "seed": 0,
    "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
    "model": {"name": "sinusoid_mlp", "hidden": 16},
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1, "test_steps": 1},
    "train": {"steps": 4, "meta_batch": 4, "checkpoint_every": 2, "log_every": 2},
    "eval": {"episodes": 5, "batch": 5, "steps_list": [0, 1]},
}
SPACE = {"metric": "loss_after", "mode": "min", "samples": 3,
         "asha": {"grace_period": 2, "reduction_factor": 2},
         "space": {"train.outer_lr": {"loguniform": [1.0e-4, 1.0e-2]},
                   "model.hidden": {"choice": [8, 16]}}}


def _files(tmp_path: Path, space: dict) -> tuple[Path, Path]:
    config, space_file = tmp_path / "sin.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "runs")}))
    space_file.write_text(yaml.safe_dump(space))
    return config, space_file


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    from cluster.connect import connect, shutdown

    connect(None, None, num_cpus=2)
    try:
        yield
    finally:
        shutdown()


@pytest.mark.slow
def test_three_tiny_trials_give_a_table_and_a_best_config_train_accepts(
        tmp_path: Path, ray_session: None) -> None:
    config, space = _files(tmp_path, SPACE)
    lines: list[str] = []
    found = tune_config_file(config, space, echo=lines.append)
    exp = tmp_path / "runs" / "sin-tune"
    table = pd.read_parquet(exp / RESULTS_FILE)
    assert len(table) == 3 and found["trials"] == 3 and found["errors"] == 0
    assert table["train.outer_lr"].between(1e-4, 1e-2).all()
    assert set(table["model.hidden"]) <= {8, 16}
    finished = table[table["finished"]]
    assert len(finished) >= 1  # ASHA lets the best of a rung run to the end
    # every finished trial ran all 4 steps and its meta-test (2 adaptation-step settings)
    assert (finished["training_iteration"] == BASE["train"]["steps"] + 1).all()
    assert finished["meta_test_mse.1"].gt(0).all()
    best_row = finished.loc[finished["loss_after"].idxmin()]
    assert found["best"] == {"train.outer_lr": pytest.approx(best_row["train.outer_lr"]),
                             "model.hidden": best_row["model.hidden"]}
    best = load_config(exp / BEST_FILE)  # what `edgemeta train best.yaml` reads
    assert best.name == "sin-best"
    assert best.train.outer_lr == pytest.approx(best_row["train.outer_lr"])
    assert best.model.hidden == best_row["model.hidden"]
    assert best.train.steps == BASE["train"]["steps"]  # the rest is the base config
    assert lines[-1].startswith(f"best config: {exp / BEST_FILE}")
    for trial in table["trial_id"]:  # each trial is a real run folder
        assert (exp / trial / "run" / "config.yaml").is_file()
    for trial in finished["trial_id"]:  # ... and one that ran to its end has its report
        assert (exp / trial / "run" / "report.html").is_file()

    # the same command again restores the experiment (Tune's restore): nothing is re-run
    lines.clear()
    again = tune_config_file(config, space, echo=lines.append)
    assert lines[0].startswith("restoring") and again["best"] == found["best"]
    restored = pd.read_parquet(exp / RESULTS_FILE).set_index("trial_id").sort_index()
    assert restored["training_iteration"].to_dict() == (
        table.set_index("trial_id").sort_index()["training_iteration"].to_dict())


def test_search_space_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    bad = {**SPACE, "space": {"train.outer_lr": {"loguniform": [1.0e-2, 1.0e-4]}}}
    _, space = _files(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"space\.train\.outer_lr\.loguniform: expected "
                                          r"\[low, high\] with low < high"):
        load_space(space)
    config, space = _files(tmp_path, {**SPACE, "space": {"train.outer_rl": {"choice": [1]}}})
    with pytest.raises(ConfigError) as err:
        tune_config_file(config, space)
    assert str(err.value) == "search space key train.outer_rl = 1: train.outer_rl: unknown key"
