"""What crosses between the cloud and an edge site, as typed, frozen values, in one place.

Two messages make the federated protocol (besides the meta-parameters themselves, which travel
as one flat float32 vector, inline or as one object ref, so that Ray can pass them zero-copy):

* :class:`SiteJob` — what the cloud tells a site once, when its actor starts: how to build the
  model and algorithm, which share of the data is its own (ids, never examples), what local work
  a round means, how many devices it simulates, and the seed. The actor keeps it for its life
  (a restarted actor is rebuilt from the same job).
* :class:`RoundReply` — what a site returns each round: its update (flat, the model's parameter
  count), the tasks it stands for, scalar metrics and timings. Nothing derived row by row from
  the data.

Defaults live in the experiment config alone (:mod:`experiments.config`): every field here is
required, so a value can never silently differ between the cloud and a site. What later issues
add to the protocol (a clipping bound and noise share, a local-work time budget, a compression
setting, secure-aggregation keys) becomes a field of :class:`LocalWork` or a new frozen section
of :class:`SiteJob` (as :class:`Attack`, a malicious site's behaviour, :class:`SitePrivacy`,
how a site clips and noises, :class:`SecAggJob`, how it masks, :class:`Compression`, how it
compresses, and :class:`SiteConditions`, how fast, connected and available it is, are; the
time budget is ``LocalWork.time_budget_s``), and a field of :class:`RoundReply` for what
comes back (as the clipping vote, the masked input, the encoded update and the local step
count are).

Under secure aggregation the round has three more exchanges (advertise keys, share keys,
unmask), whose messages are :mod:`privacy.messages`' own frozen values: they cross as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from metalearn.compression import CodecName, Encoded
from privacy.config import SecAggConfig
from privacy.messages import MaskedInput

UpdateKind = Literal["gradient", "delta"]
AttackName = Literal["sign_flip", "scale", "gaussian", "alie", "label_flip"]


@dataclass(frozen=True)
class LocalWork:
    """What one round asks of a site.

    ``steps == 1``: the algorithm's own update (a meta-gradient for MAML and its kin) on
    ``tasks_per_step`` fresh tasks. ``steps > 1``: that many local meta-steps with
    ``optimizer`` at ``lr``, and the reply is the parameter delta (FedOpt).
    ``time_budget_s``: None, or the round's time for local work: the site takes as many
    meta-steps as fit (at least one, at most ``steps``), replies a delta and says how many
    (``RoundReply.local_steps``).
    """

    steps: int
    lr: float
    optimizer: Literal["sgd", "adam"]
    tasks_per_step: int
    time_budget_s: float | None


@dataclass(frozen=True)
class Attack:
    """How a malicious site corrupts its part of every round (the topology's ``attack`` of the
    site; the maths is :mod:`metalearn.attacks`). The site still replies as a normal
    participant: same kind, shape and task count; only the update (or its data) is poisoned.

    ``name`` says which fields count; the others are 0 (every field is required, so the cloud
    and the site can never disagree on a default):

    * ``sign_flip``: sends ``-factor * u``; ``scale``: sends ``factor * u``.
    * ``gaussian``: sends ``N(0, sigma^2)`` noise, seeded by (seed, site, round).
    * ``alie``: sends ``mean - z * std`` of ``samples`` honest updates it computes itself.
    * ``label_flip``: trains honestly on tasks whose labels it flipped (data poisoning).
    """

    name: AttackName
    factor: float
    sigma: float
    z: float
    samples: int

    def __post_init__(self) -> None:
        bad = {"sign_flip": self.factor <= 0, "scale": self.factor <= 0,
               "gaussian": self.sigma <= 0, "alie": self.samples < 2 or self.z < 0,
               "label_flip": False}
        if self.name not in bad:
            raise ValueError(f"unknown attack {self.name!r}; choose one of {', '.join(bad)}")
        if bad[self.name]:
            raise ValueError(f"attack {self}: parameters out of range")

    @property
    def poisons_data(self) -> bool:
        """True when the attack acts on the tasks, before the (then honest) update."""
        return self.name == "label_flip"


@dataclass(frozen=True)
class SitePrivacy:
    """How a site privatizes each round (``federated.privacy``; see ``docs/PRIVACY.md``).

    ``unit``: ``site`` clips the site's one update to ``clip_norm``; ``device`` computes each
    participating device's update on its own tasks, clips each, and sends their sum. The
    site's noise share has std ``noise_multiplier_share * C`` (``C``: the round's clipping bound,
    sent with each call when clipping is adaptive), its vote's share std
    ``vote_noise_std_share``; both are 0 with central noise, where the cloud adds all of it.
    ``report_votes``: send the sum of the units' clipping votes (for adaptive clipping, or as a
    diagnostic to a trusted cloud). ``keep_metrics``: send the un-noised losses and accuracies
    (not with distributed noise, whose cloud is not trusted with them). ``seed``: tests only;
    None draws noise from the OS CSPRNG.
    """

    unit: Literal["site", "device"]
    clip_norm: float
    noise_multiplier_share: float
    vote_noise_std_share: float
    report_votes: bool
    keep_metrics: bool
    seed: int | None

    def __post_init__(self) -> None:
        if self.unit not in ("site", "device"):
            raise ValueError(f"privacy unit must be site or device, got {self.unit!r}")
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier_share < 0 or self.vote_noise_std_share < 0:
            raise ValueError(f"noise shares must be >= 0, got {self}")


@dataclass(frozen=True)
class SecAggJob:
    """How a site takes part in secure aggregation (``federated.secure_aggregation``).

    ``config``: the settings every party of a round shares (``dim`` the parameter count,
    ``max_participants`` the number of sites, ``threshold``, ``neighbours``, ``bits``); its
    ``clip`` is the run's first bound: the bound of each round travels with the round's first
    call (``secagg_advertise``), because adaptive clipping under privacy moves it.
    ``site_id``: the site's id in every round (its index in the sorted topology, plus one; it is
    also its Shamir x coordinate), fixed for the run.
    """

    config: SecAggConfig
    site_id: int

    def __post_init__(self) -> None:
        if not 1 <= self.site_id <= self.config.max_participants:
            raise ValueError(f"secure aggregation site id must be in [1, "
                             f"{self.config.max_participants}], got {self.site_id}")


@dataclass(frozen=True)
class Compression:
    """How a site compresses its update before it leaves (``federated.compression``; the
    maths is :mod:`metalearn.compression`). Fields that do not belong to ``codec`` are 0.

    ``block``: int8's coordinates per scale (0: one scale per tensor of the model).
    ``fraction``: top-k's share of coordinates kept. ``error_feedback``: keep what the codec
    left out at the site and add it to the next update (top-k).
    """

    codec: CodecName
    block: int
    fraction: float
    error_feedback: bool

    def __post_init__(self) -> None:
        if self.codec not in ("fp16", "int8", "topk"):
            raise ValueError(f"unknown codec {self.codec!r}; choose fp16, int8 or topk")
        if self.block < 0 or (self.codec == "topk" and not 0 < self.fraction <= 1):
            raise ValueError(f"compression {self}: parameters out of range")


@dataclass(frozen=True)
class SiteConditions:
    """How fast, how well connected and how often reachable a site is (the topology's
    ``speed``, ``bandwidth_mbps``, ``availability``): behaviour of the site, acted out by it.

    ``speed``: after compute that took ``t`` seconds the site idles ``t (1/speed - 1)`` (1: no
    idling). ``bandwidth_bytes_s``: receiving the parameters and sending the update each take
    bytes / this (simulated: the site waits that long); None: no delay. ``mean_on_s`` /
    ``mean_off_s``: its seeded on/off schedule (:class:`metalearn.availability.OnOffSchedule`);
    0 when always on or traced. ``on_periods``: its on periods from a trace file, read by the
    cloud (:class:`metalearn.availability.TraceSchedule`; ``repeat_s``: the trace repeats),
    empty when not traced.
    """

    speed: float
    bandwidth_bytes_s: float | None
    mean_on_s: float
    mean_off_s: float
    on_periods: tuple[tuple[float, float], ...] = ()
    repeat_s: float | None = None
    traced: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.speed <= 1:
            raise ValueError(f"speed must be in (0, 1], got {self.speed}")
        if self.bandwidth_bytes_s is not None and self.bandwidth_bytes_s <= 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth_bytes_s}")

    @property
    def comes_and_goes(self) -> bool:
        return self.traced or (self.mean_on_s > 0 and self.mean_off_s > 0)


@dataclass(frozen=True)
class SiteJob:
    """Everything a site needs to take part in a run; sent once, when its actor starts.

    Args:
        site: the site's name (``site-0``), as in the topology.
        learner: the run config's ``data``, ``model`` and ``algorithm`` sections: what
            :func:`metalearn.from_config.algorithm_from_config` rebuilds the model from, so
            the cloud, every site and a serving replica adapt with identical code.
        data_plan: the site's share of the data (:func:`metalearn.sites.plan_from_manifests`:
            its store's path and content hash and class ids, or an amplitude range; never
            examples).
        local: the work of one round.
        devices: virtual clients (devices) the site simulates.
        seed: the run seed; a round's tasks are a function of (seed, site, device, round).
        compute_nice: least niceness of the thread that runs the site's compute (0-19), so that
            calls and replies are served at once while the site trains.
        delay_s: simulated extra compute time per round (a slow site; from the topology).
        fail: test hook: every round raises (from ``federated.fail_sites``).
        attack: ``None`` for an honest site; else how it corrupts its rounds (the topology's
            ``attack`` of the site: robust aggregation is tested against configured attackers).
        privacy: how the site clips and noises its update (``federated.privacy``), or None.
        secagg: how the site masks its update (``federated.secure_aggregation``), or None.
        compression: how the site compresses its update (``federated.compression``), or None
            (float32).
        conditions: its speed, link and availability (from the topology).
    """

    site: str
    learner: Mapping[str, Any]
    data_plan: Mapping[str, Any]
    local: LocalWork
    devices: int
    seed: int
    compute_nice: int
    delay_s: float
    fail: bool
    attack: Attack | None
    privacy: SitePrivacy | None
    secagg: SecAggJob | None
    compression: Compression | None
    conditions: SiteConditions

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"site {self.site}: devices must be >= 1, got {self.devices}")
        if self.local.steps < 1 or self.local.tasks_per_step < 1:
            raise ValueError(f"site {self.site}: local work needs at least one step of one "
                             f"task, got {self.local}")


@dataclass(frozen=True)
class RoundTimings:
    """Where a site's round went. ``started_at`` / ``finished_at`` are wall-clock times (to
    split a round's overhead into delivery and reply; meaningful where clocks agree), the rest
    ``perf_counter`` durations."""

    compute_s: float  # from the call's start to the reply, on the site
    compute_wait_s: float  # inside compute_s: waiting for the site's compute thread
    started_at: float
    finished_at: float
    idle_s: float  # inside compute_s: the duty cycle's idling (a site of speed < 1)
    network_s: float  # inside compute_s: the simulated transfers (a site with a bandwidth)


@dataclass(frozen=True)
class RoundReply:
    """One site's answer to one round.

    With ``privacy`` in the job, ``update`` is the clipped sum (plus the site's noise share) and
    ``clip_vote`` the sum over its units of ``b - 1/2`` (``b = 1`` for a unit whose update was
    within the bound), plus its noise share; None when the job does not report votes.

    With ``secagg`` in the job, ``update`` is empty (float32, length 0) and ``masked`` carries
    the update, clipped at the site, encoded in the ring and masked: uniformly random on its
    own. The cloud never holds the update itself. Without it, ``masked`` is None.

    With ``compression`` in the job, ``update`` is empty too and ``encoded`` carries the
    compressed update; its ``codec`` says how to decode it (the cloud decodes before
    aggregating). Without it, ``encoded`` is None.
    """

    site: str
    round: int
    kind: UpdateKind
    update: np.ndarray  # float32, flat, the model's parameter count
    num_tasks: int
    metrics: Mapping[str, float]
    timings: RoundTimings
    device_ids: tuple[int, ...]
    clip_vote: float | None
    masked: MaskedInput | None
    encoded: Encoded | None
    local_steps: int  # the local meta-steps behind the update (1 for a gradient)

    @property
    def bytes_up(self) -> int:
        """The update's payload: the float32 vector, the masked ring vector (and its id), or
        the compressed update."""
        if self.masked is not None:
            return self.masked.nbytes
        if self.encoded is not None:
            return self.encoded.nbytes
        return int(self.update.nbytes)


@dataclass(frozen=True)
class SiteInfo:
    """Where a site's actor runs and what it holds: counts and names, never data."""

    site: str
    pid: int
    node_id: str | None
    devices: int
    characters: int
    holdout: int
    alphabets: tuple[str, ...]
    amplitude: tuple[float, float] | None
    rounds_done: int
    load_s: float
    warmup_s: float
    nice: Mapping[str, int | None]

    def describe(self) -> str:
        """One line for the start-up log."""
        what = (f"{self.characters} characters ({len(self.alphabets)} alphabets), "
                f"{self.holdout} held out" if self.amplitude is None
                else f"amplitude {self.amplitude[0]:.2f}..{self.amplitude[1]:.2f}")
        return (f"{self.site}: {what}, {self.devices} device(s), "
                f"ready in {self.load_s + self.warmup_s:.1f} s")


@dataclass(frozen=True)
class Personalize:
    """What the cloud asks of a site at the end of training (and every
    ``federated.site_models_every`` rounds): score the meta-model on the site's held-out tasks
    and make its personalized model (:mod:`metalearn.site_models`).

    ``round``: the round the meta-parameters are from (it seeds the personalization tasks).
    ``episodes``: held-out episodes scored (0: none). ``steps``: meta-steps of the site's
    model on its own training tasks (0: no model); ``lr`` and ``optimizer`` are the run's
    outer settings, ``tasks_per_step`` the site's round size.
    """

    round: int
    episodes: int
    steps: int
    lr: float
    optimizer: Literal["sgd", "adam"]
    tasks_per_step: int


@dataclass(frozen=True)
class SiteModelReply:
    """What a site returns for :class:`Personalize`: scores and its model's parameters.

    ``global_scores`` / ``personal_scores``: the meta-model's and the site model's scores on
    the *same* held-out episodes, ``before_*`` without adaptation and ``after_*`` after
    ``test_steps`` steps of it (``accuracy`` or ``mse``, with ``ci95``); empty when no episode
    was scored, ``personal_scores`` also when no model was made. ``params``: the site model,
    flat float32 in the model's layout (empty with ``steps`` 0). ``train_metrics``: the means
    of its personalization steps. Aggregates only: no example leaves the site.
    """

    site: str
    round: int
    episodes: int
    test_steps: int
    steps: int
    global_scores: Mapping[str, float]
    personal_scores: Mapping[str, float]
    params: np.ndarray
    train_metrics: Mapping[str, float]
    seconds: float
