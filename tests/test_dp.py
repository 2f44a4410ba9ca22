"""Differential privacy without Ray: the noise source, clipping at the site, the cloud's noised
sum, adaptive clipping, the accountant against independent computations, the sampling the
accountant is told about, and the config errors.

The accountant checks recompute epsilon by hand: the RDP of the Poisson-subsampled Gaussian at
integer orders from its binomial expansion (Mironov, Talwar and Zhang, 2019), the RDP of the
plain Gaussian in closed form, the exact (epsilon, delta) curve of the Gaussian mechanism
(Balle and Wang, 2018), and fixed-size sampling composed round by round with the library's own
accountant, to hold the configuration-to-event mapping and the round composition.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp

from experiments import dp as edp
from experiments.config import ConfigError, FederatedConfig, parse_config
from privacy.accounting import (
    Accountant,
    RoundSampling,
    effective_noise_multiplier,
    gaussian_epsilon,
)
from privacy.dp import AdaptiveClip, DpSum, clip, l2_norm, release_at_site
from privacy.noise import GaussianNoise, secure_normals

NR = dp_accounting.NeighboringRelation


# --------------------------------------------------------------------------- noise

def test_secure_normals_are_standard_normal() -> None:
    z = secure_normals(1_000_001)
    assert z.shape == (1_000_001,) and z.dtype == np.float64
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert z.std() == pytest.approx(1.0, rel=0.005)
    # the shape, not only the scale: mass within 1 and 2 standard deviations, and the tails
    for k in (1.0, 2.0, 3.0):
        expected = math.erf(k / math.sqrt(2))
        assert np.mean(np.abs(z) < k) == pytest.approx(expected, abs=0.002)
    assert not np.array_equal(secure_normals(8), secure_normals(8))


def test_seeded_noise_repeats_per_stream_and_secure_noise_does_not() -> None:
    seeded = GaussianNoise(7)
    a = seeded.normals(1000, 2.0, (1, 2, 0))
    assert torch.equal(a, GaussianNoise(7).normals(1000, 2.0, (1, 2, 0)))
    assert not torch.equal(a, seeded.normals(1000, 2.0, (1, 3, 0)))
    assert not torch.equal(a, GaussianNoise(8).normals(1000, 2.0, (1, 2, 0)))
    assert a.std().item() == pytest.approx(2.0, rel=0.1)
    secure = GaussianNoise(None)
    assert secure.secure and not seeded.secure
    assert not torch.equal(secure.normals(16, 1.0, (0,)), secure.normals(16, 1.0, (0,)))
    assert torch.equal(secure.normals(5, 0.0, (0,)), torch.zeros(5, dtype=torch.float64))


# --------------------------------------------------------------------------- clipping, sums

def test_clip_bounds_the_norm_and_keeps_short_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):
        v = torch.randn(10_001, generator=g) * scale
        out, norm = clip(v, 0.7)
        assert norm == pytest.approx(l2_norm(v))
        assert l2_norm(out) <= 0.7
        if norm <= 0.7:
            assert torch.equal(out, v)
        else:
            assert l2_norm(out) == pytest.approx(0.7, rel=1e-5)
            assert torch.allclose(out / l2_norm(out), v / norm, atol=1e-6)  # same direction
    with pytest.raises(ValueError, match="bound must be > 0"):
        clip(torch.ones(3), 0.0)


def test_site_release_clips_each_unit_and_votes() -> None:
    units = [torch.full((100,), 1.0), torch.full((100,), 0.001), torch.full((100,), -2.0)]
    out = release_at_site(units, 1.0, 0.0, 0.0, GaussianNoise(0), "site-0", 3)
    expected = sum(u * min(1.0, 1.0 / l2_norm(u)) for u in units)
    assert torch.allclose(out.vector, expected, atol=1e-5)
    assert l2_norm(out.vector) <= 3.0  # each unit at most C
    assert out.vote == pytest.approx(-0.5 + 0.5 - 0.5)  # one of three within the bound
    assert out.units == 3 and out.norms[1] == pytest.approx(0.01)
    noised = release_at_site(units, 1.0, 0.3, 0.2, GaussianNoise(0), "site-0", 3)
    assert (noised.vector - out.vector).std().item() == pytest.approx(0.3, rel=0.3)
    assert noised.vote != out.vote


def random_units(n: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(dim, generator=g) * (0.5 + i) for i in range(n)]


def clipped_sum(vectors: list[torch.Tensor], bound: float) -> torch.Tensor:
    return sum(v.double() * min(1.0, bound / l2_norm(v)) for v in vectors)


@pytest.mark.parametrize("seed", [None, 11])
def test_the_released_sums_noise_has_std_z_times_c(seed: int | None) -> None:
    """Central noise: (release * m - sum of clipped updates) is N(0, (z C)^2) per coordinate,
    however many of the expected sites arrived (one of four is missing here)."""
    z, c, m, dim = 1.3, 0.5, 4.0, 40_000
    updates = [clip(u, c)[0] for u in random_units(3, dim, 1)]  # as the sites send them
    cloud = DpSum(z, m, m, distributed=False, vote_noise_std=None, noise=GaussianNoise(seed))
    out = cloud.release(updates, [c] * 3, None, c, round_idx=1, units=3)
    residual = out.vector.double() * m - clipped_sum(updates, c)
    assert residual.std().item() == pytest.approx(z * c, rel=0.03)
    assert abs(residual.mean().item()) < 5 * z * c / math.sqrt(dim)
    assert out.noise_std == pytest.approx(z * c) and out.reclipped == 0


def test_distributed_shares_add_up_to_z_times_c_and_the_cloud_tops_up() -> None:
    z, c, sites, dim = 1.3, 0.5, 4, 40_000
    share = z / math.sqrt(sites)
    raw = random_units(sites, dim, 2)
    releases = [release_at_site([u], c, share * c, 0.0, GaussianNoise(None), f"site-{i}", 5)
                for i, u in enumerate(raw)]
    cloud = DpSum(z, sites, sites, distributed=True, vote_noise_std=None,
                  noise=GaussianNoise(None))
    everyone = cloud.release([r.vector for r in releases], [c] * sites, None, c, 5, sites)
    assert everyone.noise_std == 0.0  # all shares arrived: the cloud adds nothing
    residual = everyone.vector.double() * sites - clipped_sum(raw, c)
    assert residual.std().item() == pytest.approx(z * c, rel=0.03)

    # one site dropped: what the cloud sees has sqrt(3/4) of the noise; it tops the rest up
    seen = sum(r.vector.double() for r in releases[:3]) - clipped_sum(raw[:3], c)
    assert seen.std().item() == pytest.approx(z * c * math.sqrt(3 / 4), rel=0.03)
    three = cloud.release([r.vector for r in releases[:3]], [c] * 3, None, c, 5, 3)
    assert three.noise_std == pytest.approx(z * c / 2)
    residual = three.vector.double() * sites - clipped_sum(raw[:3], c)
    assert residual.std().item() == pytest.approx(z * c, rel=0.03)


def test_the_cloud_reclips_an_update_over_its_bound_with_central_noise() -> None:
    cloud = DpSum(1.0, 2, 2, distributed=False, vote_noise_std=None, noise=GaussianNoise(0))
    big = torch.full((50,), 10.0)
    out = cloud.release([big, big / 1000], [1.0, 1.0], None, 1.0, 1, 2)
    assert out.reclipped == 1


def test_votes_estimate_the_unclipped_share_and_move_the_bound_to_its_quantile() -> None:
    cloud = DpSum(1.0, 10, 10, distributed=False, vote_noise_std=None, noise=GaussianNoise(0))
    exact = cloud.release([torch.zeros(4)], [1.0], [3 - 3.5], 1.0, 1, units=7)
    assert exact.unclipped_fraction == pytest.approx(3 / 7)  # trusted cloud: exact
    noised = DpSum(1.0, 10, 10, distributed=False, vote_noise_std=0.5, noise=GaussianNoise(0))
    assert noised.release([torch.zeros(4)], [1.0], [-0.5], 1.0, 1, 7).unclipped_fraction \
        != pytest.approx(0.45)

    # Norms of 100 units uniform on (0, 2): the median is 1. Private votes, 400 rounds.
    rng = np.random.default_rng(0)
    adaptive = AdaptiveClip(clip_norm=0.1, target_quantile=0.5, lr=0.2)
    cloud = DpSum(1.0, 100, 100, distributed=False, vote_noise_std=5.0, noise=GaussianNoise(3))
    for r in range(1, 401):
        norms = rng.uniform(0, 2, 100)
        vote = float(np.sum((norms <= adaptive.clip_norm) - 0.5))
        fraction = cloud.release([torch.zeros(4)], [1.0], [vote], adaptive.clip_norm, r,
                                 100).unclipped_fraction
        assert fraction is not None
        adaptive.update(fraction)
    assert adaptive.clip_norm == pytest.approx(1.0, abs=0.15)


# --------------------------------------------------------------------------- the accountant

def log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def poisson_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order alpha of the Poisson-subsampled Gaussian, from the binomial
    expansion of E[(mixture / base)^alpha] (Mironov, Talwar, Zhang 2019, Section 3.3)."""
    log_a = -math.inf
    for k in range(alpha + 1):
        term = (math.log(math.comb(alpha, k)) + (alpha - k) * math.log1p(-q)
                + k * math.log(q) + (k * k - k) / (2 * sigma ** 2))
        log_a = log_add(log_a, term)
    return log_a / (alpha - 1)


