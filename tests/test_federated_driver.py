"""The federated entry point end to end, and the errors bad configs get.

The end-to-end test runs ``python -m experiments.federated`` in a subprocess, which starts and
stops its own embedded Ray cluster, exactly as a user (or ``ray job submit``) would.
"""

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
from experiments.config import CONFIG_DIR, ConfigError, load_config, parse_config
from experiments.federated import train_federated

ROOT = Path(__file__).resolve().parents[1]

ROUND_COLUMNS = {
    "round", "wall_s", "calls_s", "time_s", "compute_s_max", "compute_s_mean", "overhead_s",
    "bytes_down", "bytes_up", "participants", "called", "arrived", "late", "failed", "busy",
    "skipped", "round_tasks", "loss_before", "loss_after", "dispatch_s_max", "reply_s_max",
    "compute_s.site-0", "compute_s.site-1",
}


def sinusoid_raw(tmp_path: Path, **federated: object) -> dict:
    return {
        "name": "fed-cli", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
        "model": {"name": "sinusoid_mlp", "hidden": 20},
        "algorithm": {"name": "maml", "inner_lr": 0.01},
        "train": {"meta_batch": 8, "steps": 3, "checkpoint_every": 2, "log_every": 1},
        "eval": {"episodes": 20, "steps_list": [0, 1, 5], "batch": 10},
        "federated": {"topology": {"sites": 2, "devices": 3}, "devices_per_round": 2,
                      "personalize_episodes": 10, **federated},
    }


@pytest.mark.slow
def test_entry_point_runs_three_rounds_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(sinusoid_raw(tmp_path, site_models_every=2)))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "experiments.federated", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round 3/3 arrived 2/2" in proc.stdout

    run = tmp_path / "runs" / "fed-cli"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert [s["name"] for s in written["federated"]["topology"]["sites"]] == ["site-0", "site-1"]

    metrics = pd.read_parquet(run / "metrics.parquet")
    assert set(metrics.columns) >= ROUND_COLUMNS, ROUND_COLUMNS - set(metrics.columns)
    assert metrics["round"].tolist() == [1, 2, 3]
    assert (metrics["arrived"] == 2).all() and not metrics["skipped"].any()
    assert (metrics["round_tasks"] == 8).all()
    assert (metrics["overhead_s"] >= 0).all()
    assert (metrics["wall_s"] >= metrics["calls_s"]).all()  # the round holds its calls
    assert (metrics["bytes_up"] == metrics["bytes_down"]).all()  # gradients: params' size

    sites = pd.read_parquet(run / "sites.parquet")
    assert len(sites) == 6 and set(sites["status"]) == {"ok"}
    assert (sites["devices"] == 2).all()
    # one host, one clock: a call is delivered before it starts, a reply seen after it ends
    assert (sites["dispatch_s"] >= 0).all() and (sites["reply_s"] >= 0).all()
    assert (metrics["dispatch_s_max"] == sites.groupby("round")["dispatch_s"].max().values).all()

    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003.pt"
    for png in ("learning_curve.png", "round_times.png", "personalization.png"):
        assert (run / png).stat().st_size > 1000, png

    summary = json.loads((run / "summary.json").read_text())
    assert {"mse", "ci95", "name", "algorithm", "train_steps", "train_time_s",
            "train_tasks", "federated"} <= set(summary)
    assert summary["train_steps"] == 3 and summary["train_tasks"] == 24
    fed = summary["federated"]
    assert fed["sites"] == ["site-0", "site-1"] and fed["skipped_rounds"] == 0
    assert {p["site"] for p in fed["personalization"]} == {"site-0", "site-1"}
    assert all("after_mse" in p for p in fed["personalization"])
    # each site's personalized model, made at the site, written where serving finds it
    from serve.store import ModelStore

    store = ModelStore([run], cache_size=0)
    for row in fed["personalization"]:
        assert row["personalize_steps"] == 5 and row["round"] == 3
        assert row["site_after_mse"] > 0 and row["site_before_mse"] > 0
        model = store.get(f"fed-cli@site-{row['site']}")
        meta = store.get("fed-cli@3")
        moved = sum(float((model.params[k] - meta.params[k]).abs().sum()) for k in meta.params)
        assert model.ref.kind == "site" and moved > 0
        saved = torch.load(model.ref.path.path, weights_only=False)
        assert saved["round"] == 3 and saved["scores"]["site_after_mse"] == row["site_after_mse"]
    for made in (2, 3):  # every 2 rounds (federated.site_models_every), and at the end
        assert f"site models (round {made}, 5 step(s) each): site-site-0.pt, site-site-1.pt" \
            in proc.stdout


