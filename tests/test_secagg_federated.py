"""Secure aggregation in real federated runs, on a multi-node Ray cluster on this machine.

The module starts ``ray.cluster_utils.Cluster`` as ``tests/test_federated_failures.py`` does: a
head node with the ``cloud`` resource and one raylet per site, health checks tightened so that
a killed node is declared dead in about 2 s. The checks:

* every value the driver process receives through ``ray.get`` is recorded: no float vector of
  the parameter count ever arrives (replies carry an empty update and a masked ring vector), each
  masked vector is uncorrelated with the site's true update, and the final parameters equal a
  plain aggregation of the same clipped updates, computed here, within the fixed-point error;
  a stopped and resumed run ends bit for bit where an uninterrupted one ends;
* a site's raylet is killed after the site advertised and shared its keys: the round completes
  without it, its pairwise masks rebuilt from the others' Shamir shares, and the unmasked sum
  equals the survivors' clipped sum within the documented bound;
* with distributed DP noise (seeded), a run through secure aggregation ends where the same run
  without it ends, within the fixed-point error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from helpers import add_site_node, multi_node_cluster

from actors.contract import RoundReply
from actors.federation import Federation
from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from experiments.site_jobs import choose_participants
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.local_update import local_update
from metalearn.outer import OuterOptimizer
from metalearn.params import FlatLayout
from metalearn.sites import SiteTasks, plan_sites
from privacy.fixed_point import clip_l2
from privacy.messages import MaskedInput
from privacy.server import MaskingServer, SecAggResult

SITES = [f"site-{i}" for i in range(3)]
CLIP = 0.05


@pytest.fixture(scope="module")
def cluster():
    with multi_node_cluster(SITES) as (c, nodes):
        yield c, nodes


def config(tmp_path: Path, name: str, rounds: int = 3, **federated: Any) -> ExperimentConfig:
    federated = {"secure_aggregation": {"clip": CLIP}, **federated}
    return parse_config({
        "name": name, "seed": 7, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 10},
        "model": {"name": "sinusoid_mlp", "hidden": 40},
        "algorithm": {"name": "maml", "inner_lr": 0.01, "options": {"strategy": "vmap"}},
        # SGD: a parameter moves by lr x the aggregate, so the comparison with plain
        # aggregation sees the fixed-point error itself; Adam divides a near-zero coordinate by
        # its own tiny history (step ~ lr g / eps), which turns a 1e-10 rounding into ~1e-6.
        "train": {"meta_batch": 6, "steps": rounds, "outer_lr": 0.05, "outer_optimizer": "sgd",
                  "log_every": 1, "checkpoint_every": 100},
        "eval": {"episodes": 4, "steps_list": [0, 1], "batch": 4},
        "federated": {"topology": {"sites": [{"name": s} for s in SITES]},
                      "personalize_episodes": 0, "deadline_s": 20, **federated},
    })


def recording(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every value ``ray.get`` hands the driver process from now on."""
    received: list[Any] = []
    real_get = ray.get

    def recording_get(*args: Any, **kwargs: Any) -> Any:
        value = real_get(*args, **kwargs)
        received.append(value)
        return value

    monkeypatch.setattr(ray, "get", recording_get)
    return received


def arrays(value: Any, path: str = "") -> list[tuple[str, np.ndarray]]:
    """Every array inside nested dataclasses, dicts, lists and tuples (tensors as numpy)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [a for f in dataclasses.fields(value)
                for a in arrays(getattr(value, f.name), f"{path}.{f.name}")]
    if isinstance(value, dict):
        return [a for k, v in value.items() for a in arrays(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [a for i, v in enumerate(value) for a in arrays(v, f"{path}[{i}]")]
    if isinstance(value, torch.Tensor):
        return [(path, value.detach().numpy())]
    return [(path, value)] if isinstance(value, np.ndarray) else []


class PlainReference:
    """The same run by hand, in this process: each site's update at the current parameters,
    clipped to ``CLIP``, averaged in float64 (plain aggregation), outer step. Keeps each
    round's true (unclipped) updates."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        assert cfg.federated is not None
        self.cfg, self.fed = cfg, cfg.federated
        spec = cfg.to_dict()
        torch.manual_seed(cfg.seed)
        self.algorithm = algorithm_from_config(spec)
        self.outer = OuterOptimizer(self.algorithm.init_params(), lr=cfg.train.outer_lr,
                                    kind=cfg.train.outer_optimizer)
        self.layout = FlatLayout.of(self.outer.params)
        plans = plan_sites(spec["data"], SITES, cfg.seed, self.fed.holdout_fraction)
        self.tasks = {s: SiteTasks(spec["data"], plans[s], 1, cfg.seed) for s in SITES}
        self.per_site = cfg.train.meta_batch // len(SITES)

    def update(self, params: dict[str, torch.Tensor], site: str, round_idx: int) -> np.ndarray:
        chosen = choose_participants(SITES, dict.fromkeys(SITES, 1), self.fed, self.cfg.seed,
                                     round_idx)
        sample = self.tasks[site].round_sampler(chosen[site], round_idx)
        update = local_update(self.algorithm, params, sample, self.per_site)
        return self.layout.pack(update.tensors).astype(np.float64)

    def run(self, rounds: int) -> dict[tuple[str, int], np.ndarray]:
        true = {}
        for r in range(1, rounds + 1):
            for s in SITES:
                true[(s, r)] = self.update(self.outer.params, s, r)
            mean = np.mean([clip_l2(true[(s, r)], CLIP) for s in SITES], axis=0)
            self.outer.step_flat(torch.from_numpy(mean), "gradient")
        return true