def rdp_to_epsilon(orders: list[float], rdps: list[float], delta: float) -> float:
    """Epsilon from RDP curve (Canonne, Kamath, Steinke 2020, Proposition 12), minimised."""
    return max(0.0, min(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                        for a, r in zip(orders, rdps, strict=True)))


def gaussian_exact_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon at delta of the Gaussian mechanism with sensitivity 1 and std sigma
    (Balle and Wang 2018, Theorem 8), by bisection."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("q", "sigma", "rounds"), [(0.1, 1.1, 100), (0.5, 2.0, 30),
                                                     (0.02, 0.8, 1000)])
def test_poisson_epsilon_matches_a_computation_by_hand(q: float, sigma: float,
                                                       rounds: int) -> None:
    delta = 1e-5
    orders = list(range(2, 129))
    by_hand = rdp_to_epsilon(orders, [rounds * poisson_gaussian_rdp(q, sigma, a)
                                      for a in orders], delta)
    library = rdp.RdpAccountant(orders, NR.ADD_OR_REMOVE_ONE)
    library.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    assert library.get_epsilon(delta) == pytest.approx(by_hand, rel=1e-6)
    ours = Accountant.of(RoundSampling("poisson", 100, rate=q), sigma, delta).epsilon(rounds)
    assert ours <= by_hand * (1 + 1e-9)  # the default orders include fractional ones
    assert ours == pytest.approx(by_hand, rel=0.05)


