"""Differential privacy in a federated run: what ``federated.privacy`` means for the sites, for
the cloud's round and for the accountant (the maths is :mod:`privacy`; the driver,
:mod:`experiments.federated`, calls this module at four points: choosing participants, the
sites' jobs, a round's aggregate and row, and the checkpoint and summary).

Decisions worth knowing (``docs/PRIVACY.md`` has the threat models):

* **Who takes part is secret too.** Amplification by sampling assumes the adversary does not
  know which units a round used, so under privacy the participants come from the OS CSPRNG
  (``secrets.SystemRandom``), not from the run seed, unless ``privacy.seed`` (tests) is set.
* **Unit device.** The site-level choice of sites is data-independent; a device's guarantee is
  that of the sampling of devices within its site, bounded by the site with the highest
  sampling rate (Rényi divergence is jointly quasi-convex, so mixing over which sites were
  called costs nothing). Amplification by the choice of sites is not credited.
* **Every round counts.** A round below quorum releases nothing, yet is accounted: epsilon is
  then a function of the round count, so a resumed run recomputes it exactly and the number of
  rounds a target epsilon allows is known before the first round.
* **The cloud's own view** (distributed noise): what a cloud that sees only the sum of the
  sites' noised updates (secure aggregation) can learn, with no credit for sampling (it knows
  who took part) and the noise of the shares that actually arrived: ``epsilon_cloud``.
  Without secure aggregation it sees each site's update with its share only:
  ``epsilon_cloud_each``. Both are in each row; the summary's ``secure_aggregation`` says
  which one describes the run (``federated.secure_aggregation``).
"""

from __future__ import annotations

import json
import math
import random
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from actors.contract import SitePrivacy
from actors.federation import RoundOutcome
from experiments.config import ConfigError, FederatedConfig
from experiments.privacy_config import PrivacyConfig
from metalearn.storage import PathLike, location
from privacy.accounting import (
    Accountant,
    RoundSampling,
    effective_noise_multiplier,
    gaussian_epsilon,
)
from privacy.dp import AdaptiveClip, DpSum
from privacy.noise import GaussianNoise

PRIVACY_FILE = "privacy.json"  # the run folder's privacy metadata (for serving and reports)


def privacy_section(fed: FederatedConfig) -> PrivacyConfig:
    if fed.privacy is None:
        raise ConfigError("federated.privacy is not set")
    return fed.privacy


def devices_per_round(fed: FederatedConfig, devices: Mapping[str, int]) -> dict[str, int]:
    """Devices each called site uses in a round (its expected number, with Poisson sampling)."""
    return {s: min(fed.devices_per_round or n, n) for s, n in devices.items()}


def round_sampling(fed: FederatedConfig, devices: Mapping[str, int]) -> RoundSampling:
    """The sampling of the privacy unit that :func:`choose` does, for the accountant."""
    dp = privacy_section(fed)
    n_sites = len(devices)
    if dp.unit == "site":
        k = fed.sites_per_round(n_sites)
        if dp.sampling == "poisson" and fed.site_fraction < 1:
            return RoundSampling("poisson", n_sites, rate=fed.site_fraction)
        if dp.sampling == "fixed" and k < n_sites:
            return RoundSampling("fixed", n_sites, sample=k)
        return RoundSampling("full", n_sites)
    used = devices_per_round(fed, devices)
    worst = max(devices, key=lambda s: used[s] / devices[s])
    n, d = devices[worst], used[worst]
    if d == n:
        return RoundSampling("full", sum(devices.values()))
    if dp.sampling == "poisson":
        return RoundSampling("poisson", n, rate=d / n)
    return RoundSampling("fixed", n, sample=d)


def expected_counts(fed: FederatedConfig, devices: Mapping[str, int]) -> tuple[float, float]:
    """(units, sites) expected per round: the fixed denominator, and the count of sites that
    share the noise when it is distributed."""
    dp = privacy_section(fed)
    n_sites = len(devices)
    if dp.unit == "site" and dp.sampling == "poisson":
        sites = fed.site_fraction * n_sites
    else:
        sites = float(fed.sites_per_round(n_sites))
    units = sites if dp.unit == "site" else (
        sites / n_sites * sum(devices_per_round(fed, devices).values()))
    return units, sites


