"""The edge actor: one per site, pinned to the site's node, holding the site's data.

The cloud sends a :class:`~actors.contract.SiteJob` once: the site's plan (its store's path
and the training and held-out class ids planned from the store's manifest, or an amplitude
range; never examples) and the local work of a round; the actor loads its store itself, inside
its own process on its own node, and reports the store's manifest (:meth:`EdgeNode.manifest`).
Each round it returns a :class:`~actors.contract.RoundReply`: the update of
:func:`metalearn.local_update.local_update` as one flat float32 vector of exactly the model's
parameter count (:class:`metalearn.params.FlatLayout`), task counts, scalar metrics and
timings. Raw examples never leave the actor.

Determinism: the tasks of a round are a pure function of ``(seed, site, device, round)``
(see :class:`metalearn.sites.SiteTasks`). A restarted actor (``max_restarts=-1``: Ray
re-runs the constructor with the same arguments) or a resumed driver gets the same tasks
for the same round, so :meth:`EdgeNode.sampler_state` only needs to carry a round counter.

Privacy (the job's ``privacy``, :mod:`privacy.dp`): the site clips before anything leaves it,
per unit (the site's update, or each participating device's own update), sums, and adds its
share of the noise when the noise is distributed; with distributed noise it sends no
un-noised metrics.

Secure aggregation (the job's ``secagg``, :mod:`privacy.client`): a round has three more calls
around :meth:`EdgeNode.round`. :meth:`EdgeNode.secagg_advertise` makes the round's
:class:`~privacy.client.MaskingClient` (fresh keys) and returns its public keys;
:meth:`EdgeNode.secagg_share` returns its sealed shares for the roster the cloud sent;
:meth:`EdgeNode.round`, given the shares routed to this site, computes the update, clips it to
the round's bound *here* (:func:`privacy.fixed_point.clip_l2`) and returns it masked, never in
clear; :meth:`EdgeNode.secagg_unmask` answers the cloud's unmasking request once and forgets
the client. The client lives in the actor's memory only: a restarted actor has lost it and
counts as dropped for that round (:class:`SecAggClientLost`).

Compression (the job's ``compression``, :mod:`metalearn.compression`): the update, once
clipped, noised or poisoned as the job says, is compressed last and only the compressed form
leaves (``RoundReply.encoded``); with error feedback the site keeps what the codec left out
and adds it to its next update (the residual travels in :meth:`EdgeNode.sampler_state`, so a
checkpoint holds it; a restarted actor starts with none).

Site conditions (the job's ``conditions``, from the topology): a site of ``speed`` v idles
``t (1/v - 1)`` after each piece of compute that took ``t`` (a duty cycle: 4x slower at any
work for v = 0.25, and a local-work time budget sees it); with a bandwidth, receiving the
parameters and sending the update each wait ``bytes / bandwidth``; with an availability
schedule, a call past the end of the site's on period raises
:class:`~actors.conditions.SiteLeft`, mid-round too (:mod:`actors.conditions`).

Test hooks: the job's ``delay_s`` adds simulated compute time to each round (a slow site) and
``fail`` makes every round raise (a broken site). Both come from the topology / config, so a
test can inject them into a real cluster. So does ``attack`` (a malicious site): label flipping
relabels the round's tasks before the honest update; the update attacks replace the honest
update once it is computed (:mod:`metalearn.attacks`). The reply looks like any other.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import ray
import torch

from actors.conditions import SiteConditionsClock
from actors.contract import (
    Attack,
    Compression,
    Personalize,
    RoundReply,
    RoundTimings,
    SecAggJob,
    SiteInfo,
    SiteJob,
    SiteModelReply,
    SitePrivacy,
)
from cluster import open_audit
from cluster.topology import ACTOR_RESOURCE_REQUEST, site_resource
from metalearn import attacks
from metalearn.algorithms.base import MetaUpdate
from metalearn.compression import (
    Encoded,
    ErrorFeedback,
    block_segments,
    encode_fp16,
    encode_int8,
    encode_topk,
    topk_count,
)
from metalearn.data.store import StoreManifest
from metalearn.from_config import algorithm_from_config
from metalearn.local_update import local_update, mean_metrics
from metalearn.params import FlatLayout, Params
from metalearn.sites import (
    SampleTasks,
    SiteTasks,
    attack_seed,
    compression_seed,
    site_seed,
    split_tasks,
)
from privacy.client import MaskingClient
from privacy.dp import release_at_site
from privacy.fixed_point import clip_l2
from privacy.messages import (
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.noise import GaussianNoise

T = TypeVar("T")
_POLL_S = 0.02  # how often an injected delay looks for a cancellation


def _cancelled() -> bool:
    """True when the driver gave up on the running call (``ray.cancel`` on a late round)."""
    if not ray.is_initialized():  # plain-object use: asking would start a Ray instance
        return False
    try:
        return bool(ray.get_runtime_context().is_canceled())
    except Exception:  # outside an actor task (plain-object use in tests)
        return False


def _thread_nice() -> int | None:
    """The calling thread's niceness (None off Linux, where a thread id given to
    ``getpriority`` would name a process instead)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return None


