"""Experiment tracking: a real run's rows in a real MLflow store and real TensorBoard event
files, read back through their own readers (MLflow's client, TensorBoard's EventAccumulator)
and compared with the run's parquet table."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.cli import main
from experiments.config import ConfigError, parse_config
from experiments.tracking import Tracking, metric_points
from experiments.train import train
from metalearn.storage import location

RAW = {
    "name": "tracked", "seed": 3,
    "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
    "model": {"name": "sinusoid_mlp", "hidden": 20},
    "algorithm": {"name": "maml", "inner_lr": 0.01, "options": {"strategy": "vmap"}},
    "train": {"meta_batch": 4, "steps": 6, "log_every": 6, "checkpoint_every": 2},
    "eval": {"episodes": 10, "steps_list": [0, 1], "batch": 10},
    "tracking": {"mlflow": {}, "tensorboard": True},
}


def test_a_stopped_and_resumed_run_tracks_its_table_in_mlflow_and_tensorboard(
        tmp_path: Path) -> None:
    """Stopped by SIGTERM after step 3, then the same command to the end: MLflow holds one
    run with the config as params and every metric point of the table once; TensorBoard's
    event files the same points (as float32)."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = {**RAW, "output_dir": str(tmp_path / "runs")}
    config_file = tmp_path / "tracked.yaml"
    config_file.write_text(yaml.safe_dump(raw))

    def stop_at_3(row: dict) -> None:
        if row["step"] == 3:
            signal.raise_signal(signal.SIGTERM)  # the loop's handler: stop after this step

    assert train(parse_config(raw), echo=lambda _: None, on_row=stop_at_3)["stopped_by"] == (
        "SIGTERM")
    assert main(["train", str(config_file)]) == 0

    run = tmp_path / "runs" / "tracked"
    table = pd.read_parquet(run / "metrics.parquet")
    assert table["step"].tolist() == [1, 2, 3, 4, 5, 6]
    columns = [c for c in table.columns if c != "step"]
    assert {"loss_before", "loss_after", "time_s", "tasks"} <= set(columns)

    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("edgemeta")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_name == "tracked"
    mlflow_run = runs[0].info.run_id
    assert json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == mlflow_run
    params = runs[0].data.params
    assert params["train.steps"] == "6" and params["algorithm.name"] == "maml"
    assert params["eval.steps_list"] == "[0, 1]" and params["tracking.tensorboard"] == "true"

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(columns) <= set(events.Tags()["scalars"])
    assert "config/text_summary" in events.Tags()["tensors"]
    for column in columns:
        expected = [(int(s), float(v)) for s, v in zip(table["step"], table[column], strict=True)
                    if not np.isnan(v)]
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run,
                                                                               column))
        assert history == expected, column
        scalars = [(e.step, np.float32(e.value)) for e in events.Scalars(column)]
        assert scalars == [(s, np.float32(v)) for s, v in expected], column

    summary = json.loads((run / "summary.json").read_text())
    final = runs[0].data.metrics
    assert final["summary/mse/1"] == summary["mse"]["1"]
    assert final["summary/train_steps"] == 6


def test_site_rows_are_series_and_only_new_committed_rows_are_points() -> None:
    rows = [{"round": 1, "site": "site-0", "status": "ok", "loss_after": 1.5, "late": False},
            {"round": 1, "site": "site-1", "status": "failed", "loss_after": float("nan")},
            {"round": 2, "site": "site-0", "status": "ok", "loss_after": 0.5, "late": True}]
    assert metric_points(rows, "round", "site", after=0, upto=1) == [
        ("site/site-0/loss_after", 1.5, 1), ("site/site-0/late", 0.0, 1)]
    assert metric_points(rows, "round", "site", after=1, upto=2) == [
        ("site/site-0/loss_after", 0.5, 2), ("site/site-0/late", 1.0, 2)]


@pytest.mark.parametrize(("tracking", "module", "message"), [
    ({"mlflow": {}}, "mlflow", "tracking.mlflow is set but MLflow is not installed"),
    ({"tensorboard": True}, "torch.utils.tensorboard",
     "tracking.tensorboard is true but TensorBoard is not installed"),
])
def test_tracking_without_its_package_is_a_one_line_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        tracking: dict, module: str, message: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import` meets without the package
    with pytest.raises(ConfigError, match=message):
        Tracking.start({"tracking": tracking}, location(tmp_path / "run"))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**RAW, "tracking": tracking,
                                           "output_dir": str(tmp_path / "runs")}))
    assert main(["train", str(config_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "edgemeta[tracking]" in err[0]
    assert not (tmp_path / "runs" / "tracked" / "metrics.parquet").exists()


def test_tracking_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"tracking\.mlfow: unknown key"):
        parse_config({**RAW, "tracking": {"mlfow": {}}})
    assert parse_config({k: v for k, v in RAW.items() if k != "tracking"}).tracking.enabled is (
        False)
