"""Aggregation rules against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.aggregation import (
    Bulyan,
    ClipAndNoise,
    CoordinateMedian,
    FlatUpdate,
    Krum,
    MultiKrum,
    NormBound,
    TrimmedMean,
    WeightedMean,
    global_norm,
    krum_scores,
    mean_around_median,
    pairwise_sq_distances,
)
from metalearn.algorithms.base import MetaUpdate
from metalearn.params import FlatLayout, Params


def upd(values: list[float], n: int = 1, kind: str = "gradient") -> FlatUpdate:
    """An update of a model with one 1-D tensor ``w`` and a 1x1 tensor ``b`` (= the first
    value), flat as it comes off the wire (``b`` last)."""
    return FlatUpdate(kind, torch.tensor([*values, values[0]]), n)


def vec(values: list[float], n: int = 1) -> FlatUpdate:
    """An update that is exactly ``values`` (for distances worked out by hand)."""
    return FlatUpdate("gradient", torch.tensor(values), n)


def named(vector: torch.Tensor) -> Params:
    """An aggregate of :func:`upd` updates, by name again."""
    n = vector.numel() - 1
    return FlatLayout.of({"w": torch.zeros(n), "b": torch.zeros(1, 1)}).unpack(vector)


def test_flat_update_of_a_meta_update_follows_the_layout() -> None:
    layout = FlatLayout.of({"w": torch.zeros(2), "b": torch.zeros(1, 1)})
    flat = FlatUpdate.of(MetaUpdate("delta", {"b": torch.tensor([[3.0]]),
                                              "w": torch.tensor([1.0, 2.0])}, 4), layout)
    assert torch.equal(flat.vector, torch.tensor([1.0, 2.0, 3.0]))
    assert flat.kind == "delta" and flat.num_tasks == 4


def test_weighted_mean_weights_by_task_count() -> None:
    # (1*[1, 2] + 3*[5, 6]) / 4 = [4, 5]
    out = named(WeightedMean().aggregate([upd([1.0, 2.0], n=1), upd([5.0, 6.0], n=3)]))
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0]))
    assert out["b"].shape == (1, 1) and float(out["b"]) == pytest.approx(4.0)


def test_weighted_mean_of_one_update_is_that_update() -> None:
    out = named(WeightedMean().aggregate([upd([0.5, -2.0], n=7)]))
    assert torch.equal(out["w"], torch.tensor([0.5, -2.0]))


def test_median_odd_and_even() -> None:
    ups = [upd([1.0, 10.0]), upd([3.0, -4.0]), upd([100.0, 0.0])]
    assert torch.equal(named(CoordinateMedian().aggregate(ups))["w"], torch.tensor([3.0, 0.0]))
    # even count: mean of the two middle values; [1, 3, 7, 100] -> 5; [-4, 0, 2, 10] -> 1
    ups.append(upd([7.0, 2.0]))
    assert torch.equal(named(CoordinateMedian().aggregate(ups))["w"], torch.tensor([5.0, 1.0]))


def test_median_ignores_task_counts() -> None:
    ups = [upd([0.0], n=1000), upd([1.0], n=1), upd([2.0], n=1)]
    assert float(named(CoordinateMedian().aggregate(ups))["w"]) == 1.0


def test_trimmed_mean_drops_extremes() -> None:
    # 10 updates 0..9 with trim 0.1: drop 0 and 9, mean of 1..8 = 4.5
    ups = [upd([float(i), float(-i)]) for i in range(10)]
    out = named(TrimmedMean(0.1).aggregate(ups))
    assert torch.allclose(out["w"], torch.tensor([4.5, -4.5]))
    # an outlier is trimmed away: [1, 2, 3, 1000] with trim 0.25 -> mean of [2, 3] = 2.5
    out = named(TrimmedMean(0.25).aggregate([upd([1.0]), upd([1000.0]), upd([2.0]),
                                             upd([3.0])]))
    assert float(out["w"]) == pytest.approx(2.5)
    # fewer updates than 1 / trim: nothing is dropped, plain mean
    assert float(named(TrimmedMean(0.1).aggregate([upd([1.0]), upd([4.0])]))["w"]) == 2.5


def test_global_norm_spans_all_tensors() -> None:
    assert global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == 5.0
    assert global_norm(torch.tensor([3.0, 4.0])) == 5.0


def test_clip_scales_to_the_norm_and_keeps_small_updates() -> None:
    clip = ClipAndNoise(WeightedMean(), clip_norm=1.0, noise_multiplier=0.0, seed=0)
    big = FlatUpdate("gradient", torch.tensor([3.0, 4.0]), 1)  # a = 3, b = 4
    small = FlatUpdate("gradient", torch.tensor([0.3, 0.4]), 1)
    clipped = clip.clip(big)
    assert torch.allclose(clipped.vector[:1], torch.tensor([0.6]))
    assert torch.allclose(clipped.vector[1:], torch.tensor([0.8]))
    assert torch.equal(clip.clip(small).vector[:1], torch.tensor([0.3]))
    # aggregate: mean of [0.6, 0.8] and [0.3, 0.4] = [0.45, 0.6]; no noise
    out = clip.aggregate([big, small])
    assert torch.allclose(out[:1], torch.tensor([0.45])) and torch.allclose(
        out[1:], torch.tensor([0.6]))


def test_noise_has_the_documented_scale_and_is_reproducible() -> None:
    zeros = [FlatUpdate("delta", torch.zeros(20000), 1) for _ in range(4)]
    agg = ClipAndNoise(WeightedMean(), clip_norm=2.0, noise_multiplier=1.0, seed=3)
    state = agg.state_dict()
    first = agg.aggregate(zeros)
    # std = noise_multiplier * clip_norm / n = 1 * 2 / 4 = 0.5
    assert float(first.std()) == pytest.approx(0.5, rel=0.03)
    agg.load_state_dict(state)
    assert torch.equal(agg.aggregate(zeros), first)
    again = ClipAndNoise(WeightedMean(), 2.0, 1.0, seed=3).aggregate(zeros)
    assert torch.equal(again, first)


def test_mixed_kinds_and_mismatched_tensors_are_errors() -> None:
    with pytest.raises(ValueError, match="different kinds"):
        WeightedMean().aggregate([upd([1.0]), upd([1.0], kind="delta")])
    with pytest.raises(ValueError, match="shape"):
        WeightedMean().aggregate([upd([1.0]), upd([1.0, 2.0])])
    with pytest.raises(ValueError, match="no updates"):
        CoordinateMedian().aggregate([])
    with pytest.raises(ValueError, match="no tasks"):
        WeightedMean().aggregate([upd([1.0], n=0)])
    with pytest.raises(ValueError, match="trim must be"):
        TrimmedMean(0.5)


def test_aggregators_from_config_sections() -> None:
    """The config's ``federated.aggregator`` union builds each rule once, with its values."""
    from experiments.config import ConfigError, FederatedConfig, parse_config

    def build(section: dict | None) -> object:
        if section is None:
            return FederatedConfig().aggregator.build()
        # enough sites and quorum for every rule here (krum with f=2 needs 7)
        fed = FederatedConfig(topology=11, quorum=11, aggregator=section)
        return fed.aggregator.build()

    assert isinstance(build(None), WeightedMean)
    assert isinstance(build({"name": "median"}), CoordinateMedian)
    trimmed = build({"name": "trimmed_mean", "trim": 0.2})
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim == 0.2
    dp = build({"name": "clip_noise", "inner": {"name": "median"},
                "clip_norm": 1.5, "noise_multiplier": 0.1, "seed": 1})
    assert isinstance(dp, ClipAndNoise) and isinstance(dp.inner, CoordinateMedian)
    assert math.isclose(dp.clip_norm, 1.5)
    krum = build({"name": "krum", "f": 2})
    assert isinstance(krum, Krum) and (krum.f, krum.m) == (2, 1)
    multi = build({"name": "multi_krum", "f": 1, "m": 3})
    assert isinstance(multi, MultiKrum) and (multi.f, multi.m) == (1, 3)
    assert build({"name": "multi_krum"}).m is None  # defaults: f=1, m = n - f each round
    bulyan = build({"name": "bulyan", "f": 0})
    assert isinstance(bulyan, Bulyan) and bulyan.f == 0
    bound = build({"name": "norm_bound", "max_norm": 2.0, "inner": {"name": "krum", "f": 0}})
    assert isinstance(bound, NormBound) and isinstance(bound.inner, Krum)
    assert build({"name": "norm_bound", "max_norm": 2.0}).inner.name == "weighted_mean"
    for section, message in [({"name": "mode"}, "unknown aggregator"),
                             ({"name": "trimmed_mean", "trimm": 0.1}, "trimmed_mean"),
                             ({"name": "trimmed_mean", "trim": 0.5}, "trim must be"),
                             ({"name": "krum", "f": -1}, "greater than or equal to 0"),
                             ({"name": "krum", "m": 2}, "krum.m: unknown key"),
                             ({"name": "multi_krum", "m": 0}, "greater than or equal to 1"),
                             ({"name": "norm_bound"}, "max_norm"),
                             ({"name": "norm_bound", "max_norm": 0}, "greater than 0")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"federated": {"aggregator": section}})


