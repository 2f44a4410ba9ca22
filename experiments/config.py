"""Experiment configs: YAML in, a validated and fully resolved object out.

Every section forbids unknown keys, so a typo (``inner_lr`` spelt ``inner_rl``) is an error that
names the key and its place, not a silently ignored default. The resolved config (defaults
filled in) is written into each run folder, so a run can be re-evaluated or served from it alone.

At about 510 lines this module is over the project's 400-line guide on purpose: it holds every
section and every check of how sections must agree (privacy, secure aggregation, attacks, the
aggregation rule against the quorum, compression, local-work budgets, asynchronous rounds), so
that the refused combinations and their reasons read in one place. The sections with many keys
of their own live beside it (:mod:`experiments.aggregation_config`,
:mod:`experiments.privacy_config`, :mod:`experiments.secagg_config`,
:mod:`experiments.compression_config`, :mod:`experiments.tracking_config`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from experiments.aggregation_config import AggregatorConfig, WeightedMeanRule
from experiments.compression_config import CompressionConfig
from experiments.privacy_config import PrivacyConfig
from experiments.secagg_config import SecureAggregationConfig
from experiments.section import Section
from experiments.site_data_config import SiteDataConfig
from experiments.tracking_config import TrackingConfig
from metalearn.algorithms import classifier_only
from metalearn.attacks import alie_z_max
from metalearn.storage import Location, is_uri
from privacy.config import SecAggConfig, majority_threshold


class SplitConfig(Section):
    """Which classes of a class data set without a standard split are kept for meta-test."""

    test_fraction: float = Field(0.2, ge=0, lt=1, description="share of the classes held out "
                                 "for meta-test, drawn by seed")
    seed: int = 0
    test_classes: list[str] | None = Field(None, description="meta-test classes by name "
                                           "(folder names); overrides test_fraction")


class DataConfig(Section):
    """Which tasks: a data set of the registry (:mod:`metalearn.data.registry`): Omniglot
    N-way K-shot episodes, sinusoid regression, an image folder of the user's, or one that
    a plug-in registered."""

    dataset: str = Field("omniglot", description="omniglot, sinusoid, image_folder, or a "
                         "registered data set")
    path: str | None = Field(None, description="omniglot.npz file or folder; default: search")
    root: str | None = Field(None, description="image_folder: one sub-folder per class")
    image_size: int | tuple[int, int] | None = Field(
        None, description="image_folder: size images are resized to, an int or [height, "
                          "width]; default 28")
    channels: int | None = Field(None, description="image_folder: 1 (grey) or 3 (RGB); "
                                 "default 1")
    split: SplitConfig | None = Field(None, description="image_folder: meta-test classes; "
                                      "default a seeded 20 %")
    ways: int = Field(5, ge=1)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    rotations: bool = True
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="settings of a plugged-in data set")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        from metalearn.data.registry import get_source

        get_source(self.dataset).check(self.model_dump(mode="json"))
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} is above high {hi}")
        return self

    def input_shape(self) -> tuple[int, ...]:
        """One input's shape, from the data set: ``(channels, height, width)`` for images."""
        from metalearn.data.registry import get_source

        return get_source(self.dataset).input_shape(self.model_dump(mode="json"))

    @property
    def test_tasks(self) -> str:
        """What meta-test episodes are made of, in words (sinusoid has no classes)."""
        return ("sine tasks (new amplitudes and phases)" if self.dataset == "sinusoid"
                else "held-out classes")