def test_full_participation_is_the_gaussian_mechanism_composed() -> None:
    sigma, rounds, delta = 3.0, 50, 1e-5
    accountant = Accountant.of(RoundSampling("full", 4), sigma, delta)
    orders = list(rdp.RdpAccountant().orders)
    closed_form = rdp_to_epsilon(orders, [rounds * a / (2 * sigma ** 2) for a in orders], delta)
    assert accountant.epsilon(rounds) == pytest.approx(closed_form, rel=1e-9)
    # T Gaussian mechanisms of std sigma are one of std sigma / sqrt(T): its exact epsilon is
    # below the RDP bound, and the PLD accountant is nearly exact
    exact = gaussian_exact_epsilon(sigma / math.sqrt(rounds), delta)
    assert exact < accountant.epsilon(rounds) < 1.3 * exact
    tight = Accountant.of(RoundSampling("full", 4), sigma, delta, "pld").epsilon(rounds)
    assert tight == pytest.approx(exact, rel=0.01)


def test_fixed_size_sampling_is_replace_one_with_half_the_multiplier() -> None:
    n, k, sigma, rounds, delta = 10, 3, 2.0, 20, 1e-4
    ours = Accountant.of(RoundSampling("fixed", n, sample=k), sigma, delta)
    by_rounds = rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        n, k, dp_accounting.GaussianDpEvent(sigma / 2))
    for _ in range(rounds):  # composed one round at a time, as the run does
        by_rounds.compose(event)
    assert ours.epsilon(rounds) == pytest.approx(by_rounds.get_epsilon(delta), rel=1e-9)
    naive = rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    naive.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        n, k, dp_accounting.GaussianDpEvent(sigma)), rounds))
    assert ours.epsilon(rounds) > naive.get_epsilon(delta)  # sensitivity 2C, not C
    with pytest.raises(ValueError, match="PLD accountant does not support"):
        Accountant.of(RoundSampling("fixed", n, sample=k), sigma, delta, "pld")


