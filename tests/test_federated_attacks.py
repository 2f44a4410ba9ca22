"""A configured attacker in a real federation, and what a robust rule does about it.

A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head with the
``cloud`` resource and one raylet per site, as in ``test_federated_failures.py``) runs five
sinusoid sites; the topology makes ``site-4`` a sign-flip attacker (it sends ``-4 u`` for its
honest meta-gradient ``u``). Two short runs from the same seed, attacked, with the weighted
mean and with Multi-Krum (f=1), are compared with the clean run, computed here in-process (a
clean federated round with equal task counts is one centralized step on the union of the
sites' tasks: ``test_federated_equivalence.py``). The outer optimizer is SGD, so the distance
between final parameters measures what the aggregates did (Adam would rescale every
coordinate's step).

Measured here (3 rounds, lr 0.01, seed 5): the attacked weighted mean ends 0.144 from the
clean run, attacked Multi-Krum 0.018 (it averages the four honest sites; the clean run, five).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from helpers import multi_node_cluster

from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.outer import OuterOptimizer
from metalearn.sites import SiteTasks, plan_sites
from metalearn.tasks import TaskBatch

SITES = [f"site-{i}" for i in range(5)]
ATTACKER = "site-4"


@pytest.fixture(scope="module")
def cluster():
    with multi_node_cluster(SITES, fast_health_checks=False) as (c, _):
        yield c


def config(tmp_path: Path, name: str, aggregator: dict[str, Any],
           attack: dict[str, Any] | None) -> ExperimentConfig:
    sites = [{"name": s, **({"attack": attack} if attack and s == ATTACKER else {})}
             for s in SITES]
    return parse_config({
        "name": name, "seed": 5, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
        "model": {"name": "sinusoid_mlp", "hidden": 20},
        "algorithm": {"name": "maml", "inner_lr": 0.01, "options": {"strategy": "vmap"}},
        "train": {"meta_batch": 10, "steps": 3, "outer_lr": 1e-2, "outer_optimizer": "sgd",
                  "log_every": 1, "checkpoint_every": 100},
        "eval": {"episodes": 10, "steps_list": [0, 1], "batch": 10},
        # stop_after_rounds = steps: checkpoint after the last round and skip the meta-test
        "federated": {"topology": {"sites": sites}, "quorum": 5, "personalize_episodes": 0,
                      "aggregator": aggregator, "stop_after_rounds": 3},
    })


def clean_run(cfg: ExperimentConfig) -> torch.Tensor:
    """The final parameters of the same federation without the attacker's poison (every
    site honest, weighted mean), in this process."""
    spec = cfg.to_dict()
    torch.manual_seed(cfg.seed)
    algorithm = algorithm_from_config(spec)
    outer = OuterOptimizer(algorithm.init_params(), lr=cfg.train.outer_lr, kind="sgd")
    plans = plan_sites(spec["data"], SITES, cfg.seed)
    sites = [SiteTasks(spec["data"], plans[s], 1, cfg.seed) for s in SITES]
    for r in range(1, cfg.train.steps + 1):
        tasks = TaskBatch.cat([s.round_sampler([0], r)(2) for s in sites])
        update = algorithm.meta_update(outer.params, tasks)
        outer.step(update.tensors, update.kind)
    return torch.cat([outer.params[k].reshape(-1) for k in sorted(outer.params)])


def final_params(cfg: ExperimentConfig) -> torch.Tensor:
    params = load_checkpoint(cfg.run_dir)["params"]
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


@pytest.mark.slow
def test_one_sign_flip_attacker_moves_the_mean_not_multi_krum(cluster, tmp_path: Path) -> None:
    sign_flip = {"name": "sign_flip", "factor": 4.0}
    mean = {"name": "weighted_mean"}
    multi_krum = {"name": "multi_krum", "f": 1}
    runs = {"mean": config(tmp_path, "attacked-mean", mean, sign_flip),
            "multi_krum": config(tmp_path, "attacked-multi-krum", multi_krum, sign_flip)}
    for cfg in runs.values():
        train_federated(cfg, echo=lambda _: None)
    clean = clean_run(runs["mean"])
    moved = {k: float((final_params(cfg) - clean).norm()) for k, cfg in runs.items()}
    # one attacker of five drags the mean: ~0.14 here, against ~0.02 for Multi-Krum
    assert moved["mean"] > 0.1, moved
    assert moved["multi_krum"] < 0.04, moved
    assert moved["mean"] > 4 * moved["multi_krum"], moved

    # The cloud cannot tell: the attacker's rows are those of a normal participant.
    for cfg in (runs["mean"], runs["multi_krum"]):
        rounds = pd.read_parquet(cfg.run_dir / "metrics.parquet")
        sites = pd.read_parquet(cfg.run_dir / "sites.parquet")
        assert rounds["arrived"].tolist() == [5, 5, 5] and not rounds["skipped"].any()
        bad, good = sites[sites["site"] == ATTACKER], sites[sites["site"] != ATTACKER]
        assert bad["status"].tolist() == ["ok"] * 3
        assert set(bad["num_tasks"]) == set(good["num_tasks"]) == {2}
        assert bad["bytes_up"].tolist() == good["bytes_up"].tolist()[:3]
        assert bad[["loss_before", "loss_after"]].notna().all().all()
        assert "attack" not in sites.columns