class ModelConfig(Section):
    """The network. The algorithm chooses how it is wrapped (ProtoNet: the conv net without a
    head; Matching Networks and Siamese: their embedding around it; CAVIA: context inputs;
    hallucination, MANN, VERSA: the conv net as the encoder of their own networks)."""

    name: Literal["omniglot_conv", "sinusoid_mlp"] = "omniglot_conv"
    channels: int = Field(64, ge=1)
    pooling: Literal["stride", "max"] = "stride"
    hidden: int = Field(40, ge=1)
    fce: bool = Field(False, description="matching: full context embeddings (LSTMs)")
    fce_steps: int = Field(5, ge=1, description="matching with fce: attention LSTM steps")
    twin_units: int = Field(128, ge=1, description="siamese: the twin's sigmoid layer")
    context: int | None = Field(None, ge=1, description="cavia: context parameters; "
                                "default 4 (sinusoid) or 100 (conv, through FiLM)")
    noise_dim: int = Field(16, ge=1, description="hallucination: the generator's noise width")
    generator_units: int = Field(128, ge=1, description="hallucination: the generator's "
                                 "hidden layers")
    controller_units: int = Field(200, ge=1, description="mann: the LSTM controller's units")
    memory_slots: int = Field(128, ge=1, description="mann: rows of the external memory")
    memory_width: int = Field(40, ge=1, description="mann: width of a memory row")
    amortizer_units: int = Field(128, ge=1, description="versa: the amortization network's "
                                 "hidden layers")


#: Model settings that belong to one algorithm: setting one for another is an error.
MODEL_SETTINGS_OF = {"fce": "matching", "fce_steps": "matching", "twin_units": "siamese",
                     "context": "cavia", "noise_dim": "hallucination",
                     "generator_units": "hallucination", "controller_units": "mann",
                     "memory_slots": "mann", "memory_width": "mann",
                     "amortizer_units": "versa"}


class AlgorithmConfig(Section):
    name: Literal["maml", "fomaml", "reptile", "anil", "metasgd", "protonet", "matching",
                  "siamese", "cavia", "hallucination", "mann", "versa"] = "maml"
    inner_lr: float = Field(0.4, gt=0)
    inner_steps: int = Field(1, ge=0)
    test_steps: int | None = Field(None, ge=0, description="default: inner_steps")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="algorithm-specific, e.g. {impl: func}")


class TrainConfig(Section):
    meta_batch: int = Field(32, ge=1)
    steps: int = Field(1000, ge=0)
    outer_lr: float = Field(1e-3, gt=0)
    outer_optimizer: Literal["adam", "sgd"] = "adam"
    time_budget_s: float | None = Field(None, gt=0, description="stop early after this long")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(0, ge=0, description="0: only at the end")
    eval_episodes: int = Field(100, ge=1, description="episodes of each intermediate evaluation")


class EvalConfig(Section):
    """Meta-test protocol. ``ways``/``shots``/``queries`` default to the training episodes'
    (ProtoNet trains on 60-way episodes and tests on 5-way; MAML's sinusoid tests 5-shot)."""

    episodes: int = Field(600, ge=1)
    ways: int | None = Field(None, ge=1)
    shots: int | None = Field(None, ge=1)
    queries: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=0, description="adaptation steps; default test_steps")
    steps_list: list[int] = Field(default_factory=lambda: [0, 1, 5, 10],
                                  description="sinusoid: MSE after each number of steps")
    batch: int = Field(32, ge=1)
    seed: int = 1234


def check_privacy(fed: FederatedConfig, topology: Any) -> None:
    """What cannot compose with ``federated.privacy``, each with its reason."""
    dp = fed.privacy
    if dp is None:
        return
    if fed.aggregator.name != "weighted_mean":
        raise ValueError(
            f"federated.privacy replaces the aggregation rule with a noised sum of clipped "
            f"updates; leave aggregator at weighted_mean (got {fed.aggregator.name!r}): the "
            "noise is calibrated to a sum's sensitivity, which a median, a trimmed mean or "
            "another clipping layer does not have")
    if topology.attackers:
        raise ValueError(
            f"federated.privacy with attacking sites {topology.attackers}: a private site clips "
            "its honest update before anything leaves it, so the configured attack would never "
            "be sent; simulate attacks without privacy (robust rules need individual updates, "
            "which the noised sum does not give either)")
    if dp.noise == "distributed" and fed.personalize_episodes > 0:
        raise ValueError(
            "federated.privacy.noise distributed trusts the cloud with noised sums only, but "
            "the personalization report sends each site's held-out scores un-noised; set "
            "federated.personalize_episodes to 0")
    if dp.sampling == "fixed" and dp.accountant == "pld":
        sites = len(topology.sites)
        sampled = (fed.sites_per_round(sites) < sites if dp.unit == "site" else
                   any((fed.devices_per_site or s.devices) > (fed.devices_per_round or 1e9)
                       for s in topology.sites))
        if sampled:
            raise ValueError(
                "the PLD accountant has no event for fixed-size sampling without replacement; "
                "use accountant: rdp or sampling: poisson")
    units = (len(topology.sites) if dp.unit == "site"
             else sum(fed.devices_per_site or s.devices for s in topology.sites))
    if dp.delta >= 1.0 / units:
        raise ValueError(
            f"federated.privacy.delta {dp.delta} is not below 1 / {units} {dp.unit}s: a "
            "guarantee with such a delta allows releasing one unit's data outright")


