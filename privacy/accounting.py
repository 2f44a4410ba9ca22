"""The privacy a run has spent: (epsilon, delta) over its rounds, from ``dp-accounting``.

One round of DP-FedAvg is a Gaussian mechanism on the sum of clipped updates, applied to the
units (sites or devices) that the round's sampling picked. The event of a round follows the
sampling the driver actually does:

=================  =================================================  ==========================
sampling           event                                              neighbouring datasets
=================  =================================================  ==========================
every unit         ``GaussianDpEvent(z)``                             add or remove one unit
Poisson, rate q    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``   add or remove one unit
k of n, uniform    ``SampledWithoutReplacementDpEvent(n, k,           replace one unit (n is
                   GaussianDpEvent(z / 2))``                          public)
=================  =================================================  ==========================

``z`` is the noise std over the sum's sensitivity. Adding or removing a unit changes the sum of
clipped updates by at most ``C``, so ``z`` is the configured multiplier; replacing one changes
it by up to ``2 C``, hence ``z / 2`` for fixed-size sampling (the library takes the multiplier
relative to the sensitivity under the accountant's relation). Adaptive clipping also releases a
noised count; both releases together are one Gaussian mechanism with the multiplier of
:func:`effective_noise_multiplier`. Rounds compose: the RDP of ``T`` rounds is ``T`` times that
of one (what ``SelfComposedDpEvent`` does), and the PLD accountant self-composes the round's
privacy loss distribution.

:func:`gaussian_epsilon` accounts what a cloud that sees the noised sum (distributed noise with
secure aggregation) learns: no amplification by sampling there, since the cloud knows who took
part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

NeighboringRelation = dp_accounting.NeighboringRelation
Method = Literal["rdp", "pld"]
SamplingKind = Literal["full", "poisson", "fixed"]


@dataclass(frozen=True)
class RoundSampling:
    """How one round picks the units, as the accountant needs it.

    ``full``: every unit every round. ``poisson``: each unit independently with probability
    ``rate``. ``fixed``: ``sample`` of ``population`` units, uniformly without replacement.
    """

    kind: SamplingKind
    population: int
    rate: float = 1.0
    sample: int = 0

    def __post_init__(self) -> None:
        if self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")
        if self.kind == "poisson" and not 0 < self.rate <= 1:
            raise ValueError(f"Poisson sampling rate must be in (0, 1], got {self.rate}")
        if self.kind == "fixed" and not 1 <= self.sample <= self.population:
            raise ValueError(f"fixed-size sample {self.sample} of {self.population} units")

    @property
    def relation(self) -> NeighboringRelation:
        return (NeighboringRelation.REPLACE_ONE if self.kind == "fixed"
                else NeighboringRelation.ADD_OR_REMOVE_ONE)

    def describe(self) -> str:
        if self.kind == "full":
            return f"all {self.population} units every round"
        if self.kind == "poisson":
            return f"Poisson sampling of {self.population} units at rate {self.rate:.4g}"
        return f"{self.sample} of {self.population} units, uniformly without replacement"


def effective_noise_multiplier(noise_multiplier: float, vote_noise_std: float | None) -> float:
    """The multiplier of the sum and the clipping-vote count released together.

    Votes are centred (``b - 1/2``), so one unit moves their sum by 1/2 and the count's own
    multiplier is ``2 vote_noise_std``; two Gaussian releases of one unit's data compose into
    one with ``(z^-2 + (2 sigma_b)^-2)^-1/2`` (Andrew et al., 2021, Theorem 1).
    """
    if vote_noise_std is None:
        return float(noise_multiplier)
    return (noise_multiplier ** -2 + (2.0 * vote_noise_std) ** -2) ** -0.5


def round_event(sampling: RoundSampling, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of one round (see the module's table)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling.kind == "full":
        return gaussian
    if sampling.kind == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sampling.rate, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        sampling.population, sampling.sample,
        dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))


class Accountant:
    """Epsilon at ``delta`` after ``T`` rounds of one repeated event.

    Every round is the same event, so epsilon is a function of the round count alone: a resumed
    run recomputes it from the round it resumes at, and the number of rounds a target epsilon
    allows is known before the first round. RDP: the one-round RDP curve is computed once and
    scaled by ``T``. PLD: the round's privacy loss distribution self-composed ``T`` times
    (tighter, slower: about a second per value here).
    """

    def __init__(self, event: dp_accounting.DpEvent, relation: NeighboringRelation,
                 delta: float, method: Method = "rdp") -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.event, self.relation, self.delta, self.method = event, relation, delta, method
        self._cache: dict[int, float] = {0: 0.0}
        if method == "rdp":
            one = rdp.RdpAccountant(neighboring_relation=relation)
            one.compose(event)
            self._orders, self._rdp = one.orders, one.rdp
        elif method == "pld":
            if not pld.PLDAccountant(relation).supports(event):
                raise ValueError(f"the PLD accountant does not support {event} under {relation}")
        else:
            raise ValueError(f"unknown accountant {method!r}; choose rdp or pld")

    @classmethod
    def of(cls, sampling: RoundSampling, noise_multiplier: float, delta: float,
           method: Method = "rdp") -> Accountant:
        return cls(round_event(sampling, noise_multiplier), sampling.relation, delta, method)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        if rounds not in self._cache:
            if self.method == "rdp":
                eps = rdp.compute_epsilon(self._orders, rounds * self._rdp, self.delta)[0]
            else:
                accountant = pld.PLDAccountant(self.relation)
                accountant.compose(self.event, rounds)
                eps = accountant.get_epsilon(self.delta)
            self._cache[rounds] = float(eps)
        return self._cache[rounds]

    def rounds_within(self, target_epsilon: float, most: int) -> int:
        """The most rounds (at most ``most``) whose epsilon stays within ``target_epsilon``."""
        if self.epsilon(most) <= target_epsilon:
            return most
        lo, hi = 0, most  # epsilon(lo) <= target < epsilon(hi); epsilon grows with rounds
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= target_epsilon else (lo, mid)
        return lo


def gaussian_epsilon(precision: float, delta: float, method: Method = "rdp") -> float:
    """Epsilon at ``delta`` of Gaussian mechanisms with multipliers ``z_r`` composed, given
    ``precision = sum_r z_r^-2`` (they compose into one with multiplier ``precision^-1/2``).
    Zero precision: nothing was released."""
    if precision <= 0:
        return 0.0
    if not math.isfinite(precision):
        return math.inf
    event = dp_accounting.GaussianDpEvent(precision ** -0.5)
    relation = NeighboringRelation.REPLACE_SPECIAL  # zero-out: a unit's update against none
    accountant: dp_accounting.PrivacyAccountant = (
        rdp.RdpAccountant(neighboring_relation=relation) if method == "rdp"
        else pld.PLDAccountant(relation))
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))