def check_fits(fed: FederatedConfig, devices: Mapping[str, int], per_site: int) -> None:
    """Unit ``device``: every participating device must draw a task of its own (with Poisson
    sampling on average: a round that samples more devices than tasks leaves some idle, which
    costs accuracy, not privacy)."""
    if fed.privacy is None or fed.privacy.unit != "device":
        return
    most = max(devices_per_round(fed, devices).values())
    if most > per_site:
        raise ConfigError(f"federated.privacy.unit device: {most} devices per site and round "
                          f"share {per_site} tasks, so some would compute nothing; lower "
                          "devices_per_round or raise tasks_per_site")


def site_privacy(fed: FederatedConfig, devices: Mapping[str, int]) -> SitePrivacy | None:
    """What each site is told of privacy (the same for every site)."""
    if fed.privacy is None:
        return None
    dp = fed.privacy
    _, sites = expected_counts(fed, devices)
    distributed = dp.noise == "distributed"
    adaptive = dp.adaptive_clip
    return SitePrivacy(
        unit=dp.unit, clip_norm=dp.clip_norm,
        noise_multiplier_share=dp.noise_multiplier / math.sqrt(sites) if distributed else 0.0,
        vote_noise_std_share=(adaptive.count_noise_std / math.sqrt(sites)
                              if distributed and adaptive else 0.0),
        report_votes=not distributed or adaptive is not None,
        keep_metrics=not distributed, seed=dp.seed)


def choose(sites: Sequence[str], devices: Mapping[str, int], fed: FederatedConfig,
           round_idx: int) -> dict[str, list[int]]:
    """Participants of ``round_idx`` under privacy: the driver's sampling (``fixed``: the run's
    site fraction and devices per round, uniformly without replacement), or Poisson sampling
    of the unit at the same rates; drawn from the CSPRNG unless ``privacy.seed`` is set."""
    dp = privacy_section(fed)
    rng: random.Random = (secrets.SystemRandom() if dp.seed is None
                          else random.Random(f"edgemeta/dp/participants/{dp.seed}/{round_idx}"))
    n_sites = len(sites)
    if dp.unit == "site" and dp.sampling == "poisson":
        chosen = [i for i in range(n_sites) if rng.random() < fed.site_fraction]
    else:
        chosen = sorted(rng.sample(range(n_sites), fed.sites_per_round(n_sites)))
    used = devices_per_round(fed, devices)
    out = {}
    for i in chosen:
        site = sites[i]
        n, d = devices[site], used[site]
        if d == n:
            ids = list(range(n))
        elif dp.unit == "device" and dp.sampling == "poisson":
            ids = [j for j in range(n) if rng.random() < d / n]
        else:
            ids = sorted(rng.sample(range(n), d))
        if ids:
            out[site] = ids
    return out