class RoundCancelled(RuntimeError):
    """The driver cancelled a round that was past its deadline; its result is moot."""


class SecAggClientLost(RuntimeError):
    """The site holds no secure-aggregation client for the round it was asked about: its actor
    restarted since it advertised keys (the keys lived in memory only), or the round is over.
    The cloud counts the site as dropped; the round goes on without it."""


class EdgeNode:
    """The work of one edge site (used as a Ray actor through :func:`spawn_edge`).

    Everything it needs comes in one :class:`~actors.contract.SiteJob`; what it returns each
    round is a :class:`~actors.contract.RoundReply`.

    ``job.compute_nice`` is the least niceness of the thread that runs the site's compute
    (0-19; Ray starts its workers at 15). Training is throughput work; the node's control
    plane (Ray's raylet, this and other actors' main and RPC threads, a serving replica) is
    latency work. Above the worker's own niceness, a call that arrives while the sites train is
    delivered at once instead of waiting for a time slice, which on a node shared by several
    sites was most of a round's overhead.
    """

    def __init__(self, job: SiteJob) -> None:
        open_audit.install(f"edge.{job.site}")  # only with EDGEMETA_AUDIT_OPENS set (tests)
        self.job = job
        self.site = job.site
        self.compute_thread_nice: int | None = None  # as set by the thread itself
        self._compute = ThreadPoolExecutor(1, thread_name_prefix=f"edge-{job.site}",
                                           initializer=self._niced_thread_start)
        torch.manual_seed(site_seed(job.seed, job.site, 99))  # the model's own init is unused
        self.algorithm = algorithm_from_config(job.learner)
        self.layout = FlatLayout.of(self.algorithm.init_params())
        self.tasks = SiteTasks(job.learner["data"], job.data_plan, devices=job.devices,
                               seed=job.seed)
        self.rounds_done = 0
        self.last_round = 0
        self._masking: MaskingClient | None = None  # this round's, under secure aggregation
        self.feedback = ErrorFeedback()  # what a biased codec left out (compression)
        self.conditions = SiteConditionsClock(
            job.site, job.seed, job.conditions, _cancelled,
            lambda: RoundCancelled(f"{job.site}: round cancelled by the driver"))
        t0 = time.perf_counter()
        self.tasks.load()  # the site's store, now: round 1 times compute only
        self.load_s = time.perf_counter() - t0
        self.warmup_s = self._computed(self._warm_up)
        gc.collect()  # then freeze what is left: torch, the data and the model live for the
        gc.freeze()   # actor's life, so a full collection mid-round never re-scans them

    def _niced_thread_start(self) -> None:
        """Initializer of the compute thread: raise its niceness to ``compute_nice``.

        On Linux a thread id given to ``setpriority`` names that thread alone (and the torch
        threads it starts inherit it), so Ray's RPC threads and the actor's main thread, which
        receives calls and sends replies, keep their priority. Raising niceness needs no
        privilege; where it is refused (another OS), the site computes at normal priority.
        """
        current = _thread_nice()
        if self.job.compute_nice > 0 and current is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               max(current, self.job.compute_nice))
        self.compute_thread_nice = _thread_nice()

    def _computed(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the site's compute thread; the caller (Ray's thread) waits."""
        return self._compute.submit(fn, *args).result()

    def _warm_up(self) -> float:
        """One meta-gradient on round-0 tasks (round 0 is never a training round), so that
        lazy imports, first-call tracing and the fast path's strategy choice happen while the
        actor starts (in parallel with the other sites) rather than inside round 1's timing."""
        t0 = time.perf_counter()
        tasks = self.tasks.round_sampler([0], 0)(self.job.local.tasks_per_step)
        self.algorithm.meta_gradient(self.algorithm.init_params(), tasks)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ rounds

    def round(self, params: np.ndarray | Params, round_idx: int,
              device_ids: Sequence[int] | None = None, clip_norm: float | None = None,
              delivery: ShareDelivery | None = None,
              run_clock_s: float | None = None) -> RoundReply:
        """One round: sample this round's tasks on the chosen devices, compute the update.

        ``params``: the meta-parameters, flat in the layout's order (what the driver ships) or
        as a dict. ``device_ids``: the devices taking part (default: all of the site's).
        ``clip_norm``: this round's clipping bound under privacy (adaptive clipping moves it;
        default: the job's). ``delivery``: under secure aggregation, the shares the cloud
        routed to this site (required then): the update goes back masked. ``run_clock_s``: the
        run's clock when the call was sent, for a site that comes and goes (it leaves, raising
        :class:`~actors.conditions.SiteLeft`, once its on period ends, even mid-round).
        """
        started_at, t0 = time.time(), time.perf_counter()
        if self.job.fail:
            raise RuntimeError(f"injected failure at {self.site} (test hook fail_sites)")
        conditions = self.conditions
        conditions.begin_call(run_clock_s, t0)
        conditions.transfer(params.nbytes if isinstance(params, np.ndarray) else 0)
        client = None
        if self.job.secagg is not None:
            if delivery is None:
                raise ValueError(f"{self.site}: secure aggregation is on, and the round call "
                                 "brought no share delivery")
            client = self._client(round_idx)
        devices = (list(range(self.tasks.devices)) if device_ids is None
                   else sorted(int(d) for d in device_ids))
        submitted = time.perf_counter()
        vote = None
        if self.job.privacy is None:
            update, flat, began = self._computed(conditions.paced, self._local_update, params,
                                                 round_idx, devices)
        else:
            update, flat, vote, began = self._computed(conditions.paced, self._private_update,
                                                       self.job.privacy, params, round_idx,
                                                       devices, clip_norm)
        masked = None
        if client is not None and delivery is not None:
            masked = self._computed(self._masked, client, flat, delivery)
            flat = np.zeros(0, dtype=np.float32)  # the update never leaves in clear
        encoded = None
        if self.job.compression is not None:
            encoded = self._computed(self._encoded, self.job.compression, flat, round_idx)
            flat = np.zeros(0, dtype=np.float32)  # only the compressed form leaves
        sent = masked if masked is not None else encoded  # what goes up instead of ``flat``
        conditions.transfer(flat.nbytes if sent is None else sent.nbytes)
        self._injected_delay()
        conditions.still_here()
        self.rounds_done += 1
        self.last_round = int(round_idx)
        timings = RoundTimings(compute_s=time.perf_counter() - t0,
                               compute_wait_s=began - submitted, started_at=started_at,
                               finished_at=time.time(), idle_s=conditions.idle_s,
                               network_s=conditions.network_s)
        return RoundReply(site=self.site, round=int(round_idx), kind=update.kind, update=flat,
                          num_tasks=int(update.num_tasks),
                          metrics={k: float(v) for k, v in update.metrics.items()},
                          timings=timings, device_ids=tuple(devices), clip_vote=vote,
                          masked=masked, encoded=encoded, local_steps=int(update.local_steps))

    def _encoded(self, spec: Compression, flat: np.ndarray, round_idx: int) -> Encoded:
        """The update compressed as the job says (after clipping, noise and any attack: what
        is compressed is exactly what would have been sent); with error feedback, plus what
        earlier rounds left out, which the site keeps."""
        vector = torch.from_numpy(flat)
        if spec.codec == "fp16":
            def encode(v: torch.Tensor) -> Encoded:
                return encode_fp16(v)
        elif spec.codec == "int8":
            segments = (block_segments(vector.numel(), spec.block) if spec.block
                        else [math.prod(s) for s in self.layout.shapes])
            rounding = torch.Generator().manual_seed(
                compression_seed(self.job.seed, self.site, round_idx))

            def encode(v: torch.Tensor) -> Encoded:
                return encode_int8(v, segments, rounding)
        else:
            k = topk_count(vector.numel(), spec.fraction)

            def encode(v: torch.Tensor) -> Encoded:
                return encode_topk(v, k)
        return self.feedback.compress(vector, encode) if spec.error_feedback else encode(vector)

    # ------------------------------------------------------------------ secure aggregation

    def secagg_advertise(self, round_idx: int, clip: float) -> KeyAdvert:
        """Step 1 of a secure round: a fresh client (fresh keys) for ``round_idx``, masking
        updates clipped to ``clip`` (the round's bound, the same at every party); its public
        keys. Any client of an earlier round is forgotten."""
        job = self._secagg_job()
        config = replace(job.config, clip=float(clip))
        self._masking = None
        self._masking = MaskingClient(job.site_id, config, int(round_idx))
        return self._masking.advertise_keys()

    def secagg_share(self, roster: KeyRoster) -> ShareBundle:
        """Step 2: this site's sealed shares for its neighbours among ``roster``."""
        return self._client(roster.round).share_keys(roster)

    def secagg_unmask(self, round_idx: int, request: UnmaskRequest) -> UnmaskResponse:
        """Step 4: the shares the cloud asks for (of the survivors' self-mask seeds and the
        dropped sites' mask keys), once; then the round's client is forgotten."""
        client = self._client(round_idx)
        try:
            return client.unmask(request)
        finally:
            self._masking = None

    def _secagg_job(self) -> SecAggJob:
        if self.job.secagg is None:
            raise RuntimeError(f"{self.site}: secure aggregation is not on in this run")
        return self.job.secagg

    def _client(self, round_idx: int) -> MaskingClient:
        self._secagg_job()
        client = self._masking
        if client is None or client.round != int(round_idx):
            held = "none" if client is None else f"round {client.round}'s"
            raise SecAggClientLost(f"{self.site}: no secure-aggregation keys for round "
                                   f"{round_idx} (holds {held}; an actor that restarted lost "
                                   "them): dropped from the round")
        return client

    @staticmethod
    def _masked(client: MaskingClient, flat: np.ndarray, delivery: ShareDelivery) -> MaskedInput:
        """The update clipped to the round's bound at the site, encoded and masked. Under
        privacy the update is already clipped (and noised); this bound covers it, and the clip
        here is then a no-op (docs/DESIGN.md, "Secure aggregation")."""
        return client.masked_input(clip_l2(flat, client.config.clip), delivery)

    def _local_update(self, params: np.ndarray | Params, round_idx: int,
                      devices: list[int]) -> tuple[MetaUpdate, np.ndarray, float]:
        """The round's update, flat, and when the compute thread began (``perf_counter``):
        the gap from the call's start is the wait for a CPU among the node's sites."""
        began = time.perf_counter()
        params = (self.layout.unpack(params) if isinstance(params, np.ndarray)
                  else {k: v.detach().clone() for k, v in params.items()})
        sample = self.tasks.round_sampler(devices, round_idx)
        attack = self.job.attack
        if attack is not None and attack.poisons_data:
            sample = attacks.flipped(sample, int(self.job.learner["data"]["ways"]))
        update = self._honest_update(params, sample)
        flat = self.layout.pack(update.tensors)
        if attack is not None and not attack.poisons_data:
            flat = self._poisoned(attack, flat, params, sample, round_idx)
        return update, flat, began

    def _honest_update(self, params: Params, sample: SampleTasks) -> MetaUpdate:
        work = self.job.local
        return local_update(self.algorithm, params, sample, work.tasks_per_step, work.steps,
                            work.lr, work.optimizer, work.time_budget_s,
                            after_step=self.conditions.pace)

    def _poisoned(self, attack: Attack, flat: np.ndarray, params: Params, sample: SampleTasks,
                  round_idx: int) -> np.ndarray:
        """The update a malicious site sends instead of its honest ``flat`` one."""
        honest = torch.from_numpy(flat)
        if attack.name == "sign_flip":
            out = attacks.sign_flip(honest, attack.factor)
        elif attack.name == "scale":
            out = attacks.scale(honest, attack.factor)
        elif attack.name == "gaussian":
            generator = torch.Generator().manual_seed(attack_seed(self.job.seed, self.site,
                                                                  round_idx))
            out = attacks.gaussian(honest, attack.sigma, generator)
        elif attack.name == "alie":
            # More honest updates on fresh tasks of the same round's stream (deterministic):
            # the site's own estimate of the honest updates' mean and spread.
            more = [self.layout.pack(self._honest_update(params, sample).tensors)
                    for _ in range(attack.samples - 1)]
            out = attacks.alie(torch.from_numpy(np.stack([flat, *more])), attack.z)
        else:
            raise ValueError(f"{self.site}: {attack.name!r} is not an update attack")
        return out.to(torch.float32).numpy()

    def _private_update(self, dp: SitePrivacy, params: np.ndarray | Params, round_idx: int,
                        devices: list[int], clip_norm: float | None,
                        ) -> tuple[MetaUpdate, np.ndarray, float | None, float]:
        """The round's update clipped per privacy unit and summed, with the site's noise share
        (:func:`privacy.dp.release_at_site`); its clipping vote; when the compute began.

        Unit ``device``: each device computes alone on the tasks it draws in the shared round
        (:func:`metalearn.sites.split_tasks`), so one device's data moves one clipped update.
        """
        began = time.perf_counter()
        params = (self.layout.unpack(params) if isinstance(params, np.ndarray)
                  else {k: v.detach().clone() for k, v in params.items()})
        work = self.job.local
        groups = ([([d], n) for d, n in zip(devices, split_tasks(work.tasks_per_step,
                                                                 len(devices)), strict=True)]
                  if dp.unit == "device" else [(devices, work.tasks_per_step)])
        updates = [local_update(self.algorithm, params, self.tasks.round_sampler(group, round_idx),
                                n, work.steps, work.lr, work.optimizer, work.time_budget_s,
                                after_step=self.conditions.pace)
                   for group, n in groups if n > 0]
        bound = dp.clip_norm if clip_norm is None else float(clip_norm)
        release = release_at_site([self.layout.concat(u.tensors, "update") for u in updates],
                                  bound, dp.noise_multiplier_share * bound,
                                  dp.vote_noise_std_share, GaussianNoise(dp.seed), self.site,
                                  round_idx)
        metrics = mean_metrics([u.metrics for u in updates]) if dp.keep_metrics else {}
        summed = MetaUpdate(updates[0].kind, {}, sum(u.num_tasks for u in updates), metrics,
                            local_steps=max(u.local_steps for u in updates))
        flat = release.vector.to(torch.float32).numpy()
        return summed, flat, (release.vote if dp.report_votes else None), began

    def _injected_delay(self) -> None:
        end = time.perf_counter() + self.job.delay_s
        while time.perf_counter() < end:
            if _cancelled():
                raise RoundCancelled(f"{self.site}: round cancelled by the driver")
            time.sleep(min(_POLL_S, max(0.0, end - time.perf_counter())))

    # ------------------------------------------------------------------ evaluation

    def personalize(self, params: np.ndarray | Params, ask: Personalize) -> SiteModelReply:
        """The site's personalized model and its scores against the meta-model.

        Held out: Omniglot characters of the site's own alphabets that its training rounds
        never sample (``federated.holdout_fraction`` of them); sinusoid tasks of the site's
        amplitude range from a stream training never draws. The site model
        (:func:`metalearn.site_models.personalized_init`) is trained on the site's training
        share only. Both models are scored on the same held-out episodes (paired), with zero
        adaptation steps ("before") and the algorithm's ``test_steps`` ("after").
        """
        return self._computed(self._personalize, params, ask)

    def _personalize(self, params: np.ndarray | Params, ask: Personalize) -> SiteModelReply:
        from metalearn.site_models import personalize_site

        params = (self.layout.unpack(params) if isinstance(params, np.ndarray)
                  else {k: v.detach().clone() for k, v in params.items()})
        made = personalize_site(self.algorithm, params, self.tasks, ask.round, ask.steps, ask.lr,
                                ask.optimizer, ask.tasks_per_step, ask.episodes)
        return SiteModelReply(
            site=self.site, round=int(ask.round), episodes=int(ask.episodes),
            test_steps=self.algorithm.test_steps, steps=int(ask.steps),
            global_scores=made.global_scores, personal_scores=made.personal_scores,
            params=(np.zeros(0, dtype=np.float32) if made.params is None
                    else self.layout.pack(made.params)),
            train_metrics=made.train_metrics, seconds=made.seconds)

    # ------------------------------------------------------------------ bookkeeping

    def info(self) -> SiteInfo:
        """Where the actor runs and what it holds (counts and names, no data)."""
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        plan = self.tasks.plan
        amplitude = plan.get("amplitude")
        return SiteInfo(
            site=self.site, pid=os.getpid(), node_id=ctx.get_node_id() if ctx else None,
            devices=self.tasks.devices, characters=len(plan.get("characters", [])),
            holdout=len(plan.get("holdout", [])),
            alphabets=tuple(str(a) for a in plan.get("alphabets", [])),
            amplitude=None if amplitude is None else (float(amplitude[0]), float(amplitude[1])),
            rounds_done=self.rounds_done, load_s=self.load_s, warmup_s=self.warmup_s,
            nice={"calls": _thread_nice(), "compute": self.compute_thread_nice})

    def manifest(self) -> StoreManifest | None:
        """The manifest of the site's store: class names, groups and counts, the content hash;
        never examples (None for a site without a store: sinusoid)."""
        return self.tasks.manifest

    def sampler_state(self) -> dict[str, Any]:
        """All the sampling state there is: tasks are seeded per round, so a counter; and,
        with error feedback, the residual the site keeps (a checkpoint holds it, so a resumed
        run sends what an uninterrupted one sends)."""
        state: dict[str, Any] = {"rounds_done": self.rounds_done, "last_round": self.last_round}
        residual = self.feedback.state()
        if residual is not None:
            state["residual"] = residual
        return state

    def load_sampler_state(self, state: Mapping[str, Any]) -> None:
        self.rounds_done = int(state.get("rounds_done", 0))
        self.last_round = int(state.get("last_round", 0))
        self.feedback.load(state.get("residual"))


def spawn_edge(job: SiteJob, actor_cpus: float) -> Any:
    """Start ``job.site``'s :class:`EdgeNode` actor on the node that advertises
    ``edge:<site>``, asking for ``actor_cpus`` (the topology's ``actor_cpus``).

    ``max_restarts=-1``: a site whose node dies comes back when the node (or another with the
    same resource) rejoins, rebuilt from the same job. ``max_task_retries=0``: the driver, not
    Ray, decides what to do with a round that failed (it records the failure and carries on
    without that site).
    """
    remote = ray.remote(EdgeNode).options(
        resources={site_resource(job.site): ACTOR_RESOURCE_REQUEST},
        num_cpus=actor_cpus,
        max_restarts=-1,
        max_task_retries=0,
    )
    return remote.remote(job)
