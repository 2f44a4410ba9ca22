"""How the cloud turns the updates of several sites into one: small, swappable strategies.

Every strategy has the same shape (as Flower's strategies do): a list of :class:`FlatUpdate`
of one kind goes in (each a flat vector of the model's parameter count, as it came off the
wire), one vector comes out, and the cloud's outer optimizer applies it as that kind. So the
driver never needs to know which rule is in use, and a new rule is one small class. Every rule
is coordinate-wise (or, for clipping, over the whole vector), so flat vectors cost one op per
rule instead of one per tensor.

* :class:`WeightedMean` — FedAvg: the mean weighted by each update's task count. With full
  participation and one local step this is exactly the centralized meta-gradient over the
  union of the sites' tasks (the equivalence the tests hold).
* :class:`CoordinateMedian` and :class:`TrimmedMean` — robust to a few corrupted or extreme
  sites (Yin et al., 2018). They ignore task counts on purpose: weighting would let one site
  that claims many tasks move the result again, which is what robust rules exist to prevent.
* :class:`ClipAndNoise` — wraps any rule: clip each update to a global L2 norm, aggregate, add
  Gaussian noise. Its noise generator is seeded and its state is checkpointed, so a resumed run
  draws the same noise as an uninterrupted one. It clips at the cloud, after the updates left
  the sites, with predictable noise and no accountant: no privacy guarantee. The DP mechanism
  is ``federated.privacy`` (:mod:`privacy.dp`, docs/PRIVACY.md).

Rules are built from the config's ``federated.aggregator`` section (a validated union of one
model per rule, in :mod:`experiments.config`); their constructors take no defaults of their own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from metalearn.algorithms.base import MetaUpdate
from metalearn.params import FlatLayout


@dataclass(frozen=True)
class FlatUpdate:
    """One site's update as the cloud aggregates it: a flat vector in the meta-parameters'
    :class:`~metalearn.params.FlatLayout` order, its kind, and the tasks it stands for."""

    kind: Literal["gradient", "delta"]
    vector: Tensor
    num_tasks: int

    @classmethod
    def of(cls, update: MetaUpdate, layout: FlatLayout) -> FlatUpdate:
        """A :class:`MetaUpdate` (a dict of tensors) flattened in ``layout``'s order."""
        return cls(update.kind, layout.concat(update.tensors, "update"), update.num_tasks)


def check_updates(updates: Sequence[FlatUpdate]) -> str:
    """Validate that updates can be combined; return their common kind.

    All updates must be of one kind (a gradient and a delta have opposite signs and different
    scales) and have the same shape.
    """
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    kinds = {u.kind for u in updates}
    if len(kinds) != 1:
        raise ValueError(f"updates of different kinds cannot be aggregated: {sorted(kinds)}")
    shape = updates[0].vector.shape
    for i, u in enumerate(updates[1:], start=1):
        if u.vector.shape != shape:
            raise ValueError(f"update {i} has shape {tuple(u.vector.shape)}, "
                             f"expected {tuple(shape)}")
    return kinds.pop()


def _stacked(updates: Sequence[FlatUpdate]) -> Tensor:
    return torch.stack([u.vector.detach() for u in updates])


class Aggregator(ABC):
    """One rule that combines same-kind updates into one update of that kind."""

    name: ClassVar[str] = "base"

    @abstractmethod
    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        """The combined update, a vector of the inputs' shape."""

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (none for deterministic rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`; deterministic rules have nothing to restore."""


class WeightedMean(Aggregator):
    """``sum_i n_i u_i / sum_i n_i`` with ``n_i`` the task count of update ``i`` (FedAvg)."""

    name = "weighted_mean"

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        total = sum(u.num_tasks for u in updates)
        if total <= 0:
            raise ValueError("updates stand for no tasks: cannot weight by task count")
        out = (updates[0].num_tasks / total) * updates[0].vector.detach().clone()
        for u in updates[1:]:  # in the given order: the float sums are reproducible
            out = out + (u.num_tasks / total) * u.vector
        return out


class CoordinateMedian(Aggregator):
    """The median of every coordinate across updates (the mean of the two middle values when
    the count is even, so two sites give their mean rather than the smaller one)."""

    name = "median"

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        n = len(updates)
        s = _stacked(updates).sort(dim=0).values
        return s[n // 2].clone() if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class TrimmedMean(Aggregator):
    """Per coordinate, drop the ``floor(trim * n)`` smallest and largest values, average the
    rest. ``trim=0`` is the plain (unweighted) mean; ``trim`` must stay below 0.5."""

    name = "trimmed_mean"

    def __init__(self, trim: float) -> None:
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        n = len(updates)
        k = math.floor(self.trim * n)
        return _stacked(updates).sort(dim=0).values[k:n - k].mean(dim=0)


def global_norm(tensors: Mapping[str, Tensor] | Tensor) -> float:
    """L2 norm of all tensors taken together as one flat vector."""
    if isinstance(tensors, Tensor):
        return math.sqrt(float(tensors.detach().double().pow(2).sum()))
    return math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in tensors.values()))


class ClipAndNoise(Aggregator):
    """Clip each update to L2 norm ``clip_norm``, aggregate with ``inner``, add Gaussian noise.

    Cloud-side clipping without guarantees (the cloud sees every update unclipped, the noise is
    seeded, nothing is accounted); client-level DP is ``federated.privacy``.

    The noise has standard deviation ``noise_multiplier * clip_norm / n`` per coordinate, ``n``
    being the number of updates: the sensitivity of a mean of ``n`` clipped updates to any one
    of them (DP-FedAvg with a fixed number of participants). ``noise_multiplier=0`` clips only.
    """

    name = "clip_noise"

    def __init__(self, inner: Aggregator, clip_norm: float, noise_multiplier: float,
                 seed: int) -> None:
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self._generator = torch.Generator().manual_seed(int(seed))

    def clip(self, update: FlatUpdate) -> FlatUpdate:
        norm = global_norm(update.vector)
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        return FlatUpdate(update.kind, update.vector * scale, update.num_tasks)

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        out = self.inner.aggregate([self.clip(u) for u in updates])
        std = self.noise_multiplier * self.clip_norm / len(updates)
        if std > 0:
            out = out + std * torch.randn(out.shape, generator=self._generator).to(out.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._generator.get_state(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(state["rng"])
        self.inner.load_state_dict(state.get("inner", {}))