# --------------------------------------------------------------------------- Byzantine-robust

# Five 2-D updates, the last one far off. Squared distances, worked out by hand:
#   A=(0,0) B=(1,0) C=(0,2) D=(1,1) E=(10,10)
#   AB=1  AC=4  AD=2  AE=200  BC=5  BD=1  BE=181  CD=2  CE=164  DE=162
# With f=1, n=5 each update's score sums its n-f-2 = 2 nearest others:
#   A: 1+2=3   B: 1+1=2   C: 2+4=6   D: 1+2=3   E: 162+164=326
FIVE = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]


def test_krum_scores_by_hand() -> None:
    sq = pairwise_sq_distances(torch.tensor(FIVE))
    assert sq[0].tolist() == [0.0, 1.0, 4.0, 2.0, 200.0] and torch.equal(sq, sq.T)
    assert krum_scores(sq, 1).tolist() == [3.0, 2.0, 6.0, 3.0, 326.0]
    # f=0 on the same updates: 3 nearest. B: 1+1+5=7
    assert krum_scores(sq, 0)[1] == 7.0


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    out = Krum(1).aggregate([vec(p) for p in FIVE])
    assert out.tolist() == [1.0, 0.0]  # B, lowest score 2
    # The weighted mean is dragged by E: ((0+1+0+1+10)/5, (0+0+2+1+10)/5) = (2.4, 2.6)
    assert torch.allclose(WeightedMean().aggregate([vec(p) for p in FIVE]),
                          torch.tensor([2.4, 2.6]))
    # Task counts change nothing: E claiming 1000 tasks is still out.
    ups = [vec(p, n=1000 if i == 4 else 1) for i, p in enumerate(FIVE)]
    assert Krum(1).aggregate(ups).tolist() == [1.0, 0.0]


