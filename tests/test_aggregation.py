"""Aggregation rules against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.aggregation import (
    ClipAndNoise,
    CoordinateMedian,
    TrimmedMean,
    WeightedMean,
    build_aggregator,
    global_norm,
)
from metalearn.algorithms.base import MetaUpdate


def upd(values: list[float], n: int = 1, kind: str = "gradient") -> MetaUpdate:
    """An update with one 1-D tensor ``w`` and a 1x1 tensor ``b`` (= the first value)."""
    return MetaUpdate(kind, {"w": torch.tensor(values), "b": torch.tensor([[values[0]]])}, n)


def test_weighted_mean_weights_by_task_count() -> None:
    # (1*[1, 2] + 3*[5, 6]) / 4 = [4, 5]
    out = WeightedMean().aggregate([upd([1.0, 2.0], n=1), upd([5.0, 6.0], n=3)])
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0]))
    assert out["b"].shape == (1, 1) and float(out["b"]) == pytest.approx(4.0)


def test_weighted_mean_of_one_update_is_that_update() -> None:
    out = WeightedMean().aggregate([upd([0.5, -2.0], n=7)])
    assert torch.equal(out["w"], torch.tensor([0.5, -2.0]))


def test_median_odd_and_even() -> None:
    ups = [upd([1.0, 10.0]), upd([3.0, -4.0]), upd([100.0, 0.0])]
    assert torch.equal(CoordinateMedian().aggregate(ups)["w"], torch.tensor([3.0, 0.0]))
    # even count: mean of the two middle values; [1, 3, 7, 100] -> 5; [-4, 0, 2, 10] -> 1
    ups.append(upd([7.0, 2.0]))
    assert torch.equal(CoordinateMedian().aggregate(ups)["w"], torch.tensor([5.0, 1.0]))


def test_median_ignores_task_counts() -> None:
    ups = [upd([0.0], n=1000), upd([1.0], n=1), upd([2.0], n=1)]
    assert float(CoordinateMedian().aggregate(ups)["w"]) == 1.0


def test_trimmed_mean_drops_extremes() -> None:
    # 10 updates 0..9 with trim 0.1: drop 0 and 9, mean of 1..8 = 4.5
    ups = [upd([float(i), float(-i)]) for i in range(10)]
    out = TrimmedMean(0.1).aggregate(ups)
    assert torch.allclose(out["w"], torch.tensor([4.5, -4.5]))
    # an outlier is trimmed away: [1, 2, 3, 1000] with trim 0.25 -> mean of [2, 3] = 2.5
    out = TrimmedMean(0.25).aggregate([upd([1.0]), upd([1000.0]), upd([2.0]), upd([3.0])])
    assert float(out["w"]) == pytest.approx(2.5)
    # fewer updates than 1 / trim: nothing is dropped, plain mean
    assert float(TrimmedMean(0.1).aggregate([upd([1.0]), upd([4.0])])["w"]) == 2.5


def test_global_norm_spans_all_tensors() -> None:
    assert global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == 5.0


def test_clip_scales_to_the_norm_and_keeps_small_updates() -> None:
    clip = ClipAndNoise(WeightedMean(), clip_norm=1.0)
    big = MetaUpdate("gradient", {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1)
    small = MetaUpdate("gradient", {"a": torch.tensor([0.3]), "b": torch.tensor([0.4])}, 1)
    clipped = clip.clip(big)
    assert torch.allclose(clipped.tensors["a"], torch.tensor([0.6]))
    assert torch.allclose(clipped.tensors["b"], torch.tensor([0.8]))
    assert torch.equal(clip.clip(small).tensors["a"], torch.tensor([0.3]))
    # aggregate: mean of [0.6, 0.8] and [0.3, 0.4] = [0.45, 0.6]; no noise
    out = clip.aggregate([big, small])
    assert torch.allclose(out["a"], torch.tensor([0.45])) and torch.allclose(
        out["b"], torch.tensor([0.6]))


def test_noise_has_the_documented_scale_and_is_reproducible() -> None:
    zeros = [MetaUpdate("delta", {"w": torch.zeros(20000)}, 1) for _ in range(4)]
    agg = ClipAndNoise(WeightedMean(), clip_norm=2.0, noise_multiplier=1.0, seed=3)
    state = agg.state_dict()
    first = agg.aggregate(zeros)["w"]
    # std = noise_multiplier * clip_norm / n = 1 * 2 / 4 = 0.5
    assert float(first.std()) == pytest.approx(0.5, rel=0.03)
    agg.load_state_dict(state)
    assert torch.equal(agg.aggregate(zeros)["w"], first)
    again = ClipAndNoise(WeightedMean(), 2.0, 1.0, seed=3).aggregate(zeros)["w"]
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


def test_build_aggregator_from_dicts() -> None:
    assert isinstance(build_aggregator(None), WeightedMean)
    assert isinstance(build_aggregator({"name": "median"}), CoordinateMedian)
    trimmed = build_aggregator({"name": "trimmed_mean", "trim": 0.2})
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim == 0.2
    dp = build_aggregator({"name": "clip_noise", "inner": {"name": "median"},
                           "clip_norm": 1.5, "noise_multiplier": 0.1, "seed": 1})
    assert isinstance(dp, ClipAndNoise) and isinstance(dp.inner, CoordinateMedian)
    assert math.isclose(dp.clip_norm, 1.5)
    with pytest.raises(ValueError, match="unknown aggregator"):
        build_aggregator({"name": "mode"})
    with pytest.raises(ValueError, match="trimmed_mean"):
        build_aggregator({"name": "trimmed_mean", "trimm": 0.1})
    with pytest.raises(ValueError, match="trim must be"):
        build_aggregator({"name": "trimmed_mean", "trim": 0.5})