@pytest.mark.parametrize(
    ("federated", "message"),
    [
        ({"quorum": 3}, "quorum 3 exceeds the 2 sites called per round"),
        ({"aggregator": {"name": "mode"}}, "unknown aggregator 'mode'"),
        ({"aggregator": {"name": "trimmed_mean", "trim": 0.7}}, "trim must be in [0, 0.5)"),
        ({"fail_sites": ["site-9"]}, "fail_sites ['site-9'] are not sites"),
        ({"topology": "no/such/topology.yaml"}, "topology file 'no/such/topology.yaml'"),
        ({"topology": {"sites": 0}}, "sites must be a positive integer"),
        ({"topology": {"sites": [{"name": "Bad Name"}]}}, "federated"),
        ({"devices_per_round": 5}, "devices_per_round 5 exceeds the 3 devices"),
        ({"site_fraction": 0}, "federated.site_fraction"),
        ({"local_stpes": 2}, "federated.local_stpes: unknown key"),
        ({"personalize_steps": 3, "secure_aggregation": {"clip": 1.0}},
         "personalize_steps 3 with federated.secure_aggregation"),
        ({"site_models_every": 2, "mode": "async"}, "site_models_every works with rounds"),
    ],
)
def test_bad_federated_values_name_the_problem(tmp_path: Path, federated: dict,
                                               message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(sinusoid_raw(tmp_path, **federated))
    assert message in str(err.value)


def test_devices_beyond_tasks_and_missing_section_are_clear_errors(tmp_path: Path) -> None:
    cfg = parse_config(sinusoid_raw(tmp_path, devices_per_round=3,
                                    topology={"sites": 4, "devices": 3}))
    with pytest.raises(ConfigError, match="devices_per_round 3 exceeds the 2 tasks per site"):
        train_federated(cfg, echo=lambda _: None)
    raw = sinusoid_raw(tmp_path)
    del raw["federated"]
    with pytest.raises(ConfigError, match="no federated section"):
        train_federated(parse_config(raw), echo=lambda _: None)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sinusoid_raw(tmp_path, quorum=9)))
    assert main(["federated", str(path)]) == 2
    assert "quorum 9 exceeds" in capsys.readouterr().err


def test_bundled_federated_configs_validate() -> None:
    for name in ("federated_omniglot_4sites", "federated_sinusoid", "federated_sinusoid_dp"):
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.federated is not None
        assert len(cfg.federated.resolved_topology().sites) >= 2


@pytest.mark.slow
def test_sigterm_stops_the_driver_after_a_round_with_a_checkpoint(tmp_path: Path) -> None:
    """`ray job stop` or a scheduler sends SIGTERM: the driver finishes the round at hand,
    checkpoints it and exits 143, so the same command resumes there."""
    raw = sinusoid_raw(tmp_path)
    raw["train"] = {**raw["train"], "steps": 10_000, "checkpoint_every": 10_000}
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.federated", str(path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("round 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM after round" in out and "meta-testing" not in out
    run = tmp_path / "runs" / "fed-cli"
    rounds = pd.read_parquet(run / "metrics.parquet")["round"].tolist()
    assert len(rounds) >= 2 and rounds == list(range(1, len(rounds) + 1))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{rounds[-1]:06d}.pt" and not (run / "summary.json").exists()