def test_pld_and_rdp_agree_on_poisson_sampling() -> None:
    sampling = RoundSampling("poisson", 100, rate=0.1)
    a = Accountant.of(sampling, 1.0, 1e-5).epsilon(100)
    b = Accountant.of(sampling, 1.0, 1e-5, "pld").epsilon(100)
    assert b < a < 1.3 * b


def test_rounds_within_a_target_and_epsilon_grows() -> None:
    accountant = Accountant.of(RoundSampling("poisson", 50, rate=0.2), 1.0, 1e-4)
    eps = [accountant.epsilon(t) for t in range(0, 60)]
    assert eps[0] == 0.0 and np.all(np.diff(eps) > 0)
    r = accountant.rounds_within(4.0, 1000)
    assert accountant.epsilon(r) <= 4.0 < accountant.epsilon(r + 1)
    assert accountant.rounds_within(1e9, 40) == 40
    assert accountant.rounds_within(eps[1] / 2, 40) == 0


def test_clipping_votes_and_the_cloud_view_compose_as_gaussians() -> None:
    z, sigma_b = 1.0, 2.0
    combined = effective_noise_multiplier(z, sigma_b)
    # the pair (sum / (z C), votes / sigma_b) has sensitivity sqrt(1/z^2 + (1/2)^2 / sigma_b^2)
    assert combined == pytest.approx(1 / math.sqrt(1 / z ** 2 + 0.25 / sigma_b ** 2))
    assert effective_noise_multiplier(z, None) == z
    multipliers = [1.0, 2.0, 0.7]
    by_hand = rdp.RdpAccountant(neighboring_relation=NR.REPLACE_SPECIAL)
    for m in multipliers:
        by_hand.compose(dp_accounting.GaussianDpEvent(m))
    precision = sum(m ** -2 for m in multipliers)
    assert gaussian_epsilon(precision, 1e-5) == pytest.approx(by_hand.get_epsilon(1e-5),
                                                              rel=1e-9)
    exact = pld.PLDAccountant(NR.REPLACE_SPECIAL)
    exact.compose(dp_accounting.GaussianDpEvent(precision ** -0.5))
    assert gaussian_epsilon(precision, 1e-5, "pld") == pytest.approx(
        exact.get_epsilon(1e-5), rel=1e-9)
    assert gaussian_epsilon(0.0, 1e-5) == 0.0


# --------------------------------------------------------------------------- the run's plan

