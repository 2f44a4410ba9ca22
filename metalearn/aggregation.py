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
* :class:`FedNova` — normalised averaging (Wang et al., 2020): sites that took unequal numbers
  of local steps (a time budget sizes the work to each site) are averaged per step, so fast
  sites do not pull the model toward their own objective.
* :class:`CoordinateMedian` and :class:`TrimmedMean` — robust to a few corrupted or extreme
  sites (Yin et al., 2018). They ignore task counts on purpose: weighting would let one site
  that claims many tasks move the result again, which is what robust rules exist to prevent.
* :class:`Krum` and :class:`MultiKrum` — Byzantine-robust selection (Blanchard et al., 2017):
  score each update by its squared distances to its ``n - f - 2`` nearest others, keep the best
  one (Krum) or average the ``m`` best (Multi-Krum). An outlier sits far from every honest
  update, so its score is high whatever its direction.
* :class:`Bulyan` — Krum selection then a per-coordinate trimmed mean around the median
  (El Mhamdi et al., 2018): Krum alone can still pick an update that is close overall but off
  in a few coordinates; Bulyan bounds every coordinate as well.
* :class:`NormBound` — wraps any rule: clip each update to an L2 norm, then aggregate (Sun et
  al., 2019): a scaled (model-replacement) update can then move the result no more than an
  honest one of the bound's norm.
* :class:`ClipAndNoise` — wraps any rule: clip each update to a global L2 norm, aggregate, add
  Gaussian noise. Its noise generator is seeded and its state is checkpointed, so a resumed run
  draws the same noise as an uninterrupted one. It clips at the cloud, after the updates left
  the sites, with predictable noise and no accountant: no privacy guarantee. The DP mechanism
  is ``federated.privacy`` (:mod:`privacy.dp`, docs/PRIVACY.md).

