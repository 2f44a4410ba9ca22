"""Matching Networks, Siamese networks, CAVIA (on sinusoid; its conv net is checked
centralized), MANN and VERSA trained by real edge actors on Ray (support hallucination
trains ProtoNet's way: its round is checked centralized and served).

What a site returns is parameter-shaped (the meta-gradient over its own tasks), so with one
local step and every site taking part a federated round must equal one centralized step over the
union of the sites' tasks; a reference in this process draws the very same tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import embedded_cluster

from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from experiments.site_jobs import choose_participants, tasks_per_site
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.outer import OuterOptimizer
from metalearn.params import max_abs_diff
from metalearn.sites import SiteTasks, plan_sites
from metalearn.tasks import TaskBatch

pytestmark = pytest.mark.slow

SITES = 2
OMNIGLOT = {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2}
CASES: dict[str, dict[str, Any]] = {
    "matching-fce": {"data": OMNIGLOT, "algorithm": {"name": "matching", "inner_steps": 0},
                     "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                               "fce": True, "fce_steps": 2}},
    "siamese": {"data": OMNIGLOT, "algorithm": {"name": "siamese", "inner_steps": 0},
                "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                          "twin_units": 8}},
    "cavia-sinusoid": {"data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
                       "algorithm": {"name": "cavia", "inner_lr": 1.0, "inner_steps": 1},
                       "model": {"name": "sinusoid_mlp", "hidden": 8, "context": 2},
                       "eval": {"episodes": 4, "batch": 4, "steps_list": [0, 1]}},
    "mann": {"data": OMNIGLOT, "algorithm": {"name": "mann", "inner_steps": 0},
             "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                       "controller_units": 6, "memory_slots": 5, "memory_width": 3}},
    "versa": {"data": OMNIGLOT, "algorithm": {"name": "versa", "inner_steps": 0,
                                              "options": {"samples": 3}},
              "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                        "amortizer_units": 5}},
}


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_cluster(SITES) as topology:
        yield topology


def config(tmp_path: Path, case: str) -> ExperimentConfig:
    return parse_config({
        "name": f"fed-{case}", "seed": 3, "output_dir": str(tmp_path),
        "eval": {"episodes": 4, "batch": 4}, **CASES[case],
        "train": {"meta_batch": 2 * SITES, "steps": 2, "outer_lr": 0.1,
                  "outer_optimizer": "sgd", "checkpoint_every": 100},
        "federated": {"topology": {"sites": SITES}, "personalize_episodes": 0},
    })


def centralized(cfg: ExperimentConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Initial and final parameters of centralized training on the sites' very tasks."""
    spec, fed = cfg.to_dict(), cfg.federated
    assert fed is not None
    names = fed.resolved_topology().site_names
    torch.manual_seed(cfg.seed)
    algorithm = algorithm_from_config(spec)
    outer = OuterOptimizer(algorithm.init_params(), lr=cfg.train.outer_lr, kind="sgd")
    init = {k: v.clone() for k, v in outer.params.items()}
    plans = plan_sites(spec["data"], names, cfg.seed, fed.holdout_fraction)
    sites = {s: SiteTasks(spec["data"], plans[s], 1, cfg.seed) for s in names}
    per_site = tasks_per_site(cfg, len(names))
    for r in range(1, cfg.train.steps + 1):
        chosen = choose_participants(names, dict.fromkeys(names, 1), fed, cfg.seed, r)
        batch = TaskBatch.cat([sites[s].round_sampler(d, r)(per_site)
                               for s, d in chosen.items()])
        update = algorithm.meta_update(outer.params, batch)
        outer.step(update.tensors, update.kind)
    return init, outer.params


@pytest.mark.parametrize("case", list(CASES))
def test_federated_round_equals_centralized_step(ray_cluster, tmp_path: Path, case: str) -> None:
    cfg = config(tmp_path, case)
    train_federated(cfg, echo=lambda _: None)
    state = load_checkpoint(cfg.run_dir)
    assert int(state["step"]) == cfg.train.steps
    init, expected = centralized(cfg)
    assert max_abs_diff(init, state["params"]) > 1e-4  # it trained
    assert max_abs_diff(expected, state["params"]) < 1e-5
    if case.startswith("cavia"):  # the context's start never moves from zero
        assert float(state["params"]["context"].abs().max()) == 0.0
    summary = (cfg.run_dir / "summary.json").read_text()
    assert ("accuracy" if "sinusoid" not in case else "mse") in summary