def secure_rule_refusal(name: str) -> str:
    """Why ``aggregator: name`` cannot run under secure aggregation, and what to use instead."""
    why = (f"federated.secure_aggregation leaves the cloud only the sum of the updates, but "
           f"aggregator {name} needs each update on its own")
    if name in ("norm_bound", "clip_noise"):
        return (f"{why} (it clips every update at the cloud); secure aggregation's own clip "
                "bounds each update at its site (norm_bound with weighted_mean is "
                "secure_aggregation.clip), and federated.privacy adds noise with an accountant "
                "on top of it: use aggregator weighted_mean")
    return (f"{why} (it ranks, trims or selects updates against each other, which masked "
            "updates do not allow); robust aggregation and secure aggregation do not compose: "
            "use aggregator weighted_mean, or run without secure_aggregation")


def check_secure_aggregation(fed: FederatedConfig, topology: Any) -> None:
    """What cannot compose with ``federated.secure_aggregation``, each with its reason (the
    aggregation rule is checked with the rule, :meth:`FederatedConfig._check_aggregator`).

    Allowed on purpose: attacking sites (an attacker's update is clipped at its site and masked
    like any other: secure aggregation hides it, which is worth measuring), ``fail_sites`` (a
    site that shares its keys and then fails its round: its masks are rebuilt from shares),
    and ``privacy`` (the noised sum composes; the clip bound then comes from it).
    """
    sa = fed.secure_aggregation
    if sa is None:
        return
    sites = len(topology.sites)
    called = fed.sites_per_round(sites)
    if called < 2:
        raise ValueError(
            f"federated.secure_aggregation needs at least 2 sites per round (now {called}: "
            f"{sites} sites x site_fraction {fed.site_fraction}): the sum of one update is "
            "the update")
    if fed.privacy is None and sa.clip is None:
        raise ValueError(
            "federated.secure_aggregation.clip is required: each site clips its update to this "
            "L2 norm before masking, and the ring is sized by it so that a sum cannot wrap")
    if fed.privacy is not None and sa.clip is not None:
        raise ValueError(
            "federated.secure_aggregation.clip must be left out with federated.privacy: the "
            "sites already clip to privacy.clip_norm, and the masking bound is derived from it "
            "(clip_norm x the units a site sums, plus the noise share with distributed noise); "
            "two bounds would have to agree")
    t = secure_threshold(fed, sites)
    holders = called if sa.neighbours is None else min(called, sa.neighbours + 1)
    if t > holders:
        where = ("sites called per round" if sa.neighbours is None
                 else f"holders of a site's shares (neighbours {sa.neighbours} + 1, at most "
                      "the sites called per round)")
        raise ValueError(
            f"federated.secure_aggregation.threshold {t} exceeds the {holders} {where}: every "
            "round would abort")
    try:
        SecAggConfig(dim=1, clip=1.0, bits=sa.bits, max_participants=sites, threshold=t,
                     neighbours=sa.neighbours)
    except ValueError as err:
        raise ValueError(f"federated.secure_aggregation: {err}") from None