def test_multi_krum_averages_the_m_best() -> None:
    ups = [vec(p) for p in FIVE]
    # m=3: B (2), A (3), D (3) -> ((1+0+1)/3, (0+0+1)/3) = (2/3, 1/3)
    assert torch.allclose(MultiKrum(1, 3).aggregate(ups), torch.tensor([2 / 3, 1 / 3]))
    # m=None: n - f = 4 best, B A D C -> ((1+0+1+0)/4, (0+0+1+2)/4) = (0.5, 0.75)
    assert MultiKrum(1, None).selected(ups) == [0, 1, 2, 3]
    assert torch.allclose(MultiKrum(1, None).aggregate(ups), torch.tensor([0.5, 0.75]))
    # Equal scores (A and D, both 3) go to the update that came first: m=2 is B and A.
    assert MultiKrum(1, 2).selected(ups) == [0, 1]
    # f=0, m=n: every update, the plain mean (2.4, 2.6)
    assert torch.allclose(MultiKrum(0, 5).aggregate(ups), torch.tensor([2.4, 2.6]))


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    four = [vec(p) for p in FIVE[:4]]
    with pytest.raises(ValueError, match=r"krum: needs more than 2f\+2 = 4 updates \(f=1\), got 4"):
        Krum(1).aggregate(four)
    assert Krum(1).min_updates() == 5 and Krum(0).min_updates() == 3
    # Multi-Krum with m also needs n >= m + f, or an assumed attacker must be averaged in.
    assert MultiKrum(1, 5).min_updates() == 6
    with pytest.raises(ValueError, match=r"at least m\+f = 6 \(m=5\), got 5"):
        MultiKrum(1, 5).aggregate([vec(p) for p in FIVE])
    with pytest.raises(ValueError, match=r"f .* must be >= 0"):
        Krum(-1)
    with pytest.raises(ValueError, match=r"m .* must be >= 1"):
        MultiKrum(1, 0)
    with pytest.raises(ValueError, match="different kinds"):
        Krum(0).aggregate([vec([1.0]), vec([2.0]), FlatUpdate("delta", torch.ones(1), 1)])


