"""Differential privacy end to end: the site clips before anything leaves it, and a federated
run on a real (embedded) Ray cluster records epsilon per round as the accountant computes it
independently, resumes exactly, and stops at a target epsilon.

The first tests drive an :class:`~actors.edge.EdgeNode` as a plain object (no Ray) and hold its
reply against the same updates computed and clipped here by hand; the rest share one embedded
cluster and capture every value the driver receives from Ray, so the assertions are about what
actually crossed the wire.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import ray
import torch
from dp_accounting import rdp
from helpers import embedded_cluster

from actors.contract import RoundReply, SiteJob
from actors.edge import EdgeNode
from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from experiments.site_jobs import site_jobs
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.local_update import local_update
from metalearn.params import FlatLayout
from metalearn.sites import SiteTasks, plan_sites, split_tasks
from privacy.accounting import effective_noise_multiplier
from privacy.dp import l2_norm

SITES = 2


def config(tmp_path: Path, name: str, rounds: int = 4, privacy: dict[str, Any] | None = None,
           **federated: Any) -> ExperimentConfig:
    return parse_config({
        "name": name, "seed": 3, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
        "model": {"name": "sinusoid_mlp", "hidden": 20},
        "algorithm": {"name": "maml", "inner_lr": 0.01, "options": {"strategy": "vmap"}},
        "train": {"meta_batch": 8, "steps": rounds, "outer_lr": 1e-2, "log_every": 1,
                  "checkpoint_every": 100},
        "eval": {"episodes": 10, "steps_list": [0, 1], "batch": 10},
        "federated": {"topology": {"sites": SITES, "devices": 3}, "devices_per_round": 2,
                      "personalize_episodes": 0, **federated,
                      "privacy": {"unit": "device", "clip_norm": 0.05, "noise_multiplier": 0.8,
                                  "delta": 1e-2, **(privacy or {})}},
    })


# --------------------------------------------------------------------------- the site, alone

def plain_edges(cfg: ExperimentConfig) -> tuple[dict[str, SiteJob], dict[str, Any]]:
    spec = cfg.to_dict()
    assert cfg.federated is not None
    topology = cfg.federated.resolved_topology()
    plans = plan_sites(spec["data"], topology.site_names, cfg.seed)
    jobs = site_jobs(cfg, topology, plans, dict.fromkeys(topology.site_names, 3), 4)
    return jobs, spec


def by_hand(job: SiteJob, spec: dict[str, Any], devices: list[int], round_idx: int,
            bound: float) -> tuple[torch.Tensor, list[float]]:
    """Each device's update on its own tasks of the round, clipped, summed (independently of
    the edge's code path)."""
    torch.manual_seed(0)
    algorithm = algorithm_from_config(spec)
    params = algorithm.init_params()
    layout = FlatLayout.of(params)
    tasks = SiteTasks(spec["data"], job.data_plan, devices=job.devices, seed=job.seed)
    total, norms = torch.zeros(layout.numel, dtype=torch.float64), []
    for device, n in zip(devices, split_tasks(job.local.tasks_per_step, len(devices)),
                         strict=True):
        update = local_update(algorithm, params, tasks.round_sampler([device], round_idx), n)
        vector = layout.concat(update.tensors).double()
        norms.append(l2_norm(vector))
        total += vector * min(1.0, bound / norms[-1])
    return total, norms