def check_compression(fed: FederatedConfig) -> None:
    """What cannot compose with ``federated.compression``, each with its reason. Allowed:
    ``privacy`` with central noise (the site clips first, then compresses; the cloud decodes
    and re-clips each update before the noised sum, so the sensitivity holds), attacks (an
    attacker's update is compressed like any other), every aggregation rule."""
    comp = fed.compression
    if comp is None:
        return
    if fed.secure_aggregation is not None:
        raise ValueError(
            f"federated.compression ({comp.codec}) cannot run with federated."
            "secure_aggregation: the masked update is a vector of ring integers, uniformly "
            "random, that no codec can shrink, and a compressed update cannot be masked "
            "without decoding it at the site first; drop one of the two")
    if fed.privacy is not None and fed.privacy.noise == "distributed":
        raise ValueError(
            f"federated.compression ({comp.codec}) cannot run with federated.privacy.noise "
            "distributed: each site's noise share must reach the sum exactly for the shares "
            "to add up to the calibrated Gaussian, and the cloud cannot re-clip a noised "
            "share after decoding; use noise: central, or no compression")


def secure_threshold(fed: FederatedConfig, sites: int) -> int:
    """The configured threshold, or a majority of the holders of a site's shares: the sites
    called per round, or a SecAgg+ neighbourhood (the site and its neighbours)."""
    sa = fed.secure_aggregation
    if sa is None:
        raise ValueError("federated.secure_aggregation is not set")
    if sa.threshold is not None:
        return sa.threshold
    called = fed.sites_per_round(sites)
    holders = called if sa.neighbours is None else min(called, sa.neighbours + 1)
    return majority_threshold(holders)