def test_the_driver_never_holds_an_update_and_a_resumed_run_ends_exactly(
        cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    # stop_after_rounds at the last round: checkpointed like a finished run, without the
    # meta-test (a task process of its own; the run that loses a node goes all the way)
    whole = config(tmp_path, "whole", stop_after_rounds=3)
    received = recording(monkeypatch)
    train_federated(whole, echo=lambda _: None)
    monkeypatch.undo()

    reference = PlainReference(whole)
    true = reference.run(3)
    dim = reference.layout.numel
    replies = [v for v in received if isinstance(v, RoundReply)]
    assert len(replies) == 3 * len(SITES)
    masked: list[tuple[int, MaskedInput]] = []
    for value in received:
        for path, a in arrays(value):
            # an update in clear would be a float vector of the parameter count
            assert not (np.issubdtype(a.dtype, np.floating) and a.size > 1), \
                f"{path}: float array of {a.size} values reached the driver"
            if a.size == dim:
                assert a.dtype == np.uint32, f"{path}: {a.dtype}"
    for reply in replies:
        assert reply.update.size == 0 and reply.masked is not None
        assert reply.bytes_up == 4 + 4 * dim
        masked.append((reply.round, reply.masked))
    # each masked vector is at chance against its site's true update (|r| ~ 1/sqrt(dim))
    for round_idx, m in masked:
        site = SITES[m.site - 1]
        r = np.corrcoef(m.vector.astype(np.float64), true[(site, round_idx)])[0, 1]
        assert abs(r) < 5 / np.sqrt(dim), (site, round_idx, r)
    assert max(np.linalg.norm(u) for u in true.values()) > CLIP  # clipping mattered

    # the final parameters: plain aggregation of the same clipped updates. The fixed-point
    # error of a round's mean is ~4e-11 per coordinate, times lr 0.05: far below a float32
    # ulp of the parameters, so what may differ is the float32 rounding of a step (an ulp)
    got = load_checkpoint(whole.run_dir)["params"]
    for k, v in reference.outer.params.items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-7), k

    rows = pd.read_parquet(whole.run_dir / "metrics.parquet")
    assert not rows["skipped"].any() and (rows["secagg_survivors"] == 3).all()
    assert (rows["bytes_up"] == 3 * (4 + 4 * dim)).all() and (rows["secagg_bytes_up"] > 0).all()
    for column in ("secagg_advertise_s", "secagg_share_s", "secagg_sum_s", "secagg_unmask_s"):
        assert (rows[column] > 0).all(), column

    interrupted = config(tmp_path, "interrupted", stop_after_rounds=1)
    assert train_federated(interrupted, echo=lambda _: None)["stopped_after_round"] == 1
    lines: list[str] = []
    train_federated(config(tmp_path, "interrupted", stop_after_rounds=3), echo=lines.append)
    assert any("resuming" in line and "round 1" in line for line in lines)
    a, b = load_checkpoint(whole.run_dir), load_checkpoint(interrupted.run_dir)
    assert a["step"] == b["step"] == 3
    # masks are fresh random every round, yet unmasking is exact in the ring: the decoded sum
    # is a function of the updates alone, so the resumed run is bit-identical
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    again = pd.read_parquet(interrupted.run_dir / "metrics.parquet")
    assert again["loss_after"].tolist() == rows["loss_after"].tolist()