def test_a_site_clips_each_device_before_its_update_leaves(tmp_path: Path) -> None:
    cfg = config(tmp_path, "edge")
    jobs, spec = plain_edges(cfg)
    job = jobs["site-1"]
    torch.manual_seed(0)
    params = algorithm_from_config(spec).init_params()
    flat = FlatLayout.of(params).pack(params)
    edge = EdgeNode(job)
    reply = edge.round(flat, 2, [0, 2], clip_norm=0.07)
    expected, norms = by_hand(job, spec, [0, 2], 2, 0.07)
    assert max(norms) > 0.07  # clipping did something
    assert torch.allclose(torch.from_numpy(reply.update).double(), expected, atol=1e-6)
    assert l2_norm(torch.tensor(reply.update)) <= 2 * 0.07
    assert reply.clip_vote == pytest.approx(sum((n <= 0.07) - 0.5 for n in norms))
    assert reply.num_tasks == 4 and set(reply.metrics) >= {"loss_after"}

    # unit site: the site's one update (all its devices' tasks together), clipped once
    site_job = replace(job, privacy=replace(job.privacy, unit="site"))
    plain = EdgeNode(replace(job, privacy=None)).round(flat, 2, [0, 2])
    clipped = EdgeNode(site_job).round(flat, 2, [0, 2], clip_norm=0.07)
    raw = torch.from_numpy(plain.update).double()
    assert torch.allclose(torch.from_numpy(clipped.update).double(),
                          raw * min(1.0, 0.07 / l2_norm(raw)), atol=1e-6)
    assert clipped.clip_vote == pytest.approx(-0.5)


def test_with_distributed_noise_a_site_adds_its_share_and_sends_no_metrics(
        tmp_path: Path) -> None:
    cfg = config(tmp_path, "edge-distributed", privacy={"noise": "distributed",
                                                        "noise_multiplier": 3.0})
    jobs, spec = plain_edges(cfg)
    job = jobs["site-0"]
    assert job.privacy is not None
    share = job.privacy.noise_multiplier_share
    assert share == pytest.approx(3.0 / math.sqrt(SITES))
    torch.manual_seed(0)
    params = algorithm_from_config(spec).init_params()
    reply = EdgeNode(job).round(FlatLayout.of(params).pack(params), 1, [1, 2])
    assert reply.metrics == {} and reply.clip_vote is None
    clipped, _ = by_hand(job, spec, [1, 2], 1, 0.05)
    noise = torch.from_numpy(reply.update).double() - clipped
    assert noise.std().item() == pytest.approx(share * 0.05, rel=0.2)


# --------------------------------------------------------------------------- runs on Ray

@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_cluster(SITES) as topology:
        yield topology


def replies_of(run: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[RoundReply]]:
    """Run ``run()`` and keep every RoundReply that ``ray.get`` handed the driver."""
    seen: list[RoundReply] = []
    real_get = ray.get

    def recording_get(*args: Any, **kwargs: Any) -> Any:
        value = real_get(*args, **kwargs)
        seen.extend(v for v in (value if isinstance(value, list) else [value])
                    if isinstance(v, RoundReply))
        return value

    monkeypatch.setattr(ray, "get", recording_get)
    try:
        return run(), seen
    finally:
        monkeypatch.undo()


def wor_epsilon(rounds: int, multiplier: float, delta: float) -> float:
    """2 of 3 devices per site and round, without replacement: replace-one, sensitivity 2C."""
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation
                                   .REPLACE_ONE)
    for _ in range(rounds):
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            3, 2, dp_accounting.GaussianDpEvent(multiplier / 2)))
    return accountant.get_epsilon(delta)


ADAPTIVE = {"seed": 9, "adaptive_clip": {"target_quantile": 0.5, "clip_lr": 0.3,
                                         "count_noise_std": 0.5}}