class FederatedConfig(Section):
    """Federated meta-training across edge sites (``edgemeta federated``).

    A round is one outer step of the cloud, so the ``train`` section keeps its meaning per
    round: ``train.steps`` is the number of rounds, and ``outer_lr``, ``outer_optimizer``,
    ``log_every``, ``checkpoint_every``, ``eval_every`` and ``time_budget_s`` count rounds.
    ``train.meta_batch`` is the total number of tasks of a round over all sites, unless
    ``tasks_per_site`` says otherwise; with ``local_steps: 1`` and ``site_fraction: 1`` a round
    is then exactly one centralized step on ``sites * tasks_per_site`` tasks.
    """

    topology: str | int | dict[str, Any] = Field(
        4, description="a topology YAML (path, or a name in cluster/topologies), a number of "
                       "uniform sites, or an inline topology; {sites: N} is N uniform sites")
    tasks_per_site: int | None = Field(
        None, ge=1, description="tasks per site and local step; default ceil(meta_batch / sites)")
    local_steps: int = Field(1, ge=1, description="1: meta-gradients; E > 1: E local "
                                                  "meta-steps, parameter deltas")
    local_lr: float = Field(1e-3, gt=0, description="step size of local meta-steps (E > 1)")
    local_optimizer: Literal["sgd", "adam"] = "sgd"
    local_time_budget_s: float | None = Field(
        None, gt=0, description="seconds of local work a round: each site takes as many "
                                "local meta-steps as fit (at least 1, at most local_steps)")
    site_fraction: float = Field(1.0, gt=0, le=1, description="share of sites called per round")
    devices_per_site: int | None = Field(
        None, ge=1, description="virtual clients per site; default: the topology's devices")
    devices_per_round: int | None = Field(
        None, ge=1, description="devices sampled per called site and round; default: all")
    deadline_s: float | None = Field(None, gt=0, description="wait this long for a round; "
                                                             "later updates count as late")
    quorum: int = Field(1, ge=1, description="fewest updates that make an outer step")
    max_missed_rounds: int = Field(3, ge=1, description="consecutive rounds below quorum "
                                                        "before the run fails")
    aggregator: AggregatorConfig = Field(default_factory=WeightedMeanRule)
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="share of each site's "
                                    "characters held out for the personalization report")
    personalize_episodes: int = Field(100, ge=0, description="held-out tasks per site for "
                                      "the before/after adaptation report; 0 skips it, and "
                                      "the site models with it")
    personalize_steps: int | None = Field(
        None, ge=0, description="meta-steps each site takes from the meta-model on its own "
                                "training tasks to make its model site-NAME (a personalized "
                                "initialisation, adapted per request when served; a few steps "
                                "move it toward the site's tasks without forgetting the rest); "
                                "0: no site models; default 5, or 0 under privacy or secure "
                                "aggregation (the model would leave the site un-noised)")
    site_models_every: int = Field(0, ge=0, description="also make the site models every this "
                                   "many rounds (sync mode; 0: at the end of training only)")
    address: str | None = Field(None, description="Ray address; default: an embedded cluster")
    stop_after_rounds: int | None = Field(
        None, ge=1, description="testing aid: checkpoint and stop after this round")
    fail_sites: list[str] = Field(default_factory=list,
                                  description="testing aid: these sites raise every round")
    privacy: PrivacyConfig | None = Field(None, description="client-level differential "
                                          "privacy (DP-FedAvg); none by default")
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="mask the updates: the cloud learns only their sum; none by default")
    data: SiteDataConfig = Field(default_factory=SiteDataConfig,
                                 description="the sites' stores and how they are sharded")
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: rounds; async: FedBuff, sites train continuously and the "
                            "cloud applies an update every buffer_size results")
    buffer_size: int = Field(2, ge=1, description="async: results per applied update (K)")
    compression: CompressionConfig | None = Field(
        None, description="how sites compress their updates (codec fp16, int8 or topk); "
                          "none: float32")

    @model_validator(mode="after")
    def _check(self) -> FederatedConfig:
        topology = self.resolved_topology()
        names = topology.site_names
        unknown = sorted(set(self.fail_sites) - set(names))
        if unknown:
            raise ValueError(f"fail_sites {unknown} are not sites of the topology {names}")
        called = self.sites_per_round(len(names))
        if self.quorum > called:
            raise ValueError(f"quorum {self.quorum} exceeds the {called} sites called per "
                             f"round ({len(names)} sites x site_fraction {self.site_fraction})")
        self._check_aggregator(called, len(names))
        self._check_attacks(topology, called)
        if self.devices_per_round is not None:
            fewest = min(self.devices_per_site or s.devices for s in topology.sites)
            if self.devices_per_round > fewest:
                raise ValueError(f"devices_per_round {self.devices_per_round} exceeds the "
                                 f"{fewest} devices of the smallest site")
            if self.tasks_per_site is not None and self.devices_per_round > self.tasks_per_site:
                raise ValueError(f"devices_per_round {self.devices_per_round} exceeds "
                                 f"tasks_per_site {self.tasks_per_site}: some devices would "
                                 "sample no task")
        check_privacy(self, topology)
        check_secure_aggregation(self, topology)
        check_compression(self)
        self._check_local_work()
        self._check_site_models()
        return self

    def _check_site_models(self) -> None:
        """A site model is the site's parameters in clear: not under privacy or masking."""
        guarded = ("federated.privacy" if self.privacy is not None else
                   "federated.secure_aggregation" if self.secure_aggregation is not None
                   else None)
        if guarded and self.personalize_steps:
            raise ValueError(
                f"personalize_steps {self.personalize_steps} with {guarded}: a site model "
                "is the site's own parameters, sent to the cloud un-noised and unmasked; set "
                "federated.personalize_steps to 0")
        if self.site_models_every and self.mode != "sync":
            raise ValueError("site_models_every works with rounds (mode: sync); an "
                             "asynchronous run makes its site models at the end")

    @property
    def site_model_steps(self) -> int:
        """``personalize_steps`` resolved: 5 unless privacy or secure aggregation is on."""
        if self.personalize_steps is not None:
            return self.personalize_steps
        return 0 if self.privacy is not None or self.secure_aggregation is not None else 5

    def _check_local_work(self) -> None:
        """A time budget sizes local work between 1 and ``local_steps`` steps; FedNova
        normalises plain local SGD; availability schedules do not compose with privacy."""
        if self.local_time_budget_s is not None and self.local_steps < 2:
            raise ValueError(
                f"local_time_budget_s {self.local_time_budget_s} with local_steps 1 changes "
                "nothing: local_steps is the most local meta-steps a site takes within the "
                "budget; set it above 1")
        comes_and_goes = [s.name for s in self.resolved_topology().sites
                          if s.availability is not None]
        if comes_and_goes and self.privacy is not None:
            raise ValueError(
                f"sites {comes_and_goes} have an availability schedule, and federated.privacy "
                "accounts each round as a random sample of the sites it chose; a site's "
                "absence follows its schedule instead, which the accountant does not model: "
                "drop availability or privacy")
        if self.mode == "async":
            self._check_async(len(self.resolved_topology().sites))
        if self.aggregator.name == "fednova" and self.local_optimizer != "sgd":
            raise ValueError(
                "aggregator fednova normalises by the local step count, which is exact for "
                f"plain local SGD only; set local_optimizer: sgd (got {self.local_optimizer})")

    def _check_aggregator(self, called: int, sites: int) -> None:
        """The rule must be able to combine every round it is given: any count of arrived
        updates from ``quorum`` to the sites called (late and failed sites lower the count)."""
        rule = self.aggregator.build()
        need = rule.min_updates()
        if self.quorum < need:
            calls = ("" if called >= need else
                     f", and call at least {need} sites per round (now {called}: {sites} "
                     f"sites x site_fraction {self.site_fraction})")
            raise ValueError(f"aggregator {rule.name} {rule.requirement()} in every round it "
                             f"aggregates, but quorum {self.quorum} lets rounds with as few as "
                             f"{self.quorum} be aggregated: set quorum >= {need}{calls}")
        if self.secure_aggregation is not None and rule.needs_individual_updates:
            raise ValueError(secure_rule_refusal(self.aggregator.name))

    def _check_async(self, sites: int) -> None:
        """What asynchronous rounds (FedBuff) cannot run with, each with its reason."""
        if self.buffer_size > sites:
            raise ValueError(f"buffer_size {self.buffer_size} exceeds the {sites} sites: at most "
                             "one result per site is in flight, so the buffer could never fill")
        for name, why in (
                ("privacy", "its accountant counts rounds of sampled sites, and an "
                            "asynchronous update has neither"),
                ("secure_aggregation", "masks cancel only in the sum of one round's cohort, "
                                       "and asynchronous results arrive one by one")):
            if getattr(self, name) is not None:
                raise ValueError(f"federated.mode async cannot run with federated.{name}: {why}")
        if self.aggregator.name != "weighted_mean":
            raise ValueError(
                f"federated.mode async aggregates with FedBuff's staleness-weighted mean; leave "
                f"aggregator at weighted_mean (got {self.aggregator.name!r})")

    def _check_attacks(self, topology: Any, called: int) -> None:
        """Attacks whose parameters cannot work with this federation."""
        for site in topology.sites:
            attack = site.attack
            if attack is not None and site.name in self.fail_sites:
                raise ValueError(f"site {site.name} is in fail_sites and has an attack: a site "
                                 "that fails every round never sends its attack")
            if attack is not None and attack.name == "alie" and attack.z is None:
                z = self.alie_z(topology)
                if z <= 0:
                    raise ValueError(
                        f"site {site.name}: alie's z from Baruch et al. for {called} sites per "
                        f"round and {len(topology.attackers)} attacker(s) is {z:.3g}: the site "
                        "would send the honest mean; give attack.z explicitly or call more sites")

    def alie_z(self, topology: Any) -> float:
        """Baruch et al.'s ``z_max`` for this federation: ``n`` = sites called per round,
        ``f`` = the topology's attacking sites (what an ``alie`` attack with ``z: null`` uses)."""
        called = self.sites_per_round(len(topology.sites))
        try:
            return alie_z_max(called, len(topology.attackers))
        except ValueError as err:
            raise ValueError(f"{err} (federated: {called} sites per round)") from None

    def sites_per_round(self, sites: int) -> int:
        return max(1, round(self.site_fraction * sites))

    def resolved_topology(self) -> Any:
        """The :class:`cluster.topology.Topology` that ``topology`` names."""
        from cluster.topology import load_topology, parse_topology, uniform_topology

        named = self.topology
        if isinstance(named, int):
            return uniform_topology(named)
        if isinstance(named, dict):
            if isinstance(named.get("sites"), int):
                return uniform_topology(named["sites"], **{k: v for k, v in named.items()
                                                           if k != "sites"})
            return parse_topology(named, "federated.topology")
        path = Path(named)
        bundled = Path(__file__).resolve().parents[1] / "cluster" / "topologies"
        for candidate in (path, bundled / path, bundled / f"{named}.yaml"):
            if candidate.is_file():
                return load_topology(candidate)
        raise ValueError(f"topology file {named!r} does not exist (looked in the working "
                         f"directory and {bundled})")


