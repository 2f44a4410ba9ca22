"""Secure aggregation in a federated run: what each site is told, the round's masking bound,
and the cloud's side of a round (the protocol: :mod:`privacy`; its calls:
:mod:`actors.secure_round`).

Decisions worth knowing:

* **Site ids** are the sites' positions in the sorted topology, plus one, fixed for the run (a
  site's id is also its Shamir x coordinate). The ring is sized for every site of the topology
  (``max_participants``), so a round of any subset of them cannot wrap.
* **The masking bound.** Without privacy it is ``secure_aggregation.clip``: each site clips its
  update to it before masking. With ``federated.privacy`` the sites already clip each unit to
  ``C`` (the round's bound: adaptive clipping moves it), so the masking bound is derived, never
  configured twice: ``C`` times the most units a site can sum in a round (1 for unit site; the
  devices a site uses per round, or all its devices with Poisson sampling), plus, with
  distributed noise, a high-probability bound on the norm of the site's noise share ``sigma``:
  ``sigma (sqrt(dim) + 12)``, exceeded with probability below ``exp(-72)`` (the Gaussian
  norm's concentration, Lipschitz 1). The site's clip to this bound is then a no-op; it only
  keeps the ring from wrapping.
* **The mean.** Every site computes the same number of tasks per round (``tasks_per_site``), so
  the task-weighted mean of the survivors' updates is their sum divided by their number; that
  is what ``weighted_mean`` becomes. Under privacy, the unmasked sum takes the place of the
  plain sum in :class:`experiments.dp.CloudPrivacy` (noise, fixed denominator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from actors.contract import SecAggJob
from actors.federation import Federation
from actors.secure_round import SecureRound, run_secure_round
from experiments import dp
from experiments.config import ConfigError, FederatedConfig, secure_threshold
from experiments.secagg_config import SecureAggregationConfig
from privacy.config import SecAggConfig

NOISE_TAIL = 12.0  # P(|g| > sqrt(dim) + t) <= exp(-t^2 / 2) for a standard normal vector g


def secagg_section(fed: FederatedConfig) -> SecureAggregationConfig:
    if fed.secure_aggregation is None:
        raise ConfigError("federated.secure_aggregation is not set")
    return fed.secure_aggregation


def site_ids(site_names: list[str]) -> dict[str, int]:
    """Each site's id in every round: its position in the sorted topology, plus one."""
    return {site: i + 1 for i, site in enumerate(sorted(site_names))}


def masking_bound(fed: FederatedConfig, devices: Mapping[str, int], dim: int,
                  clip_norm: float | None) -> float:
    """The L2 bound of what a site masks in a round (see the module's docstring).
    ``clip_norm``: the round's privacy clipping bound (None without privacy)."""
    sa = secagg_section(fed)
    if fed.privacy is None:
        if sa.clip is None:  # the config check refuses this
            raise ConfigError("federated.secure_aggregation.clip is required")
        return sa.clip
    if clip_norm is None:
        raise ValueError("under federated.privacy the masking bound needs the round's clip_norm")
    privacy = fed.privacy
    if privacy.unit == "site":
        units = 1
    elif privacy.sampling == "poisson":
        units = max(devices.values())
    else:
        units = max(dp.devices_per_round(fed, devices).values())
    bound = clip_norm * units
    shares = dp.site_privacy(fed, devices)
    if shares is not None and shares.noise_multiplier_share > 0:
        bound += shares.noise_multiplier_share * clip_norm * (math.sqrt(dim) + NOISE_TAIL)
    return bound


def run_config(fed: FederatedConfig, devices: Mapping[str, int], dim: int,
               clip_norm: float | None) -> SecAggConfig:
    """The settings every party shares, with the bound of a round whose privacy clipping bound
    is ``clip_norm``."""
    sa = secagg_section(fed)
    return SecAggConfig(dim=dim, clip=masking_bound(fed, devices, dim, clip_norm), bits=sa.bits,
                        max_participants=len(devices),
                        threshold=secure_threshold(fed, len(devices)), neighbours=sa.neighbours)


def site_jobs(fed: FederatedConfig, devices: Mapping[str, int], dim: int
              ) -> dict[str, SecAggJob | None]:
    """What each site is told of secure aggregation (None for every site when it is off)."""
    if fed.secure_aggregation is None:
        return dict.fromkeys(devices)
    first = None if fed.privacy is None else fed.privacy.clip_norm
    config = run_config(fed, devices, dim, first)
    return {site: SecAggJob(config, sid) for site, sid in site_ids(list(devices)).items()}


@dataclass
class CloudSecAgg:
    """The cloud's side of secure aggregation in a run: the shared settings, the site ids, the
    key exchanges' deadline. Nothing of it is checkpointed: keys and masks live one round."""

    fed: FederatedConfig
    devices: Mapping[str, int]
    config: SecAggConfig
    site_ids: dict[str, int]

    @classmethod
    def start(cls, fed: FederatedConfig, devices: Mapping[str, int],
              dim: int) -> CloudSecAgg | None:
        if fed.secure_aggregation is None:
            return None
        first = None if fed.privacy is None else fed.privacy.clip_norm
        return cls(fed, devices, run_config(fed, devices, dim, first), site_ids(list(devices)))

    def round(self, federation: Federation, round_idx: int,
              participants: Mapping[str, list[int]], params_ref: Any,
              clip_norm: float | None) -> SecureRound:
        """One secure round; ``clip_norm``: the round's privacy bound (None without privacy)."""
        bound = masking_bound(self.fed, self.devices, self.config.dim, clip_norm)
        config = self.config if bound == self.config.clip else replace(self.config, clip=bound)
        return run_secure_round(federation, config, self.site_ids, round_idx, participants,
                                params_ref, deadline_s=self.fed.deadline_s,
                                step_deadline_s=secagg_section(self.fed).step_deadline_s,
                                clip_norm=clip_norm, quorum=self.fed.quorum)

    def describe(self) -> str:
        """The plan in one line for the start of a run."""
        c = self.config
        graph = ("every pair of sites" if c.neighbours is None
                 else f"SecAgg+ with {c.neighbours} neighbours")
        bound = ("derived from privacy.clip_norm each round" if self.fed.privacy is not None
                 else f"{c.clip:g}")
        return (f"secure aggregation: {c.bits}-bit ring for up to {c.max_participants} sites, "
                f"threshold {c.threshold}, masks between {graph}, clip {bound}; the cloud "
                "sees only the sum")
