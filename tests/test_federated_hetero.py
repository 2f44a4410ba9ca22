"""Heterogeneous sites on a real multi-node Ray cluster on this machine: compressed updates,
time-budgeted local work, sites of different speed, availability and bandwidth, and
asynchronous (buffered) rounds; each one resumed from a checkpoint.

The module starts ``ray.cluster_utils.Cluster`` (see ``tests/helpers.py``): a head with the
``cloud`` resource and one raylet per site.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from helpers import multi_node_cluster

from experiments.config import ConfigError, ExperimentConfig, parse_config
from experiments.federated import train_federated
from metalearn.checkpoint import checkpoint_dir, checkpoint_path, load_checkpoint

SITES = [f"site-{i}" for i in range(3)]
PARAMS = 1 * 20 + 20 + 20 * 20 + 20 + 20 * 1 + 1  # sinusoid_mlp, hidden 20


@pytest.fixture(scope="module")
def cluster():
    with multi_node_cluster(SITES) as (c, nodes):
        yield c, nodes


def raw(tmp_path: Path, name: str, rounds: int = 3, sites: list[dict] | None = None,
        checkpoint_every: int = 100, **federated: Any) -> dict[str, Any]:
    return {
        "name": name, "seed": 5, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
        "model": {"name": "sinusoid_mlp", "hidden": 20},
        "algorithm": {"name": "maml", "inner_lr": 0.01, "options": {"strategy": "vmap"}},
        "train": {"meta_batch": 6, "steps": rounds, "outer_lr": 1e-2, "log_every": 1,
                  "checkpoint_every": checkpoint_every},
        "eval": {"episodes": 10, "steps_list": [0, 1], "batch": 10},
        "federated": {"topology": {"sites": sites or [{"name": s} for s in SITES]},
                      "personalize_episodes": 0, **federated},
    }


def config(tmp_path: Path, name: str, **kw: Any) -> ExperimentConfig:
    return parse_config(raw(tmp_path, name, **kw))


def tables(cfg: ExperimentConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_parquet(cfg.run_dir / "metrics.parquet"),
            pd.read_parquet(cfg.run_dir / "sites.parquet"))


def whole_then_resumed(tmp_path: Path, name: str, rounds: int, resume_from: int,
                       **kw: Any) -> tuple[ExperimentConfig, ExperimentConfig]:
    """Run ``name`` for ``rounds`` rounds with a checkpoint after each; then copy its folder
    as it would be had the run died right after round ``resume_from`` (the ``latest`` pointer
    moved back; later checkpoints and table rows are there, but the resume ignores and
    truncates them) and run the copy's config again: it resumes. Both stop after their last
    round (``stop_after_rounds``), which skips the final meta-test neither needs."""
    kw = {"stop_after_rounds": rounds, **kw}
    whole = config(tmp_path, name, rounds=rounds, checkpoint_every=1, **kw)
    train_federated(whole, echo=lambda _: None)
    resumed = config(tmp_path, f"{name}-resumed", rounds=rounds, checkpoint_every=1, **kw)
    shutil.copytree(whole.run_dir, resumed.run_dir)
    for later in range(resume_from + 1, rounds + 1):
        checkpoint_path(resumed.run_dir, later).unlink()
    (checkpoint_dir(resumed.run_dir) / "latest").write_text(f"step_{resume_from:06d}.pt\n")
    lines: list[str] = []
    train_federated(resumed, echo=lines.append)
    assert any("resuming" in line and f"round {resume_from}" in line for line in lines), lines
    return whole, resumed


def same_params(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    pa, pb = load_checkpoint(a.run_dir)["params"], load_checkpoint(b.run_dir)["params"]
    return all(torch.equal(pa[k], pb[k]) for k in pa)


# --------------------------------------------------------------------------- compression

def test_compression_that_cannot_compose_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot run with federated\.secure_aggregation"):
        config(tmp_path, "x", compression={"codec": "int8"},
               secure_aggregation={"clip": 1.0})
    with pytest.raises(ConfigError, match="compression codec 'zip' is not one of"):
        config(tmp_path, "x", compression={"codec": "zip"})
    with pytest.raises(ConfigError, match="fraction"):
        config(tmp_path, "x", compression={"codec": "topk", "fraction": 0})


def test_topk_with_error_feedback_sends_k_values_and_resumes_exactly(cluster,
                                                                     tmp_path: Path) -> None:
    """Top-k with error feedback: the rows count 8 bytes per kept value, the sites keep
    residuals, and a resumed run (the residuals restored from the checkpoint) ends
    bit-for-bit where the uninterrupted one ends."""
    comp = {"compression": {"codec": "topk", "fraction": 0.1}, "local_steps": 2,
            "local_lr": 0.02}
    whole, resumed = whole_then_resumed(tmp_path, "topk", rounds=3, resume_from=1, **comp)
    rounds, _ = tables(whole)
    k = -(-PARAMS // 10)
    assert (rounds["bytes_up"] == 3 * 8 * k).all()
    assert rounds["bytes_up_ratio"].iloc[0] == pytest.approx(8 * k / (4 * PARAMS))
    state = load_checkpoint(whole.run_dir)
    assert all(s["residual"].abs().sum() > 0 for s in state["sites"].values())
    assert same_params(whole, resumed)
    assert tables(resumed)[0]["round"].tolist() == [1, 2, 3]