class ExperimentConfig(Section):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    federated: FederatedConfig | None = None
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        from metalearn.data.registry import get_source

        source = get_source(self.data.dataset)
        if self.model.name != source.model:
            raise ValueError(f"model {self.model.name!r} does not fit dataset "
                             f"{self.data.dataset!r}; use {source.model!r}")
        alg = self.algorithm.name
        if source.task_type == "regression" and classifier_only(alg):
            raise ValueError(f"{alg} is a classifier; it cannot learn {self.data.dataset} "
                             "regression")
        for key in sorted(MODEL_SETTINGS_OF):
            # a value away from its default, not a key present: a saved config has every key
            default = type(self.model).model_fields[key].default
            if MODEL_SETTINGS_OF[key] != alg and getattr(self.model, key) != default:
                raise ValueError(f"model.{key} is a setting of algorithm "
                                 f"{MODEL_SETTINGS_OF[key]!r}, not of {alg!r}")
        if alg == "mann" and (self.eval.ways or 0) > self.data.ways:
            raise ValueError(f"eval.ways {self.eval.ways} is more than MANN's data.ways "
                             f"{self.data.ways}: its output and label inputs have data.ways "
                             "classes")
        if self.model.name == "omniglot_conv" and self.model.pooling == "max":
            _, height, width = self.data.input_shape()
            if min(height, width) < 16:
                raise ValueError(f"model.pooling max halves the image four times: "
                                 f"data.image_size {height}x{width} is too small (16 at least)")
        if self.data.dataset != "omniglot" and self.federated is not None:
            for key in ("stores", "test_store"):
                if getattr(self.federated.data, key) is not None:
                    raise ValueError(f"federated.data.{key}: site stores hold omniglot "
                                     f"characters; {self.data.dataset} has no stores yet")
        return self

    @property
    def run_dir(self) -> Location:
        """The run's folder in run storage: ``output_dir`` (a folder or a URI such as
        ``s3://bucket/runs``) / ``name``."""
        return Location(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ConfigError(ValueError):
    """A config file that cannot be used, with a message that says where and why."""


CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config(name: str) -> Path | Location:
    """A config path, a file in run storage (``s3://bucket/configs/x.yaml``), or the name of a
    bundled config (``omniglot_maml_5w1s``)."""
    if is_uri(name):
        return Location(name)
    path = Path(name)
    if path.exists():
        return path
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.exists():
        return bundled
    choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no config file {name!r}; bundled configs: {choices}")


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | Location, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Read a YAML config (a local file, or one in run storage such as ``s3://...``), apply
    ``section.key=value`` overrides, and validate it."""
    path = Location(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return config_from_text(text, str(path), overrides)


def config_from_text(text: str, source: str, overrides: list[str] | None = None
                     ) -> ExperimentConfig:
    """A config from YAML text (``source`` names it in messages), with overrides applied."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {source} is not valid YAML: {err}") from None
    return parse_config(apply_overrides(raw, overrides or []), source)
