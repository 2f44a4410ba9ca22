"""Aggregation rules against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.aggregation import (
    ClipAndNoise,
    CoordinateMedian,
    FlatUpdate,
    TrimmedMean,
    WeightedMean,
    global_norm,
)
from metalearn.algorithms.base import MetaUpdate
from metalearn.params import FlatLayout, Params


def upd(values: list[float], n: int = 1, kind: str = "gradient") -> FlatUpdate:
    """An update of a model with one 1-D tensor ``w`` and a 1x1 tensor ``b`` (= the first
    value), flat as it comes off the wire (``b`` last)."""
    return FlatUpdate(kind, torch.tensor([*values, values[0]]), n)


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
        fed = FederatedConfig() if section is None else FederatedConfig(aggregator=section)
        return fed.aggregator.build()

    assert isinstance(build(None), WeightedMean)
    assert isinstance(build({"name": "median"}), CoordinateMedian)
    trimmed = build({"name": "trimmed_mean", "trim": 0.2})
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim == 0.2
    dp = build({"name": "clip_noise", "inner": {"name": "median"},
                "clip_norm": 1.5, "noise_multiplier": 0.1, "seed": 1})
    assert isinstance(dp, ClipAndNoise) and isinstance(dp.inner, CoordinateMedian)
    assert math.isclose(dp.clip_norm, 1.5)
    for section, message in [({"name": "mode"}, "unknown aggregator"),
                             ({"name": "trimmed_mean", "trimm": 0.1}, "trimmed_mean"),
                             ({"name": "trimmed_mean", "trim": 0.5}, "trim must be")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"federated": {"aggregator": section}})
