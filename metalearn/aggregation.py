"""How the cloud turns the updates of several sites into one: small, swappable strategies.

Every strategy has the same shape (as Flower's strategies do): a list of
:class:`~metalearn.algorithms.base.MetaUpdate` of one kind goes in, one ``Params`` dict comes
out, and the cloud's outer optimizer applies it as that kind. So the driver never needs to know
which rule is in use, and a new rule is one small class.

* :class:`WeightedMean` — FedAvg: the mean weighted by each update's task count. With full
  participation and one local step this is exactly the centralized meta-gradient over the
  union of the sites' tasks (the equivalence the tests hold).
* :class:`CoordinateMedian` and :class:`TrimmedMean` — robust to a few corrupted or extreme
  sites (Yin et al., 2018). They ignore task counts on purpose: weighting would let one site
  that claims many tasks move the result again, which is what robust rules exist to prevent.
* :class:`ClipAndNoise` — wraps any rule: clip each update to a global L2 norm, aggregate, add
  Gaussian noise (DP-FedAvg, McMahan et al., 2018). Its noise generator is seeded and its state
  is checkpointed, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.algorithms.base import MetaUpdate
from metalearn.params import Params, weighted_sum


def check_updates(updates: Sequence[MetaUpdate]) -> str:
    """Validate that updates can be combined; return their common kind.

    All updates must be of one kind (a gradient and a delta have opposite signs and different
    scales) and carry the same tensor names and shapes.
    """
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    kinds = {u.kind for u in updates}
    if len(kinds) != 1:
        raise ValueError(f"updates of different kinds cannot be aggregated: {sorted(kinds)}")
    first = updates[0].tensors
    for i, u in enumerate(updates[1:], start=1):
        if u.tensors.keys() != first.keys():
            raise KeyError(f"update {i} has different tensors: "
                           f"{sorted(set(u.tensors) ^ set(first))}")
        for k, v in u.tensors.items():
            if v.shape != first[k].shape:
                raise ValueError(f"update {i}: {k} has shape {tuple(v.shape)}, "
                                 f"expected {tuple(first[k].shape)}")
    return kinds.pop()


def _stacked(updates: Sequence[MetaUpdate], key: str) -> Tensor:
    return torch.stack([u.tensors[key].detach() for u in updates])


class Aggregator(ABC):
    """One rule that combines same-kind updates into one update of that kind."""

    name: ClassVar[str] = "base"

    @abstractmethod
    def aggregate(self, updates: Sequence[MetaUpdate]) -> Params:
        """The combined update (same names and shapes as each input's tensors)."""

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (none for deterministic rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`; deterministic rules have nothing to restore."""


class WeightedMean(Aggregator):
    """``sum_i n_i u_i / sum_i n_i`` with ``n_i`` the task count of update ``i`` (FedAvg)."""

    name = "weighted_mean"

    def aggregate(self, updates: Sequence[MetaUpdate]) -> Params:
        check_updates(updates)
        total = sum(u.num_tasks for u in updates)
        if total <= 0:
            raise ValueError("updates stand for no tasks: cannot weight by task count")
        return weighted_sum([u.tensors for u in updates], [u.num_tasks / total for u in updates])


class CoordinateMedian(Aggregator):
    """The median of every coordinate across updates (the mean of the two middle values when
    the count is even, so two sites give their mean rather than the smaller one)."""

    name = "median"

    def aggregate(self, updates: Sequence[MetaUpdate]) -> Params:
        check_updates(updates)
        n = len(updates)
        out: Params = {}
        for key in updates[0].tensors:
            s = _stacked(updates, key).sort(dim=0).values
            out[key] = s[n // 2].clone() if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return out


class TrimmedMean(Aggregator):
    """Per coordinate, drop the ``floor(trim * n)`` smallest and largest values, average the
    rest. ``trim=0`` is the plain (unweighted) mean; ``trim`` must stay below 0.5."""

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    def aggregate(self, updates: Sequence[MetaUpdate]) -> Params:
        check_updates(updates)
        n = len(updates)
        k = math.floor(self.trim * n)
        out: Params = {}
        for key in updates[0].tensors:
            s = _stacked(updates, key).sort(dim=0).values
            out[key] = s[k:n - k].mean(dim=0)
        return out


def global_norm(tensors: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors taken together as one flat vector."""
    return math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in tensors.values()))


class ClipAndNoise(Aggregator):
    """Clip each update to L2 norm ``clip_norm``, aggregate with ``inner``, add Gaussian noise.

    The noise has standard deviation ``noise_multiplier * clip_norm / n`` per coordinate, ``n``
    being the number of updates: the sensitivity of a mean of ``n`` clipped updates to any one
    of them (DP-FedAvg with a fixed number of participants). ``noise_multiplier=0`` clips only.
    """

    name = "clip_noise"

    def __init__(self, inner: Aggregator, clip_norm: float, noise_multiplier: float = 0.0,
                 seed: int = 0) -> None:
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self._generator = torch.Generator().manual_seed(int(seed))

    def clip(self, update: MetaUpdate) -> MetaUpdate:
        norm = global_norm(update.tensors)
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        return MetaUpdate(update.kind, {k: v * scale for k, v in update.tensors.items()},
                          update.num_tasks, dict(update.metrics))

    def aggregate(self, updates: Sequence[MetaUpdate]) -> Params:
        check_updates(updates)
        out = self.inner.aggregate([self.clip(u) for u in updates])
        std = self.noise_multiplier * self.clip_norm / len(updates)
        if std > 0:
            out = {k: v + std * torch.randn(v.shape, generator=self._generator).to(v.dtype)
                   for k, v in out.items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._generator.get_state(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(state["rng"])
        self.inner.load_state_dict(state.get("inner", {}))


def build_aggregator(spec: Mapping[str, Any] | None) -> Aggregator:
    """An aggregator from a config dict, e.g. ``{"name": "trimmed_mean", "trim": 0.2}`` or
    ``{"name": "clip_noise", "inner": {"name": "weighted_mean"}, "clip_norm": 1.0,
    "noise_multiplier": 0.5, "seed": 0}``. ``None`` means the weighted mean."""
    spec = dict(spec or {"name": "weighted_mean"})
    name = spec.pop("name", "weighted_mean")
    try:
        if name == "weighted_mean":
            agg: Aggregator = WeightedMean(**spec)
        elif name == "median":
            agg = CoordinateMedian(**spec)
        elif name == "trimmed_mean":
            agg = TrimmedMean(**spec)
        elif name == "clip_noise":
            inner = build_aggregator(spec.pop("inner", None))
            agg = ClipAndNoise(inner, **spec)
        else:
            raise ValueError(f"unknown aggregator {name!r}; choose one of "
                             "weighted_mean, median, trimmed_mean, clip_noise")
    except TypeError as err:  # an unexpected or missing keyword
        raise ValueError(f"aggregator {name!r}: {err}") from None
    return agg
