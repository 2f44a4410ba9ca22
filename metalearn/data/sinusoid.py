"""Sinusoid regression tasks of the MAML paper: ``y = A sin(x - phase)``, one (A, phase) per task.

Amplitude, phase and inputs are uniform on their ranges (MAML: A in [0.1, 5], phase in [0, π],
x in [-5, 5]). Narrower sub-ranges give non-IID sites (see
:func:`~metalearn.data.partition.sinusoid_site_ranges`). The sampler's own seeded generator
makes the task stream reproducible and resumable; ``sample(..., seed=s)`` draws a fixed
evaluation set without touching that stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalearn.tasks import TaskBatch

Range = tuple[float, float]


@dataclass(frozen=True)
class SinusoidParams:
    """The true ``[B]`` amplitudes and phases of a batch of tasks."""

    amplitude: Tensor
    phase: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        """True outputs for inputs ``x`` of shape ``[B, K, 1]``."""
        return self.amplitude[:, None, None] * torch.sin(x - self.phase[:, None, None])


def _range(name: str, value: Range) -> Range:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from err
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be finite with low <= high, got ({low}, {high})")
    return low, high


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SinusoidTasks:
    """Seeded sampler of sinusoid tasks: ``x`` and ``y`` are ``[B, K, 1]`` float32."""

    def __init__(self, amplitude: Range = (0.1, 5.0), phase: Range = (0.0, math.pi),
                 x_range: Range = (-5.0, 5.0), shots: int = 5, queries: int = 10,
                 seed: int = 0) -> None:
        self.amplitude = _range("amplitude", amplitude)
        if self.amplitude[0] <= 0:
            raise ValueError(f"amplitude must be > 0, got range {self.amplitude}")
        self.phase = _range("phase", phase)
        self.x_range = _range("x_range", x_range)
        self.shots = _count("shots", shots)
        self.queries = _count("queries", queries)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        return (f"SinusoidTasks(amplitude={self.amplitude}, phase={self.phase}, "
                f"x_range={self.x_range}, shots={self.shots}, queries={self.queries}, "
                f"seed={self.seed})")

    def _uniform(self, shape: tuple[int, ...], bounds: Range, g: torch.Generator) -> Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=g)

    def sample_with_params(self, batch: int,
                           seed: int | None = None) -> tuple[TaskBatch, SinusoidParams]:
        """Like :meth:`sample`, also returning each task's true amplitude and phase."""
        batch = _count("batch", batch)
        g = self._generator if seed is None else torch.Generator().manual_seed(int(seed))
        params = SinusoidParams(self._uniform((batch,), self.amplitude, g),
                                self._uniform((batch,), self.phase, g))
        x = self._uniform((batch, self.shots + self.queries, 1), self.x_range, g)
        y = params(x)
        tasks = TaskBatch(x[:, :self.shots], y[:, :self.shots],
                          x[:, self.shots:], y[:, self.shots:])
        return tasks, params

    def sample(self, batch: int, seed: int | None = None) -> TaskBatch:
        """``batch`` tasks from the sampler's stream, or with ``seed`` a fixed set (for
        evaluation) drawn from a fresh generator, leaving the stream where it was."""
        return self.sample_with_params(batch, seed)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            rng = state["rng"]
        except (KeyError, TypeError) as err:
            raise ValueError("state must be a dict from SinusoidTasks.state_dict()") from err
        self._generator.set_state(rng)
        self.seed = int(state.get("seed", self.seed))
