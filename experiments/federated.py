"""Federated meta-training: the cloud driver of the outer loop, across edge sites on Ray.

It mirrors :mod:`experiments.train`, with the batch of tasks replaced by a round of sites:

    for each round:
        choose participants                            (seeded by (seed, round))
        params = flat meta-params, inline or ray.put   (see broadcast: once per round)
        edge.round.remote(params, round, devices)      (each site samples its own tasks)
        ray.wait(..., timeout=deadline)                (late and failed sites are recorded)
        aggregate what arrived -> outer optimizer step (Adam over a dict)
        log a row per round (and per site); checkpoint every k rounds

Entry points: ``edgemeta federated CONFIG`` and ``python -m experiments.federated CONFIG``
(also what ``ray job submit -- python -m experiments.federated ...`` runs on a cluster).

Decisions worth knowing:

* **Data stays at the edge.** The driver process never opens a data file: site partitions
  (character ids) are planned by a Ray task on the ``cloud`` node, the final meta-test runs as
  another such task, and each edge actor loads its own data.
* **Quorum.** A round with fewer than ``federated.quorum`` arrived updates makes no outer step
  (recorded as ``skipped``); after ``max_missed_rounds`` such rounds in a row the run fails
  (after writing a checkpoint), since a federation that cannot reach quorum is not training.
* **Stale results.** A late call is cancelled (``ray.cancel``; the actor checks the flag) and
  its site marked busy until the call ends. A site still busy is not called again, and a late
  result is dropped unread, so an update is only ever applied in the round it was computed for.
* **Dead sites.** A site whose actor became unreachable (its node died) is marked down and
  not called; a cheap probe call tells when its restarted actor (``max_restarts=-1``) is back,
  and from the next round on it takes part again. Rounds meanwhile cost the live sites' time.
* **Exact resume.** Tasks are seeded by ``(seed, site, device, round)`` and participants by
  ``(seed, round)``; the checkpoint holds meta-parameters, optimizer and aggregator state. A
  run stopped after round r and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from cluster.console import Printer
from cluster.topology import ACTOR_RESOURCE_REQUEST, CLOUD_RESOURCE, Topology, site_resource
from experiments.config import ConfigError, ExperimentConfig, FederatedConfig, load_config
from experiments.runlog import RunLog
from experiments.stopping import StopRequests, exit_code
from experiments.train import _headline
from metalearn.aggregation import Aggregator, build_aggregator
from metalearn.algorithms.base import MetaUpdate
from metalearn.checkpoint import atomic_write_bytes, resume_from_latest, save_checkpoint
from metalearn.outer import OuterOptimizer
from metalearn.params import FlatLayout, Params, num_bytes

SITES_FILE = "sites.parquet"
STARTUP_TIMEOUT_S = 180.0
FLAT_KEY = "flat"  # the one key of a site's update as the driver aggregates it


# --------------------------------------------------------------------------- the cluster

def connect_cluster(address: str | None, topology: Topology) -> bool:
    """Join ``address`` or start an embedded cluster with the topology's resources.

    Returns whether this call connected (and so the driver should disconnect at the end); an
    already initialised Ray (a test's module fixture, a job's driver) is used as it is. An
    embedded cluster gets as many logical CPUs as the cloud and the edge actors ask for, even
    beyond the machine's cores: sites on one machine time-share it, as in the local launcher.
    """
    if ray.is_initialized():
        return False
    from cluster.connect import connect

    if address or os.environ.get("RAY_ADDRESS"):
        connect(address, topology)
    else:
        cpus = topology.cloud.num_cpus + sum(s.actor_cpus for s in topology.sites)
        connect(None, topology, num_cpus=math.ceil(cpus))
    return True


def check_resources(topology: Topology) -> None:
    """Fail fast, naming what is missing, if no node offers the cloud or a site's resource."""
    have = ray.cluster_resources()
    wanted = [CLOUD_RESOURCE, *(site_resource(s) for s in topology.site_names)]
    missing = [r for r in wanted if have.get(r, 0) < ACTOR_RESOURCE_REQUEST]
    if missing:
        raise RuntimeError(f"the Ray cluster has no node offering {missing}; start the sites "
                           "of the topology (cluster/local.py) or use an embedded cluster")


