"""Unequal local work: the time budget that sizes it (metalearn.local_update) and the rule
that aggregates it without bias (FedNova, metalearn.aggregation)."""

from __future__ import annotations

import pytest
import torch

from metalearn.aggregation import (
    FedNova,
    FlatUpdate,
    WeightedMean,
    buffered_mean,
    staleness_weight,
)
from metalearn.algorithms.maml import MAML
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.local_update import local_update
from metalearn.models import SinusoidMLP


def delta(values: list[float], tasks: int, steps: int) -> FlatUpdate:
    return FlatUpdate("delta", torch.tensor(values, dtype=torch.float64), tasks, steps)


def test_fednova_against_a_hand_derived_case_and_the_plain_mean() -> None:
    """Two sites with 2 tasks a step. The slow one took 1 local step (Delta = [1, 0]), the fast
    one 4 (Delta = [0, 4], i.e. [0, 1] a step). p = (1/2, 1/2), tau_eff = 1/2 + 4/2 = 2.5,
    update = 2.5 * (1/2 [1, 0] / 1 + 1/2 [0, 4] / 4) = [1.25, 1.25]: both sites' per-step
    directions count the same. The plain task-weighted mean, (2 [1, 0] + 8 [0, 4]) / 10 =
    [0.2, 3.2], is dominated by the fast site."""
    slow, fast = delta([1.0, 0.0], tasks=2, steps=1), delta([0.0, 4.0], tasks=8, steps=4)
    assert FedNova().aggregate([slow, fast]).tolist() == [1.25, 1.25]
    assert WeightedMean().aggregate([slow, fast]).tolist() == [0.2, 3.2]


def test_fednova_with_equal_work_is_the_weighted_mean() -> None:
    g = torch.Generator().manual_seed(0)
    updates = [FlatUpdate("delta", torch.randn(7, generator=g, dtype=torch.float64), n, 3)
               for n in (3, 6, 9)]
    assert torch.allclose(FedNova().aggregate(updates), WeightedMean().aggregate(updates))


def test_a_time_budget_takes_the_steps_that_fit_at_least_one() -> None:
    """A unit test of the budget's arithmetic: the clock advances ``step_s`` each time a step
    samples its tasks, so every meta-step lasts exactly ``step_s``."""
    algorithm = MAML(SinusoidMLP(hidden=8), "regression", inner_lr=0.01, inner_steps=1)
    params = algorithm.init_params()
    tasks = SinusoidTasks(seed=0)

    def run(budget: float, step_s: float, most: int = 10) -> int:
        now = [0.0]

        def sample(n: int):
            now[0] += step_s
            return tasks.sample(n)

        seen: list[float] = []
        update = local_update(algorithm, params, sample, 2, most, 0.01, "sgd",
                              time_budget_s=budget, after_step=seen.append,
                              clock=lambda: now[0])
        assert update.kind == "delta" and update.num_tasks == 2 * update.local_steps
        assert seen == pytest.approx([step_s] * update.local_steps)
        return update.local_steps

    assert run(1.0, 0.125) == 8  # after 8 steps (1.0 s) a 9th would end past the budget
    assert run(1.0, 0.3) == 3  # 0.9 s, and a 4th would end at 1.2 s
    assert run(1.0, 2.0) == 1  # never less than one step
    assert run(100.0, 0.125, most=4) == 4  # never more than local_steps


def test_fedbuff_discounts_each_buffered_update_by_its_staleness() -> None:
    """K = 2: a fresh update [2, 0] and one 3 versions old [0, 4]: (1/2) ([2, 0] / sqrt(1) +
    [0, 4] / sqrt(4)) = [1, 1]. Equal freshness is the plain mean."""
    fresh, stale = delta([2.0, 0.0], 2, 1), delta([0.0, 4.0], 2, 1)
    assert buffered_mean([fresh, stale], [0, 3]).tolist() == [1.0, 1.0]
    assert buffered_mean([fresh, stale], [0, 0]).tolist() == [1.0, 2.0]
    assert staleness_weight(8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="staleness"):
        buffered_mean([fresh], [0, 1])