class CloudPrivacy:
    """The cloud's side of privacy in a run: the noised sum, the clipping bound, the accountant.

    Its checkpoint state is the clipping bound (adaptive clipping moves it) and the precision
    ``sum 1/z_r^2`` of the rounds the cloud's own view has composed (distributed noise).
    """

    def __init__(self, dp: PrivacyConfig, sampling: RoundSampling, units: float, sites: float,
                 rounds: int, secure_aggregation: bool = False) -> None:
        self.dp, self.sampling = dp, sampling
        self.secure_aggregation = secure_aggregation
        self.units, self.sites = units, sites
        adaptive = dp.adaptive_clip
        self.vote_noise_std = None if adaptive is None else adaptive.count_noise_std
        self.multiplier = effective_noise_multiplier(dp.noise_multiplier, self.vote_noise_std)
        self.accountant = Accountant.of(sampling, self.multiplier, dp.delta, dp.accountant)
        self.sum = DpSum(dp.noise_multiplier, units, sites, dp.noise == "distributed",
                         self.vote_noise_std, GaussianNoise(dp.seed))
        self.adaptive = (None if adaptive is None else
                         AdaptiveClip(dp.clip_norm, adaptive.target_quantile, adaptive.clip_lr))
        self.requested_rounds = rounds
        self.rounds = (rounds if dp.target_epsilon is None
                       else self.accountant.rounds_within(dp.target_epsilon, rounds))
        if self.rounds == 0 and rounds > 0:
            raise ConfigError(f"federated.privacy.target_epsilon {dp.target_epsilon} is below "
                              f"the epsilon of a single round ({self.accountant.epsilon(1):.4g} "
                              f"at delta {dp.delta}): no round fits in the budget")
        self.cloud_precision = 0.0
        self._last: dict[str, Any] = {}

    @classmethod
    def start(cls, fed: FederatedConfig, devices: Mapping[str, int],
              rounds: int) -> CloudPrivacy | None:
        if fed.privacy is None:
            return None
        units, sites = expected_counts(fed, devices)
        return cls(fed.privacy, round_sampling(fed, devices), units, sites, rounds,
                   secure_aggregation=fed.secure_aggregation is not None)

    @property
    def clip_norm(self) -> float:
        """The bound of the coming round."""
        return self.dp.clip_norm if self.adaptive is None else self.adaptive.clip_norm

    @property
    def stops_early(self) -> bool:
        return self.rounds < self.requested_rounds

    def describe(self) -> str:
        """The plan in one line for the start of a run."""
        dp = self.dp
        line = (f"privacy: unit {dp.unit}, clip {dp.clip_norm:g}"
                f"{' (adaptive)' if self.adaptive else ''}, noise multiplier "
                f"{dp.noise_multiplier:g} ({dp.noise}), {self.sampling.describe()}, "
                f"{self.units:g} expected per round; epsilon {self.epsilon(self.rounds):.3f} at "
                f"delta {dp.delta:g} after {self.rounds} rounds ({dp.accountant})")
        if self.stops_early:
            line += (f"; round {self.rounds + 1} would exceed target epsilon "
                     f"{dp.target_epsilon:g}: training stops after round {self.rounds} of "
                     f"{self.requested_rounds}")
        return line

    def epsilon(self, rounds: int) -> float:
        return self.accountant.epsilon(rounds)

    # ------------------------------------------------------------------ a round

    def release(self, outcome: RoundOutcome, participants: Mapping[str, Sequence[int]],
                round_idx: int, total: Tensor | None = None) -> Tensor:
        """The round's update from what arrived (``outcome.updates``, in participant order):
        the noised sum over the expected number of units; moves an adaptive bound. Under
        secure aggregation ``total`` is the unmasked sum of the arrived sites' releases (the
        cloud holds no update of its own), and takes the place of their plain sum."""
        ok = {row["site"]: row for row in outcome.sites if row["status"] == "ok"}
        arrived = [site for site in participants if site in ok]
        units = [1 if self.dp.unit == "site" else len(participants[s]) for s in arrived]
        clip_norm = self.clip_norm
        votes = [float(ok[s]["clip_vote"]) for s in arrived if "clip_vote" in ok[s]]
        if total is None:
            result = self.sum.release([u.vector for u in outcome.updates],
                                      [clip_norm * n for n in units], votes or None, clip_norm,
                                      round_idx, sum(units))
        else:
            result = self.sum.release_sum(total, len(arrived), votes or None, clip_norm,
                                          round_idx, sum(units))
        if self.adaptive is not None and result.unclipped_fraction is not None:
            self.adaptive.update(result.unclipped_fraction)
        self._last = {"noise_std": result.noise_std}
        if total is None:  # under secure aggregation the cloud can re-clip nothing
            self._last["reclipped"] = result.reclipped
        if result.unclipped_fraction is not None:
            self._last["unclipped_fraction"] = result.unclipped_fraction
        return result.vector

    def round_fields(self, round_idx: int, clip_norm: float, arrived_sites: int) -> dict[str, Any]:
        """The privacy columns of round ``round_idx``'s row (every round is accounted)."""
        row = {"epsilon": self.epsilon(round_idx), "clip_norm": clip_norm, **self._last}
        self._last = {}
        if self.dp.noise == "distributed":
            if arrived_sites > 0:  # the sum of the shares that arrived: z sqrt(n / m)
                self.cloud_precision += self.sites / (arrived_sites * self.multiplier ** 2)
            row["epsilon_cloud"] = self.cloud_epsilon()
            row["epsilon_cloud_each"] = self.cloud_each_epsilon(round_idx)
        return row

    def cloud_epsilon(self) -> float:
        return gaussian_epsilon(self.cloud_precision, self.dp.delta, self.dp.accountant)

    def cloud_each_epsilon(self, rounds: int) -> float:
        """Against a cloud that sees each site's update with its share alone (no secure
        aggregation): ``z / sqrt(m)`` per round, a unit taking part in every round."""
        return gaussian_epsilon(rounds * self.sites / self.multiplier ** 2, self.dp.delta,
                                self.dp.accountant)

    # ------------------------------------------------------------------ state and reports

    def accounted(self) -> str:
        """What one round costs, as the accountant sees it: a resumed run must not change it,
        since its epsilon is recomputed from the round count."""
        return (f"{self.dp.unit} {self.dp.noise} {self.accountant.relation.name} "
                f"{self.accountant.event}")

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "cloud_precision": self.cloud_precision,
                "accounted": self.accounted()}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore from a checkpoint; refuse one whose rounds were accounted otherwise (or not
        at all), since epsilon would then not cover them."""
        if state is None:
            raise ConfigError("the latest checkpoint was written without federated.privacy: "
                              "its rounds have no guarantee to add to; start afresh (--fresh)")
        if state["accounted"] != self.accounted():
            raise ConfigError(f"federated.privacy changed since the latest checkpoint (its "
                              f"rounds: {state['accounted']}; now: {self.accounted()}); the "
                              "epsilon of the run would not cover them: start afresh (--fresh)")
        if self.adaptive is not None:
            self.adaptive.clip_norm = float(state["clip_norm"])
        self.cloud_precision = float(state["cloud_precision"])

    def summary(self, rounds: int) -> dict[str, Any]:
        """The final (epsilon, delta) and what they mean: ``summary.json`` and privacy.json."""
        dp = self.dp
        out: dict[str, Any] = {
            "unit": dp.unit, "epsilon": self.epsilon(rounds), "delta": dp.delta,
            "rounds": rounds, "accountant": dp.accountant, "noise": dp.noise,
            "noise_multiplier": dp.noise_multiplier, "effective_noise_multiplier": self.multiplier,
            "clip_norm": self.clip_norm, "adaptive_clip": self.adaptive is not None,
            "sampling": self.sampling.kind, "sampling_detail": self.sampling.describe(),
            "neighbouring": ("replace one " if self.sampling.kind == "fixed"
                             else "add or remove one ") + dp.unit,
            "expected_units_per_round": self.units, "target_epsilon": dp.target_epsilon,
            "stopped_by_target_epsilon": self.stops_early and rounds >= self.rounds,
            "secure_noise": dp.seed is None,
            "secure_aggregation": self.secure_aggregation,
        }
        if dp.noise == "distributed":
            out["epsilon_cloud"] = self.cloud_epsilon()
            out["epsilon_cloud_each"] = self.cloud_each_epsilon(rounds)
        return out

    def write(self, run_dir: PathLike, rounds: int) -> None:
        """``privacy.json`` in the run folder: the guarantee of the checkpointed model."""
        text = json.dumps(self.summary(rounds), indent=2, sort_keys=True) + "\n"
        (location(run_dir) / PRIVACY_FILE).write_text(text)


def read_privacy(run_dir: PathLike) -> dict[str, Any] | None:
    """A run folder's privacy metadata, or None for a run without privacy."""
    try:
        return json.loads((location(run_dir) / PRIVACY_FILE).read_text())
    except FileNotFoundError:
        return None