def _cloud_task(fn: Callable[..., Any], topology: Topology) -> Any:
    """``fn`` as a Ray task on the cloud node (its own process: the driver holds no data).

    ``max_calls=1``: the worker exits when the task ends, instead of idling in Ray's pool for
    the rest of the run with torch and the data set loaded (about 450 MB here).
    """
    return ray.remote(max_calls=1)(fn).options(
        num_cpus=topology.cloud.num_cpus, resources={CLOUD_RESOURCE: ACTOR_RESOURCE_REQUEST})


def _plan_sites_task(data: dict, sites: list[str], seed: int, holdout: float) -> dict:
    from metalearn.sites import plan_sites

    return plan_sites(data, sites, seed, holdout)


def _meta_test_task(cfg: ExperimentConfig, params: Params, episodes: int) -> dict:
    from experiments.train import meta_test
    from metalearn.from_config import algorithm_from_config

    return meta_test(cfg, algorithm_from_config(cfg.to_dict()), params, episodes)


def plan_partitions(data: dict, topology: Topology, seed: int,
                    holdout: float) -> dict[str, dict[str, Any]]:
    """Each site's partition (ids, not data). Omniglot's needs the data set's metadata, so it
    is computed by a task on the cloud node; sinusoid ranges are arithmetic on the config,
    computed here. A plan that cannot be made (more sites than alphabets, say) is a config
    error, said plainly."""
    if data["dataset"] == "sinusoid":
        return _plan_sites_task(data, topology.site_names, seed, holdout)
    task = _cloud_task(_plan_sites_task, topology)
    try:
        return ray.get(task.remote(data, topology.site_names, seed, holdout))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, ValueError):
            raise ConfigError(f"cannot partition the data over the sites: {cause}") from None
        raise


# --------------------------------------------------------------------------- one round

def tasks_per_site(cfg: ExperimentConfig, sites: int) -> int:
    fed = _fed(cfg)
    return fed.tasks_per_site or math.ceil(cfg.train.meta_batch / sites)


def choose_participants(sites: Sequence[str], devices: Mapping[str, int], fed: FederatedConfig,
                        seed: int, round_idx: int) -> dict[str, list[int]]:
    """Sites called in ``round_idx`` and the devices each uses, seeded by ``(seed, round)``."""
    rng = np.random.default_rng([seed, round_idx])
    k = fed.sites_per_round(len(sites))
    chosen = sorted(rng.choice(len(sites), size=k, replace=False).tolist())
    out = {}
    for i in chosen:
        site, n = sites[i], devices[sites[i]]
        per_round = min(fed.devices_per_round or n, n)
        ids = range(n) if per_round == n else rng.choice(n, size=per_round, replace=False)
        out[site] = sorted(int(d) for d in ids)
    return out


INLINE_BROADCAST_BYTES = 4 * 1024 * 1024


def broadcast(flat: np.ndarray, calls: int) -> Any:
    """What the round's calls carry: the flat parameters themselves, or one object ref.

    Small models go inline in each call (under ``max_direct_call_object_size``, which the
    connect helpers raise to 2 MiB): no object-store round trip on either side, measured
    ~1 ms less per round for the 453 KB conv net on 4 sites. Once the copies would add up
    (``INLINE_BROADCAST_BYTES`` over all calls), one ``ray.put`` that every site reads in
    place is cheaper. (On a cluster started without the 2 MiB setting, Ray stores each
    call's copy itself: correct, only slower.)
    """
    if flat.nbytes * calls <= INLINE_BROADCAST_BYTES:
        return flat
    return ray.put(flat)


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:500]


@dataclass
class RoundOutcome:
    """What came back from one round: updates that may be applied, and a row per site."""

    updates: list[MetaUpdate] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for s in self.sites if s["status"] == status)