Every rule but :class:`WeightedMean` looks at each update on its own, so it needs the updates
individually (``needs_individual_updates``): secure aggregation, where the cloud only sees their
sum, leaves the weighted mean alone. The Byzantine-robust rules need a least number of updates
(``min_updates``), checked at aggregation and, against the quorum, when the config is read.

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
    :class:`~metalearn.params.FlatLayout` order, its kind, the tasks it stands for, and the
    local meta-steps that made it (1 for a gradient; what :class:`FedNova` normalises by)."""

    kind: Literal["gradient", "delta"]
    vector: Tensor
    num_tasks: int
    local_steps: int = 1

    @classmethod
    def of(cls, update: MetaUpdate, layout: FlatLayout) -> FlatUpdate:
        """A :class:`MetaUpdate` (a dict of tensors) flattened in ``layout``'s order."""
        return cls(update.kind, layout.concat(update.tensors, "update"), update.num_tasks,
                   update.local_steps)


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
    # False only where the rule is a (weighted) sum: what secure aggregation can still compute.
    needs_individual_updates: ClassVar[bool] = True

    @abstractmethod
    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        """The combined update, a vector of the inputs' shape."""

    def min_updates(self) -> int:
        """The fewest updates the rule can combine (more than one for the Byzantine-robust
        rules, whose guarantees hold only with enough honest updates around an attacker)."""
        return 1

    def requirement(self) -> str:
        """Why :meth:`min_updates` is what it is, for error messages."""
        return "needs at least one update"

    def check_count(self, n: int) -> None:
        """Raise ``ValueError`` saying why, when ``n`` updates are too few for the rule."""
        if n < self.min_updates():
            raise ValueError(f"{self.name}: {self.requirement()}, got {n}")

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (none for deterministic rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`; deterministic rules have nothing to restore."""


class WeightedMean(Aggregator):
    """``sum_i n_i u_i / sum_i n_i`` with ``n_i`` the task count of update ``i`` (FedAvg)."""

    name = "weighted_mean"
    needs_individual_updates = False

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        total = sum(u.num_tasks for u in updates)
        if total <= 0:
            raise ValueError("updates stand for no tasks: cannot weight by task count")
        out = (updates[0].num_tasks / total) * updates[0].vector.detach().clone()
        for u in updates[1:]:  # in the given order: the float sums are reproducible
            out = out + (u.num_tasks / total) * u.vector
        return out


class FedNova(Aggregator):
    """Normalised averaging (FedNova, Wang et al., 2020): unequal local work without bias.

    A site that took ``tau_i`` local SGD steps sends ``Delta_i``, about ``tau_i`` times its
    per-step direction; the plain (task-weighted) mean of the deltas therefore leans toward the
    sites that did more steps, the fast ones, and optimises a different objective from the one
    the sites share (Wang et al., Theorem 1). FedNova averages the per-step directions instead
    and rescales by the effective step count::

        p_i = s_i / sum_j s_j          (s_i = num_tasks_i / tau_i: the site's tasks per step)
        tau_eff = sum_i p_i tau_i
        update  = tau_eff * sum_i p_i Delta_i / tau_i

    With equal ``tau_i`` it is exactly :class:`WeightedMean` (``tau_eff = tau``). This is the
    paper's rule for plain local SGD (``a_i = tau_i``); a local Adam's normaliser would differ,
    which the config refuses (:mod:`experiments.config`).
    """

    name = "fednova"

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        if any(u.local_steps < 1 for u in updates):
            raise ValueError("fednova: every update needs local_steps >= 1")
        per_step = [u.num_tasks / u.local_steps for u in updates]
        total = sum(per_step)
        if total <= 0:
            raise ValueError("updates stand for no tasks: cannot weight by task count")
        weights = [s / total for s in per_step]
        tau_eff = sum(p * u.local_steps for p, u in zip(weights, updates, strict=True))
        out = torch.zeros_like(updates[0].vector, dtype=torch.float64)
        for p, u in zip(weights, updates, strict=True):  # in the given order: reproducible
            out += (p / u.local_steps) * u.vector.detach().double()
        return (tau_eff * out).to(updates[0].vector.dtype)


def staleness_weight(staleness: int) -> float:
    """FedBuff's discount of an update computed on parameters ``staleness`` versions old."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def buffered_mean(updates: Sequence[FlatUpdate], staleness: Sequence[int]) -> Tensor:
    """FedBuff's server update (Nguyen et al., 2022): ``(1/K) sum_i u_i / sqrt(1 + s_i)`` over
    the ``K`` buffered updates, ``s_i`` the versions applied since update ``i``'s parameters
    were sent. Dividing by ``K`` (not by the weights' sum) lets stale updates move the model
    less, not merely count less against fresh ones."""
    check_updates(updates)
    if len(staleness) != len(updates):
        raise ValueError(f"{len(updates)} updates, {len(staleness)} staleness values")
    out = torch.zeros_like(updates[0].vector, dtype=torch.float64)
    for u, s in zip(updates, staleness, strict=True):  # in the given order: reproducible
        out += staleness_weight(s) * u.vector.detach().double()
    return (out / len(updates)).to(updates[0].vector.dtype)


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


def clip_to_norm(update: FlatUpdate, max_norm: float) -> FlatUpdate:
    """``update`` scaled down to L2 norm ``max_norm`` if it is longer; otherwise unchanged."""
    norm = global_norm(update.vector)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return FlatUpdate(update.kind, update.vector * scale, update.num_tasks, update.local_steps)


def pairwise_sq_distances(stacked: Tensor) -> Tensor:
    """``[n, n]`` squared L2 distances between the rows of ``stacked``, in float64.

    Row by row as ``sum((x - x_i)^2)`` rather than ``|x|^2 + |x_i|^2 - 2 x.x_i``: the latter
    cancels catastrophically for close updates of large norm, and a row at a time keeps the
    memory at one ``[n, d]`` copy.
    """
    x = stacked.detach().double()
    return torch.stack([(x - x[i]).pow(2).sum(dim=1) for i in range(x.shape[0])])


def krum_scores(sq_dist: Tensor, f: int) -> Tensor:
    """Krum's score of each update: the sum of its squared distances to its ``n - f - 2``
    nearest others (``sq_dist`` from :func:`pairwise_sq_distances`).

    Used with fewer than ``2f + 3`` updates (Bulyan's later selections) the count is kept at
    one neighbour at least: with none, every score would be 0 and the choice would fall to the
    updates' order, which an attacker could arrange.
    """
    n = sq_dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=sq_dist.dtype)
    others = sq_dist.clone()
    others.fill_diagonal_(math.inf)
    k = max(1, n - f - 2)
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def _check_f(f: int) -> int:
    if f < 0:
        raise ValueError(f"f (the Byzantine updates assumed) must be >= 0, got {f}")
    return int(f)


class MultiKrum(Aggregator):
    """Average the ``m`` updates of lowest Krum score (Blanchard et al., 2017), unweighted.

    ``f`` is the number of Byzantine updates the rule is built to withstand; it needs
    ``n > 2f + 2`` updates, so that every update's ``n - f - 2`` nearest others include honest
    ones. ``m=None`` averages ``n - f`` updates, as many as are assumed honest (the paper's
    choice); a fixed ``m`` needs ``m <= n - f``, or at least one of the ``f`` could never be left
    out. Ties in score go to the update that came first (participant order: reproducible).
    """

    name = "multi_krum"

    def __init__(self, f: int, m: int | None) -> None:
        if m is not None and m < 1:
            raise ValueError(f"m (the updates averaged) must be >= 1, got {m}")
        self.f = _check_f(f)
        self.m = None if m is None else int(m)

    def min_updates(self) -> int:
        return max(2 * self.f + 3, (self.m or 1) + self.f)

    def requirement(self) -> str:
        need = f"more than 2f+2 = {2 * self.f + 2} updates (f={self.f})"
        if self.m is not None and self.m + self.f > 2 * self.f + 3:
            need += f" and at least m+f = {self.m + self.f} (m={self.m})"
        return f"needs {need}"

    def selected(self, updates: Sequence[FlatUpdate]) -> list[int]:
        """Indices of the updates that are averaged, in participant order."""
        check_updates(updates)
        self.check_count(len(updates))
        scores = krum_scores(pairwise_sq_distances(_stacked(updates)), self.f)
        m = len(updates) - self.f if self.m is None else self.m
        return sorted(scores.argsort(stable=True)[:m].tolist())

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        keep = self.selected(updates)
        return _stacked([updates[i] for i in keep]).mean(dim=0)


class Krum(MultiKrum):
    """The one update of lowest Krum score (Blanchard et al., 2017): Multi-Krum with ``m=1``."""

    name = "krum"

    def __init__(self, f: int) -> None:
        super().__init__(f, 1)


def mean_around_median(stacked: Tensor, beta: int) -> Tensor:
    """Per coordinate (column), the mean of the ``beta`` values of ``stacked`` (``[n, d]``)
    closest to the column's median (the mean of the two middle values for even ``n``); of two
    values equally close, the smaller one is kept. Bulyan's second stage."""
    n = stacked.shape[0]
    if not 1 <= beta <= n:
        raise ValueError(f"beta must be in 1..{n}, got {beta}")
    values = stacked.detach().sort(dim=0).values
    mid = n // 2
    median = values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2
    # Sorted: the beta nearest values form a window; the stable sort prefers the lower one.
    nearest = (values - median).abs().argsort(dim=0, stable=True)[:beta]
    return values.gather(0, nearest).mean(dim=0)


class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al., 2018) over Krum: robust overall and in every coordinate.

    1. Select ``theta = n - 2f`` updates by Krum, one at a time, each time among the updates
       not yet selected (scores recomputed on what is left; see :func:`krum_scores`).
    2. Per coordinate, average the ``beta = theta - 2f`` selected values closest to their
       median (the mean of the two middle ones for an even ``theta``); of values equally close,
       the smaller one is kept.

    Needs ``n >= 4f + 3`` updates (the paper's bound, so that ``beta >= 3`` values survive).
    Task counts are ignored, as in every robust rule here.
    """

    name = "bulyan"

    def __init__(self, f: int) -> None:
        self.f = _check_f(f)

    def min_updates(self) -> int:
        return 4 * self.f + 3

    def requirement(self) -> str:
        return f"needs at least 4f+3 = {4 * self.f + 3} updates (f={self.f})"

    def selected(self, updates: Sequence[FlatUpdate]) -> list[int]:
        """Indices of the ``n - 2f`` updates chosen by repeated Krum, in choice order."""
        check_updates(updates)
        self.check_count(len(updates))
        sq_dist = pairwise_sq_distances(_stacked(updates))
        left, chosen = list(range(len(updates))), []
        for _ in range(len(updates) - 2 * self.f):
            sub = sq_dist[left][:, left]
            best = int(krum_scores(sub, self.f).argsort(stable=True)[0])
            chosen.append(left.pop(best))
        return chosen

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        keep = sorted(self.selected(updates))
        return mean_around_median(_stacked([updates[i] for i in keep]),
                                  len(keep) - 2 * self.f)


class NormBound(Aggregator):
    """Clip each update to L2 norm ``max_norm``, then aggregate with ``inner`` (norm bounding,
    Sun et al., 2019): a boosted update (model replacement) then weighs no more than an honest
    update of that norm. :class:`ClipAndNoise` with noise adds privacy; this is the defence
    alone, without the noise that would cost accuracy."""

    name = "norm_bound"

    def __init__(self, inner: Aggregator, max_norm: float) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.inner = inner
        self.max_norm = float(max_norm)

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def requirement(self) -> str:
        return f"wraps {self.inner.name}, which {self.inner.requirement()}"

    def aggregate(self, updates: Sequence[FlatUpdate]) -> Tensor:
        check_updates(updates)
        return self.inner.aggregate([clip_to_norm(u, self.max_norm) for u in updates])

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))


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

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def requirement(self) -> str:
        return f"wraps {self.inner.name}, which {self.inner.requirement()}"

    def clip(self, update: FlatUpdate) -> FlatUpdate:
        return clip_to_norm(update, self.clip_norm)

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