def test_a_private_run_clips_at_the_sites_accounts_each_round_and_resumes_exactly(
        ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = config(tmp_path, "whole", privacy=ADAPTIVE)
    summary, replies = replies_of(lambda: train_federated(whole, echo=lambda _: None),
                                  monkeypatch)
    rows = pd.read_parquet(whole.run_dir / "metrics.parquet").set_index("round")

    # what reached the cloud: per round, each site's sum of two devices clipped to that
    # round's bound (which adaptive clipping moved)
    assert len(replies) == 4 * SITES
    for reply in replies:
        bound = rows.loc[reply.round, "clip_norm"] * len(reply.device_ids)
        assert l2_norm(torch.tensor(reply.update)) <= bound * (1 + 1e-6), reply.round
        assert len(reply.device_ids) == 2 and reply.clip_vote is not None
    assert rows["clip_norm"].iloc[0] == 0.05 and rows["clip_norm"].nunique() == 4
    assert rows["unclipped_fraction"].notna().all() and (rows["reclipped"] == 0).all()

    # epsilon per round: what the library says for the same events composed round by round
    multiplier = effective_noise_multiplier(0.8, 0.5)
    expected = [wor_epsilon(r, multiplier, 1e-2) for r in range(1, 5)]
    assert rows["epsilon"].tolist() == pytest.approx(expected, rel=1e-9)
    assert np.all(np.diff(rows["epsilon"].to_numpy()) > 0)
    privacy = summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(expected[-1]) and privacy["delta"] == 1e-2
    assert privacy["unit"] == "device" and privacy["neighbouring"] == "replace one device"
    assert json.loads((whole.run_dir / "privacy.json").read_text()) == privacy

    interrupted = config(tmp_path, "interrupted", privacy=ADAPTIVE, stop_after_rounds=2)
    assert train_federated(interrupted, echo=lambda _: None)["stopped_after_round"] == 2
    stopped = json.loads((interrupted.run_dir / "privacy.json").read_text())
    assert stopped["rounds"] == 2 and stopped["epsilon"] == pytest.approx(expected[1])
    lines: list[str] = []
    resumed = train_federated(config(tmp_path, "interrupted", privacy=ADAPTIVE),
                              echo=lines.append)
    assert any("resuming" in line and "round 2" in line for line in lines)
    a, b = load_checkpoint(whole.run_dir), load_checkpoint(interrupted.run_dir)
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    again = pd.read_parquet(interrupted.run_dir / "metrics.parquet").set_index("round")
    for column in ("epsilon", "clip_norm", "unclipped_fraction", "loss_after"):
        assert again[column].tolist() == rows[column].tolist(), column
    assert resumed["privacy"] == privacy


def test_distributed_noise_with_a_target_epsilon_stops_in_budget(
        ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Secure noise and participants (no seed): Poisson sampling of sites at rate 1/2.
    privacy = {"unit": "site", "noise": "distributed", "sampling": "poisson",
               "noise_multiplier": 1.5, "delta": 1e-3, "target_epsilon": 2.0}
    cfg = config(tmp_path, "budget", rounds=8, privacy=privacy, site_fraction=0.5,
                 max_missed_rounds=8)
    lines: list[str] = []
    summary, replies = replies_of(lambda: train_federated(cfg, echo=lines.append),
                                  monkeypatch)
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.5))
    epsilons = []
    for _ in range(8):
        accountant.compose(event)
        epsilons.append(accountant.get_epsilon(1e-3))
    allowed = sum(e <= 2.0 for e in epsilons)
    assert 1 <= allowed < 8
    assert summary["train_steps"] == allowed
    assert summary["privacy"]["stopped_by_target_epsilon"]
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilons[allowed - 1], rel=1e-9)
    assert summary["privacy"]["secure_noise"]
    assert any(f"stopped after round {allowed} of 8" in line for line in lines)

    rows = pd.read_parquet(cfg.run_dir / "metrics.parquet")
    assert rows["round"].tolist() == list(range(1, allowed + 1))
    assert rows["epsilon"].tolist() == pytest.approx(epsilons[:allowed], rel=1e-9)
    assert {"epsilon_cloud", "epsilon_cloud_each"} <= set(rows.columns)
    assert "loss_after" not in rows.columns  # the sites sent no un-noised metrics
    for reply in replies:
        assert reply.metrics == {} and reply.clip_vote is None
        # a noise share of std 1.5 / sqrt(1) * C = 0.075 per coordinate rides on each update
        assert l2_norm(torch.tensor(reply.update)) > 0.05