class Federation:
    """The edge actors; the late calls still running on them; the sites that are down.

    A site whose actor is unreachable (its node died, the actor is restarting) is *down*: it
    is not called again (a call to a restarting actor takes Ray over a second to refuse) but
    probed with a cheap ``info()`` call that each round checks without waiting; once a probe
    answers, the site is called again.
    """

    def __init__(self, edges: Mapping[str, Any], layout: FlatLayout) -> None:
        self.edges = dict(edges)
        self.layout = layout  # checks the sites' flat updates (aggregated and applied flat)
        self.pending: dict[str, tuple[int, Any]] = {}  # site -> (round, ref) of a late call
        self.probes: dict[str, tuple[int, Any]] = {}  # site -> (round it went down, info ref)

    def _busy(self, site: str) -> bool:
        if site not in self.pending:
            return False
        _, ref = self.pending[site]
        done, _ = ray.wait([ref], timeout=0)
        if done:
            del self.pending[site]  # its result belongs to an old round: dropped unread
        return not done

    def _down(self, site: str) -> bool:
        if site not in self.probes:
            return False
        since, ref = self.probes[site]
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            return True
        try:
            ray.get(ref)
        except Exception:  # still unreachable: probe again
            self.probes[site] = (since, self.edges[site].info.remote())
            return True
        del self.probes[site]
        return False

    def run_round(self, params_ref: Any, round_idx: int, participants: Mapping[str, list[int]],
                  deadline_s: float | None) -> RoundOutcome:
        out = RoundOutcome()
        t0 = time.perf_counter()
        refs: dict[str, Any] = {}
        sent_at: dict[str, float] = {}
        for site, devices in participants.items():
            if self._busy(site):
                out.sites.append({"site": site, "status": "busy",
                                  "error": f"still running round {self.pending[site][0]}"})
            elif self._down(site):
                out.sites.append({"site": site, "status": "down",
                                  "error": f"unreachable since round {self.probes[site][0]}"})
            else:
                sent_at[site] = time.time()
                refs[site] = self.edges[site].round.remote(params_ref, round_idx, devices)
        # Read each reply as it arrives, so that only the last one is read after the wait.
        site_of = {ref: site for site, ref in refs.items()}
        waiting = list(refs.values())
        arrived: dict[str, MetaUpdate] = {}
        end = None if deadline_s is None else t0 + deadline_s
        while waiting:
            left = None if end is None else max(0.0, end - time.perf_counter())
            done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            if not done:
                break
            site, arrived_at = site_of[done[0]], time.time()
            update = self._read(site, done[0], round_idx, participants, out)
            if update is not None:
                arrived[site] = update
                row = out.sites[-1]  # delivery and reply of the call, beside its compute
                row["dispatch_s"] = row.pop("started_at") - sent_at[site]
                row["reply_s"] = arrived_at - row.pop("finished_at")
        for ref in waiting:
            site = site_of[ref]
            with contextlib.suppress(Exception):  # its actor may be gone already
                ray.cancel(ref)
            self.pending[site] = (round_idx, ref)
            out.sites.append({"site": site, "devices": len(participants[site]),
                              "status": "late", "error": f"past {deadline_s} s"})
        # Participant order, not arrival order: the aggregate's float sums are reproducible.
        out.updates = [arrived[site] for site in participants if site in arrived]
        out.wall_s = time.perf_counter() - t0
        out.sites.sort(key=lambda row: row["site"])
        return out

    def _read(self, site: str, ref: Any, round_idx: int,
              participants: Mapping[str, list[int]], out: RoundOutcome) -> MetaUpdate | None:
        """Record one finished call in ``out.sites``; its update, if it brought one."""
        row: dict[str, Any] = {"site": site, "devices": len(participants[site])}
        try:
            res = ray.get(ref)
        except Exception as err:  # the site raised, or its actor or node is gone
            out.sites.append({**row, "status": "failed", "error": _error_text(err)})
            if isinstance(err, ray.exceptions.RayActorError):
                self.probes[site] = (round_idx, self.edges[site].info.remote())
            return None
        if res["round"] != round_idx:  # cannot happen by construction; never apply it
            out.sites.append({**row, "status": "stale", "error": f"round {res['round']}"})
            return None
        out.sites.append({**row, "status": "ok", "compute_s": res["compute_s"],
                          "compute_wait_s": res["compute_wait_s"],
                          "started_at": res["started_at"], "finished_at": res["finished_at"],
                          "num_tasks": res["num_tasks"],
                          "bytes_up": int(res["update"].nbytes), **res["metrics"]})
        # Kept flat: every aggregation rule is coordinate-wise (or, for clipping, over the
        # whole vector), so one op per rule replaces one per tensor; unpacked once, after.
        return MetaUpdate(res["kind"], {FLAT_KEY: self.layout.vector(res["update"])},
                          res["num_tasks"], res["metrics"])


