"""Federated rounds against a single-process reference fed the very same tasks.

With one local step and every site taking part, a round is one step of centralized MAML over
the union of the sites' task batches; the federated meta-parameters must match the reference
to float rounding. With several local steps (deltas), or a fraction of sites per round, the
reference replays the same local updates and participant draws in one process.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import embedded_cluster

from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from experiments.site_jobs import choose_participants, tasks_per_site
from metalearn.aggregation import FlatUpdate, WeightedMean
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.local_update import local_update
from metalearn.outer import OuterOptimizer
from metalearn.params import max_abs_diff
from metalearn.sites import SiteTasks, plan_sites, round_seed
from metalearn.tasks import TaskBatch

SITES = 3


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_cluster(SITES) as topology:
        yield topology


def config(tmp_path: Path, name: str, dataset: str = "sinusoid", rounds: int = 4,
           **federated: Any) -> ExperimentConfig:
    if dataset == "sinusoid":
        data = {"dataset": "sinusoid", "shots": 5, "queries": 10}
        model = {"name": "sinusoid_mlp", "hidden": 20}
        algorithm = {"name": "maml", "inner_lr": 0.01, "inner_steps": 1}
        evaluation = {"episodes": 10, "steps_list": [0, 1], "batch": 10}
    else:
        data = {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2}
        model = {"name": "omniglot_conv", "channels": 8}
        algorithm = {"name": "maml", "inner_lr": 0.4, "inner_steps": 1}
        evaluation = {"episodes": 6, "batch": 6}
    return parse_config({
        "name": name, "seed": 7, "output_dir": str(tmp_path), "data": data, "model": model,
        "algorithm": algorithm, "eval": evaluation,
        "train": {"meta_batch": 2 * SITES, "steps": rounds, "outer_lr": 1e-2,
                  "checkpoint_every": 100},
        "federated": {"topology": {"sites": SITES}, "personalize_episodes": 0, **federated},
    })


class Reference:
    """Centralized MAML in this process, drawing exactly the tasks the sites draw."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        spec = cfg.to_dict()
        fed = cfg.federated
        assert fed is not None
        self.cfg, self.fed = cfg, fed
        self.names = fed.resolved_topology().site_names
        torch.manual_seed(cfg.seed)
        self.algorithm = algorithm_from_config(spec)
        self.outer = OuterOptimizer(self.algorithm.init_params(), lr=cfg.train.outer_lr,
                                    kind=cfg.train.outer_optimizer)
        self.init = {k: v.clone() for k, v in self.outer.params.items()}
        plans = plan_sites(spec["data"], self.names, cfg.seed, fed.holdout_fraction)
        self.devices = fed.devices_per_site or 1
        self.sites = {s: SiteTasks(spec["data"], plans[s], self.devices, cfg.seed)
                      for s in self.names}
        self.per_site = tasks_per_site(cfg, len(self.names))

    def participants(self, r: int) -> dict[str, list[int]]:
        devices = dict.fromkeys(self.names, self.devices)
        return choose_participants(self.names, devices, self.fed, self.cfg.seed, r)

    def centralized_round(self, r: int, sites: list[str] | None = None) -> None:
        """One centralized MAML step on the union of the chosen sites' tasks of round r."""
        chosen = self.participants(r)
        batches = [self.sites[s].round_sampler(d, r)(self.per_site) for s, d in chosen.items()
                   if sites is None or s in sites]
        update = self.algorithm.meta_update(self.outer.params, TaskBatch.cat(batches))
        self.outer.step(update.tensors, update.kind)

    def local_steps_round(self, r: int) -> None:
        """Each chosen site's local update, weighted mean, outer step (FedOpt)."""
        updates = [local_update(self.algorithm, self.outer.params,
                                self.sites[s].round_sampler(d, r), self.per_site,
                                self.fed.local_steps, self.fed.local_lr,
                                self.fed.local_optimizer)
                   for s, d in self.participants(r).items()]
        flat = [FlatUpdate.of(u, self.outer.layout) for u in updates]
        self.outer.step_flat(WeightedMean().aggregate(flat), updates[0].kind)


