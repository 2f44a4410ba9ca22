"""Sinusoid regression tasks: shapes, the true function, ranges, seeding and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.data import SinusoidTasks, sinusoid_site_ranges


def test_shapes_and_true_function() -> None:
    sampler = SinusoidTasks(shots=5, queries=10, seed=0)
    tasks, params = sampler.sample_with_params(16)
    assert tasks.support_x.shape == tasks.support_y.shape == (16, 5, 1)
    assert tasks.query_x.shape == tasks.query_y.shape == (16, 10, 1)
    assert all(t.dtype == torch.float32 for t in (tasks.support_x, tasks.query_y))
    a, p = params.amplitude[:, None, None], params.phase[:, None, None]
    assert torch.allclose(tasks.support_y, a * torch.sin(tasks.support_x - p))
    assert torch.allclose(tasks.query_y, params(tasks.query_x))
    assert params.amplitude.shape == params.phase.shape == (16,)


def test_values_lie_in_their_ranges() -> None:
    sampler = SinusoidTasks(amplitude=(1.0, 2.0), phase=(0.5, 0.6), x_range=(-1.0, 3.0))
    tasks, params = sampler.sample_with_params(500)
    assert float(params.amplitude.min()) >= 1.0 and float(params.amplitude.max()) <= 2.0
    assert float(params.phase.min()) >= 0.5 and float(params.phase.max()) <= 0.6
    xs = torch.cat([tasks.support_x, tasks.query_x], dim=1)
    assert float(xs.min()) >= -1.0 and float(xs.max()) <= 3.0
    assert float(tasks.query_y.abs().max()) <= 2.0 + 1e-6
    # Uniform draws fill the range: the mean amplitude is near its midpoint.
    assert abs(float(params.amplitude.mean()) - 1.5) < 0.05


def test_degenerate_ranges_are_allowed() -> None:
    tasks, params = SinusoidTasks(amplitude=(3.0, 3.0), phase=(0.0, 0.0)).sample_with_params(4)
    assert torch.all(params.amplitude == 3.0) and torch.all(params.phase == 0.0)
    assert torch.allclose(tasks.support_y, 3.0 * torch.sin(tasks.support_x))


def test_seeding_fixed_eval_set_and_resume() -> None:
    a, b, c = SinusoidTasks(seed=1), SinusoidTasks(seed=1), SinusoidTasks(seed=2)
    first = a.sample(8)
    assert torch.equal(first.support_x, b.sample(8).support_x)
    assert not torch.equal(first.support_x, c.sample(8).support_x)

    state = a.state_dict()
    expected = a.sample(8)
    eval_set = a.sample(8, seed=123)  # a fixed set: same for any sampler state...
    assert torch.equal(eval_set.query_y, c.sample(8, seed=123).query_y)
    assert torch.equal(eval_set.query_y, a.sample(8, seed=123).query_y)
    resumed = SinusoidTasks(seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(8).query_x, expected.query_x)
    b.sample(8)  # ...and drawing it does not advance the stream
    assert torch.equal(a.sample(8).query_x, b.sample(8).query_x)
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"seed": 1})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"amplitude": (5.0, 0.1)}, r"amplitude must be finite with low <= high"),
    ({"amplitude": (0.0, 1.0)}, r"amplitude must be > 0"),
    ({"amplitude": (-1.0, 1.0)}, r"amplitude must be > 0"),
    ({"phase": (1.0, 0.0)}, r"phase must be finite with low <= high"),
    ({"x_range": (5.0, -5.0)}, r"x_range must be finite with low <= high"),
    ({"x_range": (0.0, math.inf)}, r"x_range must be finite"),
    ({"phase": (0.0,)}, r"phase must be a \(low, high\) pair"),
    ({"shots": 0}, "shots must be a positive integer"),
    ({"queries": -2}, "queries must be a positive integer"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(**kwargs)


def test_bad_batch() -> None:
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        SinusoidTasks().sample(0)


def test_site_ranges_feed_the_sampler() -> None:
    for i, kwargs in enumerate(sinusoid_site_ranges(4)):
        _, params = SinusoidTasks(**kwargs, seed=i).sample_with_params(200)
        low, high = kwargs["amplitude"]
        assert low <= float(params.amplitude.min()) and float(params.amplitude.max()) <= high
