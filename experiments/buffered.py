"""Asynchronous rounds: FedBuff (Nguyen et al., 2022), the cloud's loop for ``federated.mode:
async``.

Sites train continuously on the latest parameters they were sent; nobody waits for the
slowest. The cloud keeps one call in flight per available site and reads results as they
arrive (``ray.wait`` over the calls in flight). Once ``buffer_size`` (K) results are in, it
applies their staleness-weighted mean (:func:`metalearn.aggregation.buffered_mean`: each
discounted by ``1/sqrt(1 + s)``, ``s`` the updates applied since its parameters were sent),
then sends the new parameters to the sites that reported (the others keep training on what
they have; their results will be that much staler).

A step of the run loop (``train.steps``, ``checkpoint_every``, the rows' ``round``) is one
applied update, a *version* of the parameters. Each call samples tasks for a call id of its
own (a counter over the run, checkpointed), so no two calls draw the same tasks.

**Resume, and what exact means here.** A checkpoint is written after an applied update, with
the parameters, the optimizer, the version and the call counter. A resumed run starts from the
latest checkpoint's version: every update applied before it is in the parameters exactly once,
and the next one applied is numbered version + 1 (the rows continue without gaps or
duplicates). What was in flight or buffered but not yet applied when the run stopped is lost
(the sites are called afresh on the checkpoint's parameters): work is lost, never an applied
update, and none is applied twice. Arrival order depends on timing, so unlike synchronous
rounds an asynchronous run is not bit-for-bit repeatable, resumed or not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import ray
import torch

from actors.federation import Federation, RoundOutcome
from cluster.console import Printer
from experiments.config import ExperimentConfig
from experiments.loop import RunLoop
from experiments.runlog import RowTable, RunLog, round_line, round_row
from experiments.site_jobs import federated_section
from metalearn.aggregation import FlatUpdate, buffered_mean
from metalearn.availability import Schedule
from metalearn.checkpoint import save_checkpoint
from metalearn.outer import OuterOptimizer
from metalearn.sites import site_seed


class Cloud(Protocol):
    """What this loop uses of :class:`experiments.federated.Cloud` (which imports this
    module, so it is named by its shape)."""

    outer: OuterOptimizer
    federation: Federation
    site_log: RowTable
    param_bytes: int
    missed: int
    schedules: dict[str, Schedule]

    def state(self, with_sites: bool = True) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any], round_idx: int) -> None: ...


@dataclass
class InFlight:
    """A call running on a site: what it will answer with, and on what it trains."""

    ref: Any
    version: int  # the parameters' version it was sent
    call_id: int  # the round index its tasks are drawn for
    devices: list[int]
    sent_at: float


@dataclass
class Buffer:
    """What arrived toward the next applied update."""

    updates: list[FlatUpdate] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # every site that answered, ok or not
    outcome: RoundOutcome = field(default_factory=RoundOutcome)


def call_devices(fed: Any, seed: int, site: str, devices: int, call_id: int) -> list[int]:
    """The devices a call uses: all of the site's, or ``devices_per_round`` of them seeded by
    (seed, site, call id)."""
    per_call = min(fed.devices_per_round or devices, devices)
    if per_call == devices:
        return list(range(devices))
    rng = np.random.default_rng(site_seed(seed, site, 7, call_id))
    return sorted(int(d) for d in rng.choice(devices, size=per_call, replace=False))


class BufferedRounds:
    """The in-flight calls of an asynchronous run and the buffer they fill."""

    def __init__(self, cloud: Cloud, fed: Any, devices: Mapping[str, int], seed: int) -> None:
        self.cloud = cloud
        self.fed = fed
        self.devices = dict(devices)
        self.seed = seed
        self.inflight: dict[str, InFlight] = {}
        self.calls = 0  # call ids handed out so far (checkpointed)

    def send(self, sites: list[str], version: int, clock_s: float) -> None:
        """Fresh parameters (``version``) to each of ``sites`` that is available and idle."""
        cloud, fed = self.cloud, self.cloud.federation
        flat = cloud.outer.flat_params().to(torch.float32).numpy()
        ref = ray.put(flat) if len(sites) > 1 else flat
        for site in sites:
            schedule = cloud.schedules.get(site)
            if site in self.inflight or (schedule is not None and not schedule.is_on(clock_s)):
                continue
            call_id = self.calls + 1
            devices = call_devices(self.fed, self.seed, site, self.devices[site], call_id)
            sent = fed.call(site, ref, call_id, devices,
                            run_clock_s=clock_s if cloud.schedules else None)
            if sent is not None:
                self.calls = call_id
                self.inflight[site] = InFlight(sent, version, call_id, devices, time.time())

    def collect(self, k: int, version: int, deadline_s: float | None) -> Buffer:
        """Read results as they arrive until ``k`` updates are in (or nothing came for
        ``deadline_s``, or no call is in flight)."""
        buf = Buffer()
        while len(buf.updates) < k and self.inflight:
            by_ref = {f.ref: site for site, f in self.inflight.items()}
            done, _ = ray.wait(list(by_ref), num_returns=1, timeout=deadline_s)
            if not done:
                break
            site = by_ref[done[0]]
            flight = self.inflight.pop(site)
            update = self.cloud.federation.read(site, flight.ref, flight.call_id,
                                                len(flight.devices), buf.outcome,
                                                flight.sent_at)
            row = buf.outcome.sites[-1]
            row.update(version_sent=flight.version, staleness=version - flight.version)
            buf.reported.append(site)
            if update is not None:
                buf.updates.append(update)
                buf.staleness.append(version - flight.version)
        return buf

    def cancel(self) -> None:
        """Drop every call in flight (the run stops: their work is lost, see the module)."""
        for flight in self.inflight.values():
            with contextlib.suppress(Exception):  # its actor may be gone already
                ray.cancel(flight.ref)
        self.inflight.clear()


def train_buffered(cfg: ExperimentConfig, cloud: Cloud, log: RunLog, devices: Mapping[str, int],
                   resume: bool, echo: Printer) -> RunLoop:
    """The asynchronous run: applied updates, resumed from the latest checkpoint."""
    fed = federated_section(cfg)
    k = fed.buffer_size
    rounds = BufferedRounds(cloud, fed, devices, cfg.seed)
    with RunLoop(cfg.run_dir, unit="round", total=cfg.train.steps, echo=echo,
                 checkpoint_every=cfg.train.checkpoint_every,
                 time_budget_s=cfg.train.time_budget_s,
                 stop_after=fed.stop_after_rounds) as loop:
        state = loop.resume(cloud.outer) if resume else None
        if state is not None:
            cloud.restore(state, loop.step)
            log.truncate_to(loop.step, key="round")
            rounds.calls = int(state.get("calls", 0))

        def checkpoint() -> None:
            # the tables first, the checkpoint that commits them last (see federated.py);
            # sites are mid-call: no sampler states (they would wait for the calls)
            log.flush()
            cloud.site_log.flush()
            save_checkpoint(cfg.run_dir, loop.step, {**cloud.state(with_sites=False),
                                                     "calls": rounds.calls,
                                                     "elapsed_s": loop.elapsed_s})
            log.committed(loop.step)

        echo(f"asynchronous rounds (FedBuff): an update applied every {k} results, each "
             "weighted 1/sqrt(1 + staleness)")
        try:
            rounds.send(list(devices), loop.step, loop.elapsed_s)
            for version in loop.steps(save=checkpoint):
                t0 = time.perf_counter()
                buf = rounds.collect(k, version - 1, fed.deadline_s)
                skipped = len(buf.updates) < k
                t_back = time.perf_counter()
                if not skipped:
                    kinds = {u.kind for u in buf.updates}
                    cloud.outer.step_flat(buffered_mean(buf.updates, buf.staleness), kinds.pop())
                cloud.missed = cloud.missed + 1 if skipped else 0
                t_end = time.perf_counter()
                buf.outcome.wall_s = t_back - t0
                row = round_row(version, buf.outcome, cloud.param_bytes, list(devices),
                                wall_s=t_end - t0)
                row.update(aggregate_s=t_end - t_back, skipped=skipped, mode="async",
                           staleness_mean=float(np.mean(buf.staleness)) if buf.staleness
                           else float("nan"),
                           staleness_max=max(buf.staleness, default=0))
                row["time_s"] = loop.count(time.perf_counter() - t0)
                cloud.site_log.extend({"round": version, **s} for s in buf.outcome.sites)
                log.append(row)
                trouble = [f"{s['site']} {s['status']}" for s in buf.outcome.sites
                           if s["status"] != "ok"]
                if version % cfg.train.log_every == 0 or trouble:
                    echo(round_line(row, cfg.train.steps, trouble))
                if cloud.missed >= fed.max_missed_rounds:
                    checkpoint()
                    raise RuntimeError(f"{cloud.missed} updates in a row without {k} results "
                                       f"within deadline_s; last errors: {trouble}")
                # the reporters get the new parameters (and so does a site back from being
                # away, busy or down); the others train on
                rounds.send(sorted(_idle(rounds, devices)), version, loop.elapsed_s)
        finally:
            rounds.cancel()
    return loop


def _idle(rounds: BufferedRounds, devices: Mapping[str, int]) -> set[str]:
    """Sites with no call in flight (back from being away, busy or down): call them too."""
    return {s for s in devices if s not in rounds.inflight}