def federated_params(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    train_federated(cfg, echo=lambda _: None)
    state = load_checkpoint(cfg.run_dir)
    assert int(state["step"]) == cfg.train.steps
    return state["params"]


# ------------------------------------------------------------------- pure pieces, no Ray

def test_round_tasks_depend_only_on_seed_site_device_round() -> None:
    cfg = config(Path("/tmp"), "pure", devices_per_site=3)
    plan = plan_sites(cfg.to_dict()["data"], ["site-0"], seed=7)["site-0"]
    a = SiteTasks(cfg.to_dict()["data"], plan, devices=3, seed=7)
    b = SiteTasks(cfg.to_dict()["data"], plan, devices=3, seed=7)  # a "restarted" site
    x1 = a.round_sampler([0, 2], 5)(4).support_x
    assert torch.equal(x1, b.round_sampler([2, 0], 5)(4).support_x)
    assert not torch.equal(x1, a.round_sampler([0, 2], 6)(4).support_x)
    assert round_seed(7, "site-0", 0, 5) != round_seed(7, "site-1", 0, 5)


def test_ten_thousand_devices_are_lazy() -> None:
    cfg = config(Path("/tmp"), "pure")
    plan = plan_sites(cfg.to_dict()["data"], ["site-0"], seed=7)["site-0"]
    site = SiteTasks(cfg.to_dict()["data"], plan, devices=10_000, seed=7)
    lo, hi = site.device_part(9_999)
    assert hi == pytest.approx(plan["amplitude"][1]) and lo < hi
    assert len(site.round_sampler([3, 9_998], 1)(4)) == 4

    # Omniglot: 10,000 devices over 4 sites are index arrays of a few characters each.
    data = config(Path("/tmp"), "pure", dataset="omniglot").to_dict()["data"]
    names = [f"site-{i}" for i in range(4)]
    plans = plan_sites(data, names, seed=7)
    tracemalloc.start()
    sites = [SiteTasks(data, plans[s], devices=2_500, seed=7) for s in names]
    parts = [s.device_part(d) for s in sites for d in (0, 2_499)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6 and all(len(p) >= data["ways"] for p in parts)
    assert len(sites[3].round_sampler([17, 2_048], 2)(3)) == 3


def test_local_update_kinds_and_counts() -> None:
    cfg = config(Path("/tmp"), "pure")
    ref = Reference(cfg)
    sample = ref.sites["site-0"].round_sampler([0], 1)
    one = local_update(ref.algorithm, ref.outer.params, sample, 4)
    assert one.kind == "gradient" and one.num_tasks == 4
    many = local_update(ref.algorithm, ref.outer.params, sample, 4, local_steps=3,
                        local_lr=0.01)
    assert many.kind == "delta" and many.num_tasks == 12
    assert many.tensors.keys() == ref.outer.params.keys()
    assert max(float(v.abs().max()) for v in many.tensors.values()) > 0


# ------------------------------------------------------------------- against real Ray

def test_one_local_step_full_participation_equals_centralized_maml(ray_cluster,
                                                                   tmp_path: Path) -> None:
    cfg = config(tmp_path, "fed-equals-central", devices_per_site=2)
    params = federated_params(cfg)
    ref = Reference(cfg)
    for r in range(1, cfg.train.steps + 1):
        ref.centralized_round(r)
    assert max_abs_diff(ref.init, params) > 1e-3  # it trained
    assert max_abs_diff(ref.outer.params, params) < 1e-5


def test_parameters_through_the_object_store_give_the_same_result(
        ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big models are ``ray.put`` once a round instead of riding inline in each call."""
    import actors.federation as federation

    puts: list[int] = []
    real_put = federation.ray.put

    def counting_put(value: object) -> object:
        puts.append(getattr(value, "nbytes", -1))
        return real_put(value)

    monkeypatch.setattr(federation, "INLINE_BROADCAST_BYTES", 0)
    monkeypatch.setattr(federation.ray, "put", counting_put)
    cfg = config(tmp_path, "fed-put", devices_per_site=2, rounds=2)
    params = federated_params(cfg)
    ref = Reference(cfg)
    for r in range(1, cfg.train.steps + 1):
        ref.centralized_round(r)
    assert len(puts) == cfg.train.steps  # once a round, the flat float32 parameters
    assert set(puts) == {4 * sum(v.numel() for v in ref.init.values())}
    assert max_abs_diff(ref.outer.params, params) < 1e-5


def test_omniglot_conv_net_equals_centralized_maml(ray_cluster, tmp_path: Path) -> None:
    # Outer SGD here: Adam turns float noise in exactly-zero gradients (a conv bias before
    # BatchNorm) into full-size steps of either sign, so only SGD compares to 1e-5.
    cfg = config(tmp_path, "fed-omniglot", dataset="omniglot", rounds=3)
    cfg = parse_config({**cfg.to_dict(), "train": {**cfg.to_dict()["train"],
                                                   "outer_optimizer": "sgd", "outer_lr": 0.1}})
    params = federated_params(cfg)
    ref = Reference(cfg)
    for r in range(1, cfg.train.steps + 1):
        ref.centralized_round(r)
    assert max_abs_diff(ref.init, params) > 1e-4
    assert max_abs_diff(ref.outer.params, params) < 1e-5


def test_local_steps_send_deltas_that_the_cloud_applies(ray_cluster, tmp_path: Path) -> None:
    cfg = config(tmp_path, "fed-deltas", rounds=3, local_steps=2, local_lr=0.01,
                 site_fraction=0.67)
    params = federated_params(cfg)
    ref = Reference(cfg)
    assert len(ref.participants(1)) == 2
    for r in range(1, cfg.train.steps + 1):
        ref.local_steps_round(r)
    assert max_abs_diff(ref.init, params) > 1e-3
    assert max_abs_diff(ref.outer.params, params) < 1e-5