def test_bulyan_by_hand() -> None:
    # n=7, f=1 (n >= 4f+3 = 7): select theta = n-2f = 5 by Krum, one at a time; then per
    # coordinate average the beta = theta-2f = 3 values closest to the median.
    values = [0.0, 1.0, 3.0, 4.0, 7.0, 9.0, 50.0]
    # Krum on what is left; neighbours n'-f-2, at least 1 (squared distances in brackets):
    #  {0,1,3,4,7,9,50}, 4 nearest: 3 -> 0+4 [9] 1 [4] 4 [1] 7 [16] = 1+4+9+16 = 30 (best;
    #      0: 1+9+16+49=75, 1: 1+4+9+36=50, 4: 1+9+9+16=35, 7: 9+16+4+36=65, 9: 4+25+36+64=129)
    #  {0,1,4,7,9,50}, 3 nearest: 4 -> 9+9+16 = 34 (0: 66, 1: 46, 7: 9+4+36=49, 9: 93)
    #  {0,1,7,9,50}, 2 nearest: 1 -> 1+36 = 37 (0: 1+49=50, 7: 4+36=40, 9: 4+64=68)
    #  {0,7,9,50}, 1 nearest: 7 and 9 -> 4 each (tie: 7 came first), 0 -> 49
    #  {0,9,50}, 1 nearest: 0 and 9 -> 81 each (tie: 0 came first), 50 -> 1681
    ups = [vec([v]) for v in values]
    assert [values[i] for i in Bulyan(1).selected(ups)] == [3.0, 4.0, 1.0, 7.0, 0.0]
    # Selected, sorted: 0 1 3 4 7; median 3; distances 3 2 0 1 4 -> keep 3, 4, 1 -> 8/3
    assert float(Bulyan(1).aggregate(ups)) == pytest.approx(8 / 3)
    # (the mean of all seven: 74/7 = 10.57)


def test_bulyan_trims_each_coordinate_around_the_median() -> None:
    # f=0: theta = beta = n, every update and every value kept: the plain mean.
    ups = [vec([1.0, 10.0]), vec([2.0, 20.0]), vec([6.0, 0.0])]
    assert torch.allclose(Bulyan(0).aggregate(ups), torch.tensor([3.0, 10.0]))
    # The second stage, column by column. Five rows, beta = 3:
    #   column 0: 0 1 2 3 100 -> median 2, distances 2 1 0 1 98 -> 1 2 3 -> 2
    #   column 1: -50 4 5 9 10 -> median 5, distances 55 1 0 4 5 -> 4 5 9 -> 6
    stacked = torch.tensor([[0.0, 9.0], [1.0, -50.0], [2.0, 5.0], [3.0, 10.0], [100.0, 4.0]])
    assert mean_around_median(stacked, 3).tolist() == [2.0, 6.0]
    # Even count: median 3 between 2 and 4 of 0 2 4 10; beta 1 keeps the smaller, 2;
    # beta 3: 2, 4 (distance 1), then 0 (3) before 10 (7) -> 2
    even = torch.tensor([[0.0], [2.0], [4.0], [10.0]])
    assert mean_around_median(even, 1).tolist() == [2.0]
    assert mean_around_median(even, 3).tolist() == [2.0]
    with pytest.raises(ValueError, match=r"beta must be in 1\.\.4"):
        mean_around_median(even, 0)


def test_bulyan_needs_4f_plus_3_updates() -> None:
    with pytest.raises(ValueError,
                       match=r"bulyan: needs at least 4f\+3 = 7 updates \(f=1\), got 6"):
        Bulyan(1).aggregate([vec([float(i)]) for i in range(6)])
    assert Bulyan(2).min_updates() == 11
    with pytest.raises(ValueError, match="must be >= 0"):
        Bulyan(-1)


def test_norm_bound_clips_then_aggregates_with_the_inner_rule() -> None:
    # [3, 4] has norm 5: clipped to norm 1 -> [0.6, 0.8]; [0.3, 0.4] (norm 0.5) stays.
    # Inner weighted mean with task counts 1 and 3: (1*[0.6, 0.8] + 3*[0.3, 0.4]) / 4
    # = [0.375, 0.5]
    ups = [vec([3.0, 4.0], n=1), vec([0.3, 0.4], n=3)]
    assert torch.allclose(NormBound(WeightedMean(), 1.0).aggregate(ups),
                          torch.tensor([0.375, 0.5]))
    # A boosted update (x100) moves the bounded mean no more than one of norm 1 would.
    boosted = [vec([0.3, 0.4], n=1), vec([30.0, 40.0], n=1)]
    assert torch.allclose(NormBound(WeightedMean(), 1.0).aggregate(boosted),
                          torch.tensor([0.45, 0.6]))
    # Its needs are the inner rule's.
    assert NormBound(Krum(1), 1.0).min_updates() == 5
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        NormBound(WeightedMean(), 0.0)


def test_which_rules_need_individual_updates() -> None:
    """Secure aggregation will leave the cloud only the (weighted) sum of the updates."""
    assert not WeightedMean.needs_individual_updates
    for rule in (CoordinateMedian, TrimmedMean, Krum, MultiKrum, Bulyan, NormBound,
                 ClipAndNoise):
        assert rule.needs_individual_updates, rule.name
