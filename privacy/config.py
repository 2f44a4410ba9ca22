"""The settings of a secure-aggregation round, the same at the cloud and at every site."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from privacy.fixed_point import FixedPoint


@dataclass(frozen=True)
class SecAggConfig:
    """What every party of a round must agree on.

    Args:
        dim: the length of an update (the model's parameter count).
        clip: the L2 bound each site clips its update to; sizes the ring's scale.
        bits: ring size ``k`` (Z_{2^k}); 32 costs the bytes of float32.
        max_participants: the most sites a round may have; sizes the ring so their sum cannot
            wrap. A roster larger than this is refused.
        threshold: ``t``: shares needed to reconstruct a site's secret. The round completes
            while at least ``t`` sites (of each site's neighbourhood, with SecAgg+) remain; the
            cloud colluding with fewer than ``t`` sites learns nothing beyond the sum.
            :func:`majority_threshold` is the usual choice.
        neighbours: ``None`` for the complete graph (SecAgg), or an even degree ``k`` for the
            SecAgg+ graph (:func:`privacy.graph.secagg_plus_degree`); ``t`` then counts within a
            site's neighbourhood of ``k + 1`` (the site and its neighbours).
    """

    dim: int
    clip: float
    bits: int
    max_participants: int
    threshold: int
    neighbours: int | None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if self.max_participants < 2:
            raise ValueError(f"secure aggregation needs at least 2 participants, got "
                             f"max_participants={self.max_participants}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(f"neighbours must be None or an even number >= 2, got "
                             f"{self.neighbours}")
        holders = self.max_participants if self.neighbours is None else min(
            self.neighbours + 1, self.max_participants)
        if not 1 <= self.threshold <= holders:
            raise ValueError(f"threshold must be in [1, {holders}] (the holders of each "
                             f"site's shares), got {self.threshold}")
        self.fixed_point  # noqa: B018  (validates bits against max_participants now)

    @cached_property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.clip, self.max_participants, self.bits)


def majority_threshold(n: int) -> int:
    """``n // 2 + 1``: tolerates ``n - t`` dropouts, and a majority keeps a cloud that lied
    about who dropped from collecting enough shares of both secrets of one site."""
    return n // 2 + 1