@pytest.mark.slow
def test_a_site_whose_node_dies_after_sharing_its_keys_is_left_out_exactly(
        cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    c, nodes = cluster
    cfg = config(tmp_path, "node-dies", rounds=2)
    sent: dict[int, np.ndarray] = {}
    results: list[SecAggResult] = []
    run_round, unmask = Federation.run_round, MaskingServer.unmask

    def killing_run_round(self: Federation, params_ref: Any, round_idx: int,
                          *args: Any, **kwargs: Any) -> Any:
        sent[round_idx] = np.array(params_ref, copy=True)  # small: inline, not a ref
        if round_idx == 1:  # site-2 advertised and shared its keys; now its node dies
            # with all its processes: remove_node SIGKILLs the raylet, but calls reach the
            # actor's worker directly, and a loaded machine let it answer once more before it
            # noticed; a machine that goes down takes the worker too
            pid = ray.get(self.edges["site-2"].info.remote()).pid
            c.remove_node(nodes["site-2"], allow_graceful=False)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return run_round(self, params_ref, round_idx, *args, **kwargs)

    def recording_unmask(self: MaskingServer, responses: Any) -> SecAggResult:
        result = unmask(self, responses)
        results.append(result)
        return result

    monkeypatch.setattr(Federation, "run_round", killing_run_round)
    monkeypatch.setattr(MaskingServer, "unmask", recording_unmask)
    try:
        train_federated(cfg, echo=lambda _: None)
    finally:
        monkeypatch.undo()
        nodes["site-2"] = add_site_node(c, "site-2")

    rows = pd.read_parquet(cfg.run_dir / "metrics.parquet").set_index("round")
    sites = pd.read_parquet(cfg.run_dir / "sites.parquet")
    assert not rows["skipped"].any()
    assert rows.loc[1, "secagg_dropped"] == 1 and rows.loc[1, "secagg_survivors"] == 2
    gone = sites[sites["site"] == "site-2"].set_index("round")["status"]
    assert gone.loc[1] in ("failed", "late") and gone.loc[2] != "ok", gone.tolist()

    first = results[0]
    assert first.dropped == (3,) and first.survivors == (1, 2)
    reference = PlainReference(cfg)
    params = reference.layout.unpack(sent[1])
    expected = np.sum([clip_l2(reference.update(params, s, 1), CLIP) for s in SITES[:2]],
                      axis=0)
    assert np.abs(first.total - expected).max() <= first.error_bound
    assert results[1].survivors == (1, 2) and results[1].dropped == ()


@pytest.mark.slow
def test_distributed_dp_noise_through_secure_aggregation_equals_the_plain_dp_run(
        cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seeded noise and participants: the two runs draw the same noise shares, the same cloud
    # top-up and the same sites; only the way the sum reaches the cloud differs.
    privacy = {"unit": "site", "clip_norm": CLIP, "noise_multiplier": 1.0, "delta": 1e-2,
               "noise": "distributed", "seed": 11}
    secure = config(tmp_path, "dp-secure", rounds=2, privacy=privacy, secure_aggregation={},
                    stop_after_rounds=2)
    plain = config(tmp_path, "dp-plain", rounds=2, privacy=privacy, secure_aggregation=None,
                   stop_after_rounds=2)
    received = recording(monkeypatch)
    train_federated(secure, echo=lambda _: None)
    monkeypatch.undo()
    train_federated(plain, echo=lambda _: None)

    replies = [v for v in received if isinstance(v, RoundReply)]
    assert replies and all(r.update.size == 0 and r.masked is not None and r.metrics == {}
                           for r in replies)
    assert json.loads((secure.run_dir / "privacy.json").read_text())["secure_aggregation"]
    rows = pd.read_parquet(secure.run_dir / "metrics.parquet")
    plain_rows = pd.read_parquet(plain.run_dir / "metrics.parquet")
    assert "reclipped" not in rows.columns and "reclipped" in plain_rows.columns
    for column in ("epsilon", "epsilon_cloud", "noise_std"):
        assert rows[column].tolist() == plain_rows[column].tolist(), column
    # the masking bound leaves room for the noise shares (C + sigma (sqrt(dim) + 12) ~ 1.6),
    # so the fixed-point error is ~3e-9 per coordinate of a round's sum, ~5e-11 after the
    # step: the parameters agree to float32 rounding
    a, b = load_checkpoint(secure.run_dir)["params"], load_checkpoint(plain.run_dir)["params"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7), k
