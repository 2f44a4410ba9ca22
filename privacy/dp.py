"""DP-FedAvg with client-level privacy: the site's half and the cloud's half, on flat vectors.

The unit of privacy (a site, or one of its devices) is what the guarantee protects: anything it
contributes to a round is bounded and hidden by noise together.

* **At the site** (:func:`release_at_site`), before anything leaves it: each unit's update is
  clipped to L2 norm ``C`` (a site's one update with unit ``site``; each participating device's
  own update with unit ``device``), the clipped updates are summed, and with distributed noise
  the site adds its share ``N(0, (z C)^2 / m)`` of the noise (``m``: expected sites per round),
  so that the sum over ``m`` sites carries ``N(0, (z C)^2)``. For adaptive clipping each unit
  also casts a vote ``b - 1/2`` (``b = 1`` when its update was within ``C``): centred, so the sum
  of votes does not reveal how many units took part (Andrew et al., 2021).
* **At the cloud** (:class:`DpSum`): the *unweighted* sum of what arrived (task-count weights
  would let one unit's share of the result grow past ``C / m``), Gaussian noise of std
  ``z C`` on it (central noise; with distributed noise only the top-up for shares that did not
  arrive), divided by the *expected* number of units per round, a constant: a divisor that
  counted the arrivals would itself depend on who took part.

Everything here is pure torch on flat vectors; which units took part and the accounting of
what a round costs live elsewhere (the driver; :mod:`privacy.accounting`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from privacy.noise import UPDATE, VOTE, GaussianNoise, cloud_stream, site_stream

# Float32 rounding of the scaled coordinates can raise the norm by ~2**-24 relative; scaling by
# this much less keeps a clipped vector's norm at most C, as the sensitivity analysis assumes.
_SHRINK = 1.0 - 2.0 ** -20


def l2_norm(vector: Tensor) -> float:
    """The L2 norm of a flat vector, summed in float64."""
    return math.sqrt(float(vector.detach().double().pow(2).sum()))


def clip(vector: Tensor, bound: float) -> tuple[Tensor, float]:
    """``vector`` scaled down to L2 norm at most ``bound`` (a copy), and its norm before."""
    if bound <= 0:
        raise ValueError(f"clipping bound must be > 0, got {bound}")
    norm = l2_norm(vector)
    if norm <= bound:
        return vector.detach().clone(), norm
    return (vector.detach().double() * (bound / norm * _SHRINK)).to(vector.dtype), norm


@dataclass(frozen=True)
class SiteRelease:
    """What a site sends of its units' updates: their clipped sum (plus its noise share) and the
    sum of their clipping votes (plus its share of that noise). ``norms`` (before clipping)
    stay on the site."""

    vector: Tensor
    vote: float
    units: int
    norms: tuple[float, ...]


def release_at_site(updates: Sequence[Tensor], clip_norm: float, noise_std: float,
                    vote_noise_std: float, noise: GaussianNoise, site: str,
                    round_idx: int) -> SiteRelease:
    """Clip each unit's update to ``clip_norm``, sum, add the site's noise shares.

    ``updates``: one flat vector per unit (one for unit ``site``, one per participating device
    for unit ``device``). ``noise_std`` / ``vote_noise_std``: the site's shares (0 with central
    noise, where the cloud adds all of it).
    """
    if not updates:
        raise ValueError(f"{site}: no unit updates to release in round {round_idx}")
    total = torch.zeros(updates[0].numel(), dtype=torch.float64)
    vote, norms = 0.0, []
    for update in updates:
        clipped, norm = clip(update.reshape(-1), clip_norm)
        total += clipped.double()
        norms.append(norm)
        vote += (1.0 if norm <= clip_norm else 0.0) - 0.5
    total += noise.normals(total.numel(), noise_std, site_stream(site, round_idx, UPDATE))
    vote += noise.normal(vote_noise_std, site_stream(site, round_idx, VOTE))
    return SiteRelease(total.to(updates[0].dtype), vote, len(updates), tuple(norms))


@dataclass(frozen=True)
class CloudRelease:
    """The cloud's result of a round: the update to apply, the estimated share of units whose
    update was within the bound (noised when clipping is adaptive), and the std of the noise
    the cloud itself added to the sum."""

    vector: Tensor
    unclipped_fraction: float | None
    noise_std: float
    reclipped: int


class DpSum:
    """The cloud's half of DP-FedAvg: sum, noise, fixed denominator.

    Args:
        noise_multiplier: ``z``; the released sum carries ``N(0, (z C)^2)`` per coordinate.
        expected_units: the fixed denominator, the expected number of units per round.
        expected_sites: the expected number of sites per round, that each add ``1/m`` of the
            noise's variance with distributed noise.
        distributed: sites add the noise (their shares); the cloud adds only what the shares
            of sites that did not arrive would have added.
        vote_noise_std: std of the noise on the sum of clipping votes (adaptive clipping), or
            None when the clipping bound is fixed.
        noise: the cloud's noise source.
    """

    def __init__(self, noise_multiplier: float, expected_units: float, expected_sites: float,
                 distributed: bool, vote_noise_std: float | None, noise: GaussianNoise) -> None:
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if expected_units <= 0 or expected_sites <= 0:
            raise ValueError(f"expected units ({expected_units}) and sites ({expected_sites}) "
                             "per round must be > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.expected_units = float(expected_units)
        self.expected_sites = float(expected_sites)
        self.distributed = distributed
        self.vote_noise_std = vote_noise_std
        self.noise = noise

    def missing_share(self, arrived_sites: int) -> float:
        """The part of the noise variance the cloud adds: all of it with central noise; with
        distributed noise that of the expected sites that sent no share."""
        if not self.distributed:
            return 1.0
        return max(0.0, self.expected_sites - arrived_sites) / self.expected_sites

    def release(self, vectors: Sequence[Tensor], bounds: Sequence[float],
                votes: Sequence[float] | None, clip_norm: float, round_idx: int,
                units: int) -> CloudRelease:
        """The round's update from the sites' releases.

        ``bounds``: the L2 bound of each vector (``C`` times the units it sums); with central
        noise the cloud enforces them again (a no-op for an honest site). ``votes``: the sites'
        vote sums, when they sent them. ``units``: how many units the vectors sum.
        """
        if not vectors:
            raise ValueError("nothing to release: no site updates")
        total = torch.zeros(vectors[0].numel(), dtype=torch.float64)
        reclipped = 0
        for vector, bound in zip(vectors, bounds, strict=True):
            if not self.distributed:  # a noised share is meant to exceed the bound
                vector, norm = clip(vector.reshape(-1), bound)
                reclipped += norm > bound * (1 + 1e-5)
            total += vector.reshape(-1).double()
        out = self.release_sum(total, len(vectors), votes, clip_norm, round_idx, units)
        return CloudRelease(out.vector.to(vectors[0].dtype), out.unclipped_fraction,
                            out.noise_std, int(reclipped))

    def release_sum(self, total: Tensor, arrived_sites: int, votes: Sequence[float] | None,
                    clip_norm: float, round_idx: int, units: int) -> CloudRelease:
        """The round's update from the sum of ``arrived_sites`` sites' releases, when the cloud
        holds only that sum (secure aggregation): noise (or the top-up for the missing shares),
        the fixed denominator. The sites' bounds were enforced at the sites (the cloud cannot
        re-clip what it never sees), so ``reclipped`` is 0. ``total`` is float64; so is the
        result."""
        if arrived_sites < 1:
            raise ValueError("nothing to release: no site updates")
        total = total.reshape(-1).to(torch.float64, copy=True)
        share = self.missing_share(arrived_sites)
        std = self.noise_multiplier * clip_norm * math.sqrt(share)
        total += self.noise.normals(total.numel(), std, cloud_stream(round_idx, UPDATE))
        out = total / self.expected_units
        return CloudRelease(out, self._unclipped(votes, share, round_idx, units), std, 0)

    def _unclipped(self, votes: Sequence[float] | None, share: float, round_idx: int,
                   units: int) -> float | None:
        if votes is None or not votes:
            return None
        total = math.fsum(votes)
        if self.vote_noise_std is None:  # a fixed bound: an exact diagnostic (trusted cloud)
            return None if units == 0 else total / units + 0.5
        total += self.noise.normal(self.vote_noise_std * math.sqrt(share),
                                   cloud_stream(round_idx, VOTE))
        return total / self.expected_units + 0.5


@dataclass
class AdaptiveClip:
    """The clipping bound that tracks a quantile of the units' update norms (Andrew et al.,
    2021, geometric update): ``C <- C exp(-lr (unclipped - target_quantile))``, where
    ``unclipped`` is the privately estimated share of units whose update was within ``C``."""

    clip_norm: float
    target_quantile: float
    lr: float

    def update(self, unclipped_fraction: float) -> float:
        self.clip_norm *= math.exp(-self.lr * (unclipped_fraction - self.target_quantile))
        return self.clip_norm