def sampler_states(federation: Federation, timeout_s: float = 5.0) -> dict[str, Any]:
    """Each reachable, idle site's sampler state. A site that is down or still busy is left
    out: its tasks are seeded per round, so the state is bookkeeping, not needed to resume."""
    refs = {s: e.sampler_state.remote() for s, e in federation.edges.items()
            if s not in federation.pending and s not in federation.probes}
    done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out = {}
    for site, ref in refs.items():
        if ref in set(done):
            with contextlib.suppress(Exception):  # a site that just died: nothing to save
                out[site] = ray.get(ref)
    return out


def round_row(round_idx: int, outcome: RoundOutcome, param_bytes: int,
              site_names: Sequence[str], wall_s: float) -> dict[str, Any]:
    """The per-round metrics row: timings, traffic, who arrived, task-weighted metrics.

    ``participants`` counts the sites chosen for the round, ``called`` those actually sent
    the parameters (not a site still busy with a late call, nor one that is down).
    ``wall_s`` is the whole round as the driver lives it, from packing the parameters to the
    end of the outer step (``calls_s``: the calls alone); ``overhead_s`` is that
    beyond the slowest arrived site's compute: packing and ``ray.put``, dispatch, transfers,
    reading the results, aggregation, the outer step, and any wait for sites that turned out
    late. ``dispatch_s_max`` / ``reply_s_max``: the longest delivery of a call (sent by the
    driver to started on the site) and of a reply (finished on the site to seen by the driver).
    ``compute_wait_s_max``: the longest wait, inside a site's ``compute_s``, between the call
    starting and the site's compute thread getting a CPU (sites sharing a node's cores).
    """
    ok = [s for s in outcome.sites if s["status"] == "ok"]
    compute = [s["compute_s"] for s in ok]
    called = len(outcome.sites) - outcome.count("busy") - outcome.count("down")
    row: dict[str, Any] = {
        "round": round_idx, "step": round_idx, "wall_s": wall_s, "calls_s": outcome.wall_s,
        "compute_s_max": max(compute, default=float("nan")),
        "compute_s_mean": float(np.mean(compute)) if compute else float("nan"),
        "overhead_s": wall_s - max(compute, default=0.0),
        "dispatch_s_max": max((s["dispatch_s"] for s in ok), default=float("nan")),
        "reply_s_max": max((s["reply_s"] for s in ok), default=float("nan")),
        "compute_wait_s_max": max((s["compute_wait_s"] for s in ok), default=float("nan")),
        "bytes_down": param_bytes * called, "bytes_up": sum(s["bytes_up"] for s in ok),
        "participants": len(outcome.sites), "called": called, "arrived": len(ok),
        "late": outcome.count("late"), "failed": outcome.count("failed"),
        "busy": outcome.count("busy"), "down": outcome.count("down"),
        "round_tasks": sum(s["num_tasks"] for s in ok),
    }
    total = row["round_tasks"]
    for key in ("loss_before", "loss_after", "acc_before", "acc_after"):
        vals = [(s[key], s["num_tasks"]) for s in ok if key in s]
        if vals and total:
            row[key] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
    by_site = {s["site"]: s.get("compute_s", float("nan")) for s in outcome.sites}
    row.update({f"compute_s.{s}": by_site.get(s, float("nan")) for s in site_names})
    return row


# --------------------------------------------------------------------------- run folder