def fed_config(tmp_path: Path, privacy: dict[str, Any] | None = None,
               **federated: Any) -> FederatedConfig:
    base = {"unit": "site", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}
    cfg = parse_config({
        "name": "dp", "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid"}, "model": {"name": "sinusoid_mlp"},
        "algorithm": {"name": "maml"}, "train": {"meta_batch": 8, "steps": 10},
        "federated": {"topology": {"sites": 4, "devices": 5}, "personalize_episodes": 0,
                      **federated, "privacy": {**base, **(privacy or {})}},
    })
    assert cfg.federated is not None
    return cfg.federated


DEVICES = {f"site-{i}": 5 for i in range(4)}


@pytest.mark.parametrize(("privacy", "federated", "kind", "population", "rate", "units"), [
    ({}, {}, "full", 4, 1.0, 4.0),
    ({}, {"site_fraction": 0.5}, "fixed", 4, 0.5, 2.0),
    ({"sampling": "poisson"}, {"site_fraction": 0.5}, "poisson", 4, 0.5, 2.0),
    ({"unit": "device"}, {}, "full", 20, 1.0, 20.0),
    ({"unit": "device"}, {"devices_per_round": 2, "site_fraction": 0.5}, "fixed", 5, 0.4, 4.0),
    ({"unit": "device", "sampling": "poisson"}, {"devices_per_round": 2}, "poisson", 5, 0.4,
     8.0),
])
def test_the_accountant_is_told_the_sampling_the_driver_does(
        tmp_path: Path, privacy: dict, federated: dict, kind: str, population: int,
        rate: float, units: float) -> None:
    fed = fed_config(tmp_path, privacy, **federated)
    sampling = edp.round_sampling(fed, DEVICES)
    assert (sampling.kind, sampling.population) == (kind, population)
    if kind == "fixed":
        assert sampling.sample / sampling.population == pytest.approx(rate)
    elif kind == "poisson":
        assert sampling.rate == pytest.approx(rate)
    assert edp.expected_counts(fed, DEVICES)[0] == pytest.approx(units)
    # and the driver draws that many on average
    counts = []
    for r in range(1, 401):
        chosen = edp.choose(list(DEVICES), DEVICES, fed.model_copy(update={
            "privacy": fed.privacy.model_copy(update={"seed": 5})}), r)
        counts.append(len(chosen) if fed.privacy.unit == "site"
                      else sum(len(d) for d in chosen.values()))
    assert np.mean(counts) == pytest.approx(units, rel=0.1)


def test_participants_are_secret_unless_seeded(tmp_path: Path) -> None:
    fed = fed_config(tmp_path, {"sampling": "poisson"}, site_fraction=0.5)
    draws = {tuple(edp.choose(list(DEVICES), DEVICES, fed, 1)) for _ in range(40)}
    assert len(draws) > 1  # the CSPRNG, not (seed, round)
    seeded = fed.model_copy(update={"privacy": fed.privacy.model_copy(update={"seed": 1})})
    assert edp.choose(list(DEVICES), DEVICES, seeded, 3) == \
        edp.choose(list(DEVICES), DEVICES, seeded, 3)


def test_sites_get_their_noise_share_only_when_noise_is_distributed(tmp_path: Path) -> None:
    central = edp.site_privacy(fed_config(tmp_path), DEVICES)
    assert central is not None
    assert (central.noise_multiplier_share, central.vote_noise_std_share) == (0.0, 0.0)
    assert central.keep_metrics and central.report_votes
    fed = fed_config(tmp_path, {"noise": "distributed", "noise_multiplier": 2.0,
                                "adaptive_clip": {"count_noise_std": 0.8}})
    shares = edp.site_privacy(fed, DEVICES)
    assert shares is not None
    assert shares.noise_multiplier_share == pytest.approx(2.0 / math.sqrt(4))
    assert shares.vote_noise_std_share == pytest.approx(0.8 / math.sqrt(4))
    assert not shares.keep_metrics and shares.report_votes
    plain = edp.site_privacy(fed_config(tmp_path, {"noise": "distributed"}), DEVICES)
    assert plain is not None and not plain.report_votes  # nothing un-noised leaves the site


