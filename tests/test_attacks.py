"""Attacks: the maths against numbers worked out by hand, and their application at a site.

The site-level checks build :class:`actors.edge.EdgeNode` as a plain object (no Ray) from the
jobs that :func:`experiments.site_jobs.site_jobs` makes out of a topology with attackers, and
hold each poisoned update equal to the attack applied to what an honest copy of the same site
computes in the same round (tasks depend only on seed, site, device and round).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import in_process_site_jobs

from actors.contract import Attack
from actors.edge import EdgeNode
from experiments.config import ExperimentConfig, parse_config
from metalearn import attacks
from metalearn.local_update import local_update
from metalearn.params import FlatLayout
from metalearn.sites import SiteTasks, attack_seed
from metalearn.tasks import TaskBatch

pytestmark = pytest.mark.usefixtures("heap_given_back")

# --------------------------------------------------------------------------- the maths


def test_sign_flip_and_scale() -> None:
    u = torch.tensor([1.0, -2.0, 0.5])
    assert attacks.sign_flip(u, 1.0).tolist() == [-1.0, 2.0, -0.5]
    assert attacks.sign_flip(u, 4.0).tolist() == [-4.0, 8.0, -2.0]  # -k u, k = 4
    assert attacks.scale(u, 10.0).tolist() == [10.0, -20.0, 5.0]  # lambda u, lambda = 10


def test_gaussian_replaces_the_update_reproducibly() -> None:
    u = torch.full((20000,), 7.0)
    noise = attacks.gaussian(u, 0.5, torch.Generator().manual_seed(1))
    assert noise.shape == u.shape and noise.dtype == u.dtype
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02)  # nothing of u's 7 is left
    assert float(noise.std()) == pytest.approx(0.5, rel=0.03)
    again = attacks.gaussian(torch.zeros(20000), 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(noise, again)  # depends on the seed and shape only


def test_alie_is_mean_minus_z_std() -> None:
    # Three honest updates, two coordinates:
    #   coordinate 0: 1 2 3 -> mean 2, sample variance ((-1)^2 + 0 + 1^2) / (3-1) = 1, std 1
    #   coordinate 1: 0 0 6 -> mean 2, variance (4 + 4 + 16) / 2 = 12, std 2*sqrt(3)
    honest = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 6.0]])
    out = attacks.alie(honest, 1.5)
    assert out[0] == pytest.approx(2.0 - 1.5 * 1.0)
    assert out[1] == pytest.approx(2.0 - 1.5 * 2 * math.sqrt(3))
    assert torch.equal(attacks.alie(honest, 0.0), honest.mean(dim=0))
    with pytest.raises(ValueError, match="at least 2 honest updates"):
        attacks.alie(honest[:1], 1.0)


def test_alie_z_max_from_baruch_et_al() -> None:
    # n=5, f=1: s = floor(5/2 + 1) - 1 = 2; z = Phi^-1((5 - 2) / 5) = Phi^-1(0.6) = 0.2533
    assert attacks.alie_z_max(5, 1) == pytest.approx(0.253347, abs=1e-6)
    # n=10, f=3: s = 6 - 3 = 3; Phi^-1(0.7) = 0.5244
    assert attacks.alie_z_max(10, 3) == pytest.approx(0.524401, abs=1e-6)
    # n=4, f=1: s = 3 - 1 = 2; Phi^-1(0.5) = 0: the honest mean
    assert attacks.alie_z_max(4, 1) == 0.0
    with pytest.raises(ValueError, match="unbounded"):
        attacks.alie_z_max(4, 3)  # s = 3 - 3 = 0
    with pytest.raises(ValueError, match="0 < f < n"):
        attacks.alie_z_max(4, 0)


def test_flip_labels() -> None:
    x = torch.arange(10.0).reshape(1, 5, 2)
    tasks = TaskBatch(x, torch.tensor([[0, 1, 2, 3, 4]]), x[:, :2], torch.tensor([[4, 0]]))
    flipped = attacks.flip_labels(tasks, 5)
    # l -> 5 - 1 - l; the middle class (2) of an odd-way task keeps its label
    assert flipped.support_y.tolist() == [[4, 3, 2, 1, 0]]
    assert flipped.query_y.tolist() == [[0, 4]]
    assert torch.equal(flipped.support_x, x) and torch.equal(flipped.query_x, x[:, :2])
    regression = TaskBatch(x, torch.tensor([[1.5, -2.0]]), x, torch.tensor([[0.25]]))
    out = attacks.flip_labels(regression, 0)
    assert out.support_y.tolist() == [[-1.5, 2.0]] and out.query_y.tolist() == [[-0.25]]
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2"):
        attacks.flip_labels(tasks, 3)
    sample = attacks.flipped(lambda n: tasks, 5)
    assert sample(1).support_y.tolist() == [[4, 3, 2, 1, 0]]


# --------------------------------------------------------------------------- at the site

SITES = ["site-0", "site-1", "site-2", "site-3", "site-4"]


def config(tmp_path: Path, attack: dict[str, Any] | None, **federated: Any) -> ExperimentConfig:
    sites = [{"name": s, **({"attack": attack} if attack and s == "site-4" else {})}
             for s in SITES]
    return parse_config({
        "name": "attacks", "seed": 3, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
        "model": {"name": "sinusoid_mlp", "hidden": 8},
        "algorithm": {"name": "maml", "inner_lr": 0.01},
        "train": {"meta_batch": 10},
        "federated": {"topology": {"sites": sites}, **federated},
    })


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[EdgeNode, torch.Tensor]:
    """An honest site-4 and the meta-parameters (flat) it is sent."""
    cfg = config(tmp_path_factory.mktemp("honest"), None)
    edge = EdgeNode(in_process_site_jobs(cfg)["site-4"])
    torch.manual_seed(0)
    params = edge.algorithm.init_params()
    return edge, torch.from_numpy(edge.layout.pack(params))


def reply_vector(edge: EdgeNode, flat: torch.Tensor, round_idx: int) -> torch.Tensor:
    return torch.from_numpy(edge.round(flat.numpy(), round_idx).update)


def test_site_jobs_carry_the_topology_attack(tmp_path: Path) -> None:
    out = in_process_site_jobs(config(tmp_path, {"name": "sign_flip", "factor": 3}))
    assert all(out[s].attack is None for s in SITES[:4])
    assert out["site-4"].attack == Attack(name="sign_flip", factor=3.0, sigma=0.0, z=0.0,
                                          samples=0)
    # alie without z: Baruch et al.'s z_max for 5 sites called and 1 attacker (0.2533)
    alie = in_process_site_jobs(config(tmp_path, {"name": "alie"}))["site-4"].attack
    assert alie is not None and alie.samples == 4
    assert alie.z == pytest.approx(attacks.alie_z_max(5, 1))
    with pytest.raises(ValueError, match="parameters out of range"):
        Attack(name="gaussian", factor=0.0, sigma=0.0, z=0.0, samples=0)


@pytest.mark.parametrize(("attack", "expected"), [
    ({"name": "sign_flip", "factor": 2.0}, lambda u: -2.0 * u),
    ({"name": "scale", "factor": 10.0}, lambda u: 10.0 * u),
])
def test_update_attacks_at_the_site(honest: tuple[EdgeNode, torch.Tensor], tmp_path: Path,
                                    attack: dict[str, Any], expected: Any) -> None:
    good, flat = honest
    bad = EdgeNode(in_process_site_jobs(config(tmp_path, attack))["site-4"])
    clean, poisoned = good.round(flat.numpy(), 1), bad.round(flat.numpy(), 1)
    assert torch.allclose(torch.from_numpy(poisoned.update),
                          expected(torch.from_numpy(clean.update)))
    # otherwise a normal participant: same kind, task count and (honest) metrics
    assert (poisoned.kind, poisoned.num_tasks, poisoned.site) == (clean.kind, clean.num_tasks,
                                                                  clean.site)
    assert poisoned.metrics == clean.metrics


def test_gaussian_attack_is_seeded_by_seed_site_and_round(honest: tuple[EdgeNode, torch.Tensor],
                                                          tmp_path: Path) -> None:
    _, flat = honest
    job = in_process_site_jobs(config(tmp_path, {"name": "gaussian", "sigma": 0.1}))[
        "site-4"]
    bad = EdgeNode(job)
    r1, r2 = reply_vector(bad, flat, 1), reply_vector(bad, flat, 2)
    want = attacks.gaussian(flat, 0.1, torch.Generator().manual_seed(
        attack_seed(job.seed, "site-4", 1)))
    assert torch.equal(r1, want)
    assert not torch.equal(r1, r2)
    restarted = EdgeNode(job)  # a restarted actor (or a resumed run) sends the same noise
    assert torch.equal(reply_vector(restarted, flat, 1), r1)


def test_alie_attack_uses_honest_updates_the_site_computes(
        honest: tuple[EdgeNode, torch.Tensor], tmp_path: Path) -> None:
    good, flat = honest
    attack = {"name": "alie", "z": 1.0, "samples": 3}
    job = in_process_site_jobs(config(tmp_path, attack))["site-4"]
    out = reply_vector(EdgeNode(job), flat, 1)
    # By hand: three honest meta-gradients, one after the other on the round's task stream.
    sample = SiteTasks(job.learner["data"], job.data_plan, 1, job.seed).round_sampler([0], 1)
    params = good.layout.unpack(flat)
    rows = [FlatLayout.of(params).concat(local_update(good.algorithm, params, sample, 2).tensors)
            for _ in range(3)]
    assert torch.equal(rows[0], reply_vector(good, flat, 1))  # the first is the honest one
    stacked = torch.stack(rows)
    assert torch.allclose(out, stacked.mean(0) - stacked.std(0), atol=1e-6)


def test_label_flip_poisons_the_tasks_then_trains_honestly(
        honest: tuple[EdgeNode, torch.Tensor], tmp_path: Path) -> None:
    good, flat = honest
    job = in_process_site_jobs(config(tmp_path, {"name": "label_flip"}))["site-4"]
    out = reply_vector(EdgeNode(job), flat, 1)
    sample = SiteTasks(job.learner["data"], job.data_plan, 1, job.seed).round_sampler([0], 1)
    params = good.layout.unpack(flat)
    tasks = attacks.flip_labels(sample(2), 0)  # sinusoid: every target y -> -y
    want = FlatLayout.of(params).concat(good.algorithm.meta_update(params, tasks).tensors)
    assert torch.allclose(out, want, atol=1e-6)
    assert not torch.allclose(out, reply_vector(good, flat, 1))