class SiteLog:
    """Per-site rows (``sites.parquet``), flushed and truncated in step with the RunLog."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SITES_FILE
        self.rows: list[dict[str, Any]] = []

    def extend(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def truncate_to(self, round_idx: int) -> None:
        if self.path.exists():
            df = pd.read_parquet(self.path)
            self.rows = df[df["round"] <= round_idx].to_dict("records")

    def flush(self) -> None:
        if self.rows:
            buf = io.BytesIO()
            pd.DataFrame(self.rows).to_parquet(buf, index=False)
            atomic_write_bytes(self.path, buf.getvalue())


def _fed(cfg: ExperimentConfig) -> FederatedConfig:
    if cfg.federated is None:
        raise ConfigError(f"config {cfg.name!r} has no federated section; add one (see "
                          "experiments/configs/federated_sinusoid.yaml)")
    return cfg.federated


def _metric_text(row: Mapping[str, Any]) -> str:
    keys = ("loss_after", "acc_after")
    return " ".join(f"{k} {row[k]:.3f}" for k in keys if k in row and row[k] == row[k])


# --------------------------------------------------------------------------- the driver

def train_federated(cfg: ExperimentConfig, *, resume: bool = True, address: str | None = None,
                    echo: Printer = print) -> dict[str, Any]:
    """Train across the topology's edge sites as configured; write the run folder; summarize."""
    fed = _fed(cfg)
    topology = fed.resolved_topology()
    site_names = topology.site_names
    devices = {s.name: fed.devices_per_site or s.devices for s in topology.sites}
    per_site = tasks_per_site(cfg, len(site_names))
    if fed.devices_per_round and fed.devices_per_round > per_site:
        raise ConfigError(f"federated.devices_per_round {fed.devices_per_round} exceeds the "
                          f"{per_site} tasks per site: some devices would sample no task")

    run_dir = cfg.run_dir
    # The run folder's config is self-contained: the topology is written out in full.
    spec = cfg.to_dict()
    spec["federated"]["topology"] = topology.model_dump(mode="json")
    log, site_log = RunLog(run_dir), SiteLog(run_dir)
    log.write_config(spec)

    started = connect_cluster(address or fed.address, topology)
    edges: dict[str, Any] = {}
    # The cloud's own work is vector ops on ~1e5 floats (pack, aggregate, Adam): one thread.
    # Two OpenMP threads gain nothing at that size and, when the sites keep the cores busy,
    # wait on each other for a time slice (100+ ms stalls were measured here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_resources(topology)
        torch.manual_seed(cfg.seed)
        from metalearn.from_config import algorithm_from_config

        algorithm = algorithm_from_config(spec)
        outer = OuterOptimizer(algorithm.init_params(), lr=cfg.train.outer_lr,
                               kind=cfg.train.outer_optimizer)
        aggregator: Aggregator = build_aggregator(fed.aggregator)
        param_bytes = num_bytes(outer.params)

        plans = plan_partitions(spec["data"], topology, cfg.seed, fed.holdout_fraction)
        edges.update(start_edges(topology, spec, plans, devices, per_site, echo))
        federation = Federation(edges, outer.layout)
        # Everything alive now (modules, config, the actors' handles) lives for the run:
        # move it out of the collector's reach, so a full collection mid-round walks only
        # what the rounds allocate (the same trick as Serve's RAY_SERVE_FREEZE_GC_ON_STARTUP).
        gc.collect()
        gc.freeze()  # undone in `finally`: the caller's heap is theirs again after the run

        round_idx, elapsed, missed = 0, 0.0, 0
        state = resume_from_latest(run_dir, outer) if resume else None
        if state is not None:
            aggregator.load_state_dict(state["aggregator"])
            round_idx, elapsed = state["step"], state["elapsed_s"]
            missed = int(state["missed"])
            ray.get([edges[s].load_sampler_state.remote(state["sites"][s])
                     for s in site_names if s in state["sites"]])
            log.truncate_to(round_idx, key="round")
            site_log.truncate_to(round_idx)
            echo(f"resuming {run_dir} from round {round_idx}")

        def checkpoint() -> None:
            save_checkpoint(run_dir, round_idx, {
                "outer": outer.state_dict(), "params": outer.params,
                "aggregator": aggregator.state_dict(), "torch_rng": torch.get_rng_state(),
                "elapsed_s": elapsed, "missed": missed, "sites": sampler_states(federation)})
            log.flush()
            site_log.flush()

        rounds = cfg.train.steps
        echo(f"federated {cfg.algorithm.name} on {cfg.data.dataset}: {len(site_names)} sites, "
             f"{per_site} tasks per site, {fed.local_steps} local step(s), "
             f"{rounds} rounds -> {run_dir}")
        budget = cfg.train.time_budget_s
        with StopRequests() as stop:  # Ctrl-C / SIGTERM: finish the round, checkpoint
            while (round_idx < rounds and (budget is None or elapsed < budget)
                   and not stop.requested):
                t0 = time.perf_counter()
                round_idx += 1
                participants = choose_participants(site_names, devices, fed, cfg.seed, round_idx)
                params_ref = broadcast(outer.flat_params().to(torch.float32).numpy(),
                                       len(participants))
                t_sent = time.perf_counter()
                outcome = federation.run_round(params_ref, round_idx, participants, fed.deadline_s)
                t_back = time.perf_counter()
                if len(outcome.updates) >= fed.quorum:
                    aggregated = aggregator.aggregate(outcome.updates)[FLAT_KEY]
                    t_aggregated = time.perf_counter()
                    outer.step_flat(aggregated, outcome.updates[0].kind)
                    missed = 0
                else:
                    t_aggregated = t_back
                    missed += 1
                t_end = time.perf_counter()
                row = round_row(round_idx, outcome, param_bytes, site_names, wall_s=t_end - t0)
                row.update(put_s=t_sent - t0, aggregate_s=t_aggregated - t_back,
                           outer_step_s=t_end - t_aggregated)
                row["skipped"] = len(outcome.updates) < fed.quorum
                elapsed += time.perf_counter() - t0
                row["time_s"] = elapsed
                site_log.extend([{"round": round_idx, **s} for s in outcome.sites])
                if cfg.train.eval_every and round_idx % cfg.train.eval_every == 0:
                    result = ray.get(_cloud_task(_meta_test_task, topology).remote(
                        cfg, outer.params, cfg.train.eval_episodes))
                    row.update({f"test_{k}": v for k, v in result.items() if isinstance(v, float)})
                    echo(f"  round {round_idx}: meta-test {_headline(result)}")
                log.append(row)
                trouble = [f"{s['site']} {s['status']}" for s in outcome.sites
                           if s["status"] != "ok"]
                if round_idx % cfg.train.log_every == 0 or round_idx == rounds or trouble:
                    echo(f"round {round_idx}/{rounds} arrived {row['arrived']}/{row['called']} "
                         f"{_metric_text(row)} wall {row['wall_s']:.2f}s overhead "
                         f"{row['overhead_s']:.3f}s"
                         + (f" [{', '.join(trouble)}]" if trouble else "")
                         + (" SKIPPED (below quorum)" if row["skipped"] else ""))
                if missed >= fed.max_missed_rounds:
                    checkpoint()
                    raise RuntimeError(f"{missed} rounds in a row below quorum {fed.quorum}; "
                                       f"last errors: {trouble}")
                if round_idx % cfg.train.checkpoint_every == 0:
                    checkpoint()
                if fed.stop_after_rounds is not None and round_idx >= fed.stop_after_rounds:
                    checkpoint()
                    echo(f"stopping after round {round_idx} (federated.stop_after_rounds)")
                    return {"name": cfg.name, "stopped_after_round": round_idx}
        checkpoint()
        if stop.signal is not None:
            echo(f"stopped by {stop.signal.name} after round {round_idx}; checkpoint saved in "
                 f"{run_dir}: run the same command to resume")
            return {"name": cfg.name, "stopped_by": stop.signal.name,
                    "stopped_after_round": round_idx}

        params = outer.params
        personal = personalize_sites(edges, params, fed.personalize_episodes, echo)
        release_edges(edges)  # the sites' work is done: free them before the meta-test starts
        echo(f"meta-testing on {cfg.eval.episodes} episodes of held-out classes ...")
        result = ray.get(_cloud_task(_meta_test_task, topology).remote(
            cfg, params, cfg.eval.episodes))
        summary = {**result, "name": cfg.name, "algorithm": cfg.algorithm.name,
                   "train_steps": round_idx, "train_time_s": round(elapsed, 2),
                   "train_tasks": int(sum(r.get("round_tasks", 0) for r in log.rows)),
                   "federated": federated_summary(log.rows, site_log.rows, personal, fed,
                                                  topology, per_site)}
        log.write_summary(summary)
        write_plots(run_dir, log.rows, personal)
        echo(f"{cfg.name}: {_headline(result)} after {round_idx} rounds ({elapsed:.0f} s)")
        return summary
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        release_edges(edges)
        if started:
            from cluster.connect import shutdown

            shutdown()


