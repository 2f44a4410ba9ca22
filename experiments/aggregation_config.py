"""The ``federated.aggregator`` section: one model per aggregation rule, told apart by ``name``.

The config is checked once, and ``build()`` makes the rule (:mod:`metalearn.aggregation`) with
the values checked here; the rules themselves have no defaults, so a default lives here alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, field_validator

from experiments.section import Section
from metalearn.aggregation import (
    Aggregator,
    Bulyan,
    ClipAndNoise,
    CoordinateMedian,
    FedNova,
    Krum,
    MultiKrum,
    NormBound,
    TrimmedMean,
    WeightedMean,
)

# One model per rule, told apart by ``name``: the config is checked once, and ``build()`` makes
# the rule (metalearn.aggregation) with the values checked here; the rules have no defaults.

def _known_rule(value: Any) -> Any:
    """Say which rules exist when ``name`` names none (pydantic's own message lists tags)."""
    if isinstance(value, dict):
        value = {"name": "weighted_mean", **value}
        if value["name"] not in AGGREGATION_RULES:
            raise ValueError(f"unknown aggregator {value['name']!r}; choose one of "
                             f"{', '.join(AGGREGATION_RULES)}")
    return value


class WeightedMeanRule(Section):
    """FedAvg: the mean weighted by each update's task count."""

    name: Literal["weighted_mean"] = "weighted_mean"

    def build(self) -> Aggregator:
        return WeightedMean()


class FedNovaRule(Section):
    """FedNova: per-step directions averaged, rescaled by the effective step count, so sites
    that did unequal local work (``local_time_budget_s``) weigh as their data, not their speed."""

    name: Literal["fednova"] = "fednova"

    def build(self) -> Aggregator:
        return FedNova()


class MedianRule(Section):
    """The coordinate-wise median (ignores task counts)."""

    name: Literal["median"] = "median"

    def build(self) -> Aggregator:
        return CoordinateMedian()


class TrimmedMeanRule(Section):
    """Drop the ``floor(trim * n)`` lowest and highest values of each coordinate, average."""

    name: Literal["trimmed_mean"] = "trimmed_mean"
    trim: float = Field(0.1, description="share trimmed at each end, in [0, 0.5)")

    @field_validator("trim")
    @classmethod
    def _trim(cls, value: float) -> float:
        if not 0.0 <= value < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {value}")
        return value

    def build(self) -> Aggregator:
        return TrimmedMean(self.trim)


class ClipNoiseRule(Section):
    """Clip each update to ``clip_norm``, aggregate with ``inner``, add Gaussian noise."""

    name: Literal["clip_noise"] = "clip_noise"
    inner: AggregatorConfig = Field(default_factory=WeightedMeanRule)
    clip_norm: float = Field(gt=0, description="L2 bound of each update")
    noise_multiplier: float = Field(0.0, ge=0, description="noise std / (clip_norm / n)")
    seed: int = Field(0, description="seed of the noise generator")

    def build(self) -> Aggregator:
        return ClipAndNoise(self.inner.build(), self.clip_norm, self.noise_multiplier, self.seed)


class KrumRule(Section):
    """Krum: the one update closest to its ``n - f - 2`` nearest others; needs n > 2f + 2."""

    name: Literal["krum"] = "krum"
    f: int = Field(1, ge=0, description="Byzantine updates the rule withstands per round")

    def build(self) -> Aggregator:
        return Krum(self.f)


class MultiKrumRule(Section):
    """Multi-Krum: the mean of the ``m`` updates of lowest Krum score; needs n > 2f + 2."""

    name: Literal["multi_krum"] = "multi_krum"
    f: int = Field(1, ge=0, description="Byzantine updates the rule withstands per round")
    m: int | None = Field(None, ge=1, description="updates averaged; null: n - f each round")

    def build(self) -> Aggregator:
        return MultiKrum(self.f, self.m)


class BulyanRule(Section):
    """Bulyan over Krum: n - 2f updates by Krum, then per coordinate the n - 4f values closest
    to the median, averaged; needs n >= 4f + 3."""

    name: Literal["bulyan"] = "bulyan"
    f: int = Field(1, ge=0, description="Byzantine updates the rule withstands per round")

    def build(self) -> Aggregator:
        return Bulyan(self.f)


class NormBoundRule(Section):
    """Clip each update to L2 norm ``max_norm``, then aggregate with ``inner`` (no noise)."""

    name: Literal["norm_bound"] = "norm_bound"
    inner: AggregatorConfig = Field(default_factory=WeightedMeanRule)
    max_norm: float = Field(gt=0, description="L2 bound of each update")

    def build(self) -> Aggregator:
        return NormBound(self.inner.build(), self.max_norm)


AggregatorConfig = Annotated[
    Union[WeightedMeanRule, FedNovaRule, MedianRule, TrimmedMeanRule,  # noqa: UP007
          ClipNoiseRule, KrumRule, MultiKrumRule, BulyanRule, NormBoundRule],
    Field(discriminator="name"),
    BeforeValidator(_known_rule),
]
AGGREGATION_RULES = ("weighted_mean", "fednova", "median", "trimmed_mean", "clip_noise", "krum",
                     "multi_krum", "bulyan", "norm_bound")
ClipNoiseRule.model_rebuild()
NormBoundRule.model_rebuild()