def test_a_target_below_one_round_is_refused_and_a_target_shortens_the_run(
        tmp_path: Path) -> None:
    tiny = fed_config(tmp_path, {"target_epsilon": 1e-3})
    with pytest.raises(ConfigError, match="below the epsilon of a single round"):
        edp.CloudPrivacy.start(tiny, DEVICES, 10)
    fed = fed_config(tmp_path, {"target_epsilon": 3.0, "noise_multiplier": 2.0})
    cloud = edp.CloudPrivacy.start(fed, DEVICES, 100)
    assert cloud is not None and cloud.stops_early and 0 < cloud.rounds < 100
    assert cloud.epsilon(cloud.rounds) <= 3.0 < cloud.epsilon(cloud.rounds + 1)
    assert "training stops after round" in cloud.describe()


@pytest.mark.parametrize(("privacy", "federated", "message"), [
    ({}, {"aggregator": {"name": "median"}}, "leave aggregator at weighted_mean"),
    ({}, {"aggregator": {"name": "clip_noise", "clip_norm": 1.0}}, "got 'clip_noise'"),
    ({"noise": "distributed"}, {"personalize_episodes": 5}, "set federated.personalize_episodes"),
    ({"delta": 0.3}, {}, "delta 0.3 is not below 1 / 4 sites"),
    ({"unit": "device", "delta": 0.06}, {}, "delta 0.06 is not below 1 / 20 devices"),
    ({"accountant": "pld"}, {"site_fraction": 0.5}, "no event for fixed-size sampling"),
    ({"noise_multiplier": 0}, {}, "noise_multiplier"),
    ({"unit": "sites"}, {}, "federated.privacy.unit"),
    ({"clip": 1.0}, {}, "federated.privacy.clip: unknown key"),
    ({"adaptive_clip": {"target_quantile": 1.5, "count_noise_std": 1}}, {}, "target_quantile"),
    ({"adaptive_clip": {"clip_lr": 0.1}}, {}, "count_noise_std"),
])
def test_privacy_configs_that_cannot_work_name_the_problem(tmp_path: Path, privacy: dict,
                                                           federated: dict,
                                                           message: str) -> None:
    with pytest.raises(ConfigError) as err:
        fed_config(tmp_path, privacy, **federated)
    assert message in str(err.value)


def test_unit_is_required_and_device_units_need_a_task_each(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"federated\.privacy\.unit: Field required"):
        parse_config({"data": {"dataset": "sinusoid"}, "model": {"name": "sinusoid_mlp"},
                      "federated": {"privacy": {"clip_norm": 1, "noise_multiplier": 1,
                                                "delta": 1e-5}}})
    fed = fed_config(tmp_path, {"unit": "device"})
    with pytest.raises(ConfigError, match="5 devices per site and round share 2 tasks"):
        edp.check_fits(fed, DEVICES, per_site=2)
    edp.check_fits(fed, DEVICES, per_site=5)


def test_a_checkpoint_accounted_otherwise_is_not_resumed(tmp_path: Path) -> None:
    cloud = edp.CloudPrivacy.start(fed_config(tmp_path), DEVICES, 10)
    assert cloud is not None
    state = cloud.state_dict()
    cloud.load_state_dict(state)  # the same privacy: fine
    other = edp.CloudPrivacy.start(fed_config(tmp_path, {"noise_multiplier": 2.0}), DEVICES, 10)
    assert other is not None
    with pytest.raises(ConfigError, match="privacy changed since the latest"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="written without federated"):
        cloud.load_state_dict(None)
    later = edp.CloudPrivacy.start(fed_config(tmp_path, {"target_epsilon": 50.0,
                                                         "delta": 1e-4}), DEVICES, 10)
    assert later is not None
    later.load_state_dict(state)  # a new target or delta re-reads the same rounds