def release_edges(edges: dict[str, Any]) -> None:
    """Kill the edge actors (their processes and memory go at once) and forget them."""
    for actor in edges.values():
        with contextlib.suppress(Exception):
            ray.kill(actor)
    edges.clear()


def start_edges(topology: Topology, spec: dict[str, Any], plans: Mapping[str, dict],
                devices: Mapping[str, int], per_site: int, echo: Printer) -> dict[str, Any]:
    """One edge actor per site, each pinned to its site's node; returns once all have loaded
    their data and warmed up (or fails after ``STARTUP_TIMEOUT_S``)."""
    from actors.edge import spawn_edge

    fail_sites = set(spec["federated"]["fail_sites"])
    edges = {s.name: spawn_edge(s, spec, plans[s.name], devices=devices[s.name],
                                seed=spec["seed"], tasks_per_round=per_site,
                                fail=s.name in fail_sites)
             for s in topology.sites}
    try:
        infos = ray.get([e.info.remote() for e in edges.values()], timeout=STARTUP_TIMEOUT_S)
    except BaseException:
        for actor in edges.values():
            ray.kill(actor)
        raise
    for info in infos:
        what = (f"{info['characters']} characters ({len(info['alphabets'])} alphabets), "
                f"{info['holdout']} held out" if info["amplitude"] is None
                else f"amplitude {info['amplitude'][0]:.2f}..{info['amplitude'][1]:.2f}")
        echo(f"  {info['site']}: {what}, {info['devices']} device(s), "
             f"ready in {info['load_s'] + info['warmup_s']:.1f} s")
    return edges


