"""The real `edgemeta train` / `evaluate` entry points on tiny budgets (CleanRL-style smoke)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from experiments.cli import main
from experiments.stopping import StopRequests
from metalearn.checkpoint import latest_step, list_checkpoints, load_checkpoint

SINUSOID = {
    "seed": 3,
    "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
    "model": {"name": "sinusoid_mlp"},
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1, "test_steps": 5,
                  "options": {"strategy": "vmap"}},
    "train": {"meta_batch": 5, "steps": 12, "log_every": 4, "checkpoint_every": 4},
    "eval": {"episodes": 20, "steps_list": [0, 1, 5]},
}


def _write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": name, "output_dir": str(tmp_path / "runs")}))
    return path


def test_train_writes_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(_write(tmp_path, "sin", SINUSOID))]) == 0
    run = tmp_path / "runs" / "sin"
    out = capsys.readouterr().out
    assert "step 12/12" in out and "mse" in out
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["algorithm"]["test_steps"] == 5 and resolved["train"]["outer_lr"] == 1e-3
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert list(metrics["step"]) == list(range(1, 13))
    assert {"time_s", "tasks", "loss_before", "loss_after"} <= set(metrics.columns)
    assert list_checkpoints(run) == [4, 8, 12] and latest_step(run) == 12
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["mse"]) == {"0", "1", "5"} and summary["episodes"] == 20
    assert summary["train_steps"] == 12 and summary["train_tasks"] == 60
    assert all(v > 0 for v in summary["mse"].values())

    assert main(["evaluate", str(run), "--step", "8", "--episodes", "10"]) == 0
    assert "@ step 8" in capsys.readouterr().out
    # the evaluation can differ from training's without retraining; the run folder is untouched
    assert main(["evaluate", str(run), "--episodes", "10", "--set", "eval.steps_list=[0,2]"]) == 0
    headline = capsys.readouterr().out
    assert "2 steps:" in headline and "5 steps:" not in headline
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["steps_list"] == [0, 1, 5]
    assert main(["evaluate", str(run), "--set", "eval.stpes=3"]) == 2
    assert "eval.stpes: unknown key" in capsys.readouterr().err


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = _write(tmp_path, "straight", SINUSOID)
    assert main(["train", str(straight)]) == 0
    halves = _write(tmp_path, "halves", SINUSOID)
    assert main(["train", str(halves), "--set", "train.steps=8"]) == 0
    assert main(["train", str(halves)]) == 0  # resumes from step 8
    a = load_checkpoint(tmp_path / "runs" / "straight")["params"]
    b = load_checkpoint(tmp_path / "runs" / "halves")["params"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = pd.read_parquet(tmp_path / "runs" / "halves" / "metrics.parquet")
    assert list(metrics["step"]) == list(range(1, 13))


def test_omniglot_smoke_reports_accuracy(tmp_path: Path) -> None:
    raw = {"data": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2},
           "model": {"name": "omniglot_conv", "channels": 4},
           "algorithm": {"name": "fomaml", "inner_lr": 0.4, "inner_steps": 1},
           "train": {"meta_batch": 2, "steps": 2, "checkpoint_every": 1, "eval_every": 2,
                     "eval_episodes": 4},
           "eval": {"episodes": 8, "batch": 4}}
    assert main(["train", str(_write(tmp_path, "omni", raw))]) == 0
    summary = json.loads((tmp_path / "runs" / "omni" / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["episodes"] == 8
    assert summary["ci95"] >= 0
    metrics = pd.read_parquet(tmp_path / "runs" / "omni" / "metrics.parquet")
    assert metrics["test_accuracy"].notna().sum() == 1


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "bundled configs" in capsys.readouterr().err
    bad = _write(tmp_path, "bad", {**SINUSOID, "train": {"stpes": 3}})
    assert main(["train", str(bad)]) == 2
    assert "train.stpes: unknown key" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2


def test_sigterm_stops_after_a_step_and_the_run_resumes_to_the_same_result(
        tmp_path: Path) -> None:
    """A stopped run loses nothing: SIGTERM mid-run checkpoints the last finished step (exit
    143), and the same command then ends exactly where an uninterrupted run ends."""
    long = {**SINUSOID, "train": {**SINUSOID["train"], "steps": 10**6, "log_every": 20,
                                  "checkpoint_every": 10**6}}
    config = _write(tmp_path, "stopped", long)
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until it is training
        if line.startswith("step 40/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "stopped by SIGTERM after step" in rest and "meta-testing" not in rest
    run = tmp_path / "runs" / "stopped"
    stopped_at = latest_step(run)
    assert stopped_at >= 40 and list_checkpoints(run) == [stopped_at]
    assert not (run / "summary.json").exists()
    assert list(pd.read_parquet(run / "metrics.parquet")["step"]) == list(range(1, stopped_at + 1))

    end = stopped_at + 7
    assert main(["train", str(config), "--set", f"train.steps={end}"]) == 0
    straight = _write(tmp_path, "straight", {**SINUSOID, "train": {**SINUSOID["train"],
                                                                   "steps": end}})
    assert main(["train", str(straight)]) == 0
    a = load_checkpoint(run)["params"]
    b = load_checkpoint(tmp_path / "runs" / "straight")["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_resumes_from_its_last_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    """SIGKILL (no handler runs, no last checkpoint): the run loses only the steps after its
    last checkpoint, which is whole, and the same command ends exactly where an uninterrupted
    run ends, with one metrics row per step."""
    train = {**SINUSOID["train"], "steps": 10**6, "log_every": 1, "checkpoint_every": 5}
    config = _write(tmp_path, "killed", {**SINUSOID, "train": train})
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until it is past a few checkpoints
        if line.startswith("step 17/"):
            break
    proc.kill()
    proc.communicate(timeout=60)
    run = tmp_path / "runs" / "killed"
    killed_at = latest_step(run)
    assert killed_at >= 15 and killed_at % 5 == 0
    assert load_checkpoint(run)["step"] == killed_at  # readable: never half-written

    end = killed_at + 6  # across one more checkpoint
    assert main(["train", str(config), "--set", f"train.steps={end}"]) == 0
    straight = _write(tmp_path, "straight", {**SINUSOID, "train": {**train, "steps": end}})
    assert main(["train", str(straight)]) == 0
    a = load_checkpoint(run)["params"]
    b = load_checkpoint(tmp_path / "runs" / "straight")["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = pd.read_parquet(run / "metrics.parquet")
    rows_b = pd.read_parquet(tmp_path / "runs" / "straight" / "metrics.parquet")
    assert list(rows_a["step"]) == list(range(1, end + 1))
    assert rows_a["loss_after"].tolist() == rows_b["loss_after"].tolist()


def test_stop_requests_flag_the_first_signal_and_restore_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[int] = []
    # A known SIGINT handler (other tests' Ray or uvicorn may have installed their own).
    outer = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with StopRequests() as stop:
            assert not stop.requested
            signal.raise_signal(signal.SIGTERM)  # would end the test process without the guard
            assert stop.signal is signal.SIGTERM and seen == []
            signal.raise_signal(signal.SIGINT)  # a second signal goes where it went before
            assert seen == [signal.SIGINT] and stop.signal is signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGINT, outer)