def personalize_sites(edges: Mapping[str, Any], params: Params, episodes: int,
                      echo: Printer) -> list[dict[str, Any]]:
    """Each site's held-out tasks before and after adaptation; a failing site is reported."""
    if episodes <= 0:
        return []
    ref = ray.put(params)
    refs = {site: e.personalize.remote(ref, episodes) for site, e in edges.items()}
    rows = []
    for site, r in refs.items():
        try:
            rows.append(ray.get(r))
        except Exception as err:
            rows.append({"site": site, "error": _error_text(err)})
    for row in rows:
        if "error" in row:
            echo(f"  {row['site']}: personalization failed: {row['error']}")
            continue
        key = "accuracy" if "after_accuracy" in row else "mse"
        echo(f"  {row['site']}: held-out {key} {row[f'before_{key}']:.3f} before, "
             f"{row[f'after_{key}']:.3f} after {row['steps']} step(s)")
    return rows


def federated_summary(rows: list[dict], site_rows: list[dict], personal: list[dict],
                      fed: FederatedConfig, topology: Topology, per_site: int) -> dict[str, Any]:
    """The federated part of ``summary.json``: who took part, what went wrong, what it cost."""
    df = pd.DataFrame(rows)
    sites = pd.DataFrame(site_rows)

    def count(status: str) -> dict[str, int]:
        if sites.empty:
            return {}
        picked = sites[sites["status"] == status]
        return {str(k): int(v) for k, v in picked.groupby("site").size().items()}

    return {
        "sites": topology.site_names, "tasks_per_site": per_site,
        "local_steps": fed.local_steps, "aggregator": fed.aggregator,
        "site_fraction": fed.site_fraction, "quorum": fed.quorum,
        "rounds": len(df), "skipped_rounds": int(df["skipped"].sum()) if len(df) else 0,
        "late": count("late"), "failed": count("failed"), "busy": count("busy"),
        "down": count("down"),
        "median_round_s": float(df["wall_s"].median()) if len(df) else None,
        "median_overhead_s": float(df["overhead_s"].median()) if len(df) else None,
        "bytes_down": int(df["bytes_down"].sum()) if len(df) else 0,
        "bytes_up": int(df["bytes_up"].sum()) if len(df) else 0,
        "personalization": personal,
    }


def write_plots(run_dir: Path, rows: list[dict], personal: list[dict]) -> list[Path]:
    from experiments.plots import learning_curve, round_times, site_personalization

    df = pd.DataFrame(rows)
    paths = [learning_curve(df, run_dir / "learning_curve.png", x="round"),
             round_times(df, run_dir / "round_times.png")]
    if any("error" not in p for p in personal):
        paths.append(site_personalization([p for p in personal if "error" not in p],
                                          run_dir / "personalization.png"))
    return paths


# --------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.federated",
                                     description="federated meta-training on Ray")
    parser.add_argument("config", help="a YAML config with a federated section")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", default=None, help="Ray address (default: embedded)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args(argv)
    try:
        from experiments.cli import _resolve_config

        cfg = load_config(_resolve_config(args.config), args.set)
        summary = train_federated(cfg, resume=not args.fresh, address=args.address)
    except (ConfigError, FileNotFoundError) as err:
        print(f"edgemeta federated: error: {err}", file=sys.stderr)
        return 2
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
