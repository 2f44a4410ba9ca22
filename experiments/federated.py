"""Federated meta-training: the cloud's outer loop, across edge sites on Ray.

It mirrors :mod:`experiments.train`, with the batch of tasks replaced by a round of sites::

    for each round:                                     (experiments.loop: resume, signals,
        choose participants  (seeded by (seed, round))   budget, checkpoint cadence)
        params -> every participant, inline or one ray.put        (actors.federation)
        each site samples its own tasks, returns a RoundReply     (actors.edge)
        wait until all replied or the deadline; late / failed / down sites are recorded
        aggregate what arrived (a rule of metalearn.aggregation) -> outer optimizer step
        log a row per round and per site

Entry points: ``edgemeta federated CONFIG`` and ``python -m experiments.federated CONFIG``
(also what ``ray job submit -- python -m experiments.federated ...`` and ``edgemeta submit``
run on a cluster; the run goes to run storage, :mod:`experiments.run_storage`).

Decisions worth knowing:

* **Data stays at the edge.** Each site reads only its own store (``federated.data``; with
  no ``stores`` folder given, the run shards the source into ``<run>/stores/<site>`` first,
  each store made on its own site's node). The cloud plans from the manifests the sites
  report (counts, never examples; :mod:`actors.cloud`); the driver opens no data file, no
  cloud task opens a store, and the final meta-test runs as a task on the ``cloud`` node.
* **Quorum.** A round with fewer than ``federated.quorum`` arrived updates makes no outer step
  (recorded as ``skipped``); after ``max_missed_rounds`` such rounds in a row the run stops
  (after writing a checkpoint) with :class:`QuorumLost`, one line that names the settings to
  change, since a federation that cannot reach quorum is not training. The count of missed
  rounds is checkpointed with the quorum it was counted against: resumed with another
  ``quorum``, the count starts again, so the same command with the setting changed goes on.
* **Differential privacy** (``federated.privacy``, :mod:`experiments.dp`): sites clip (and
  with distributed noise add their share of the noise) before replying; the round's aggregate
  is then the noised sum over the expected number of units instead of the aggregation rule,
  each row records epsilon, and a target epsilon ends training after the last round within it.
* **Secure aggregation** (``federated.secure_aggregation``, :mod:`experiments.secagg`): a round
  adds three key exchanges around the round call (:mod:`actors.secure_round`); each site clips
  and masks its update, and the cloud unmasks only the sum of those that arrived (a site that
  drops after sharing its keys is left out exactly). Too few sites at a step skips the round.
* **Heterogeneous sites** (the topology's ``speed``, ``bandwidth_mbps``, ``availability``;
  ``local_time_budget_s``; ``compression``): the sites act them out (:mod:`actors.edge`); the
  driver asks only the sites its copy of their availability schedules says are on at the
  round's start (the rest are ``away``), and one that leaves mid-round fails its call.
* **Asynchronous rounds** (``federated.mode: async``, :mod:`experiments.buffered`): FedBuff;
  a step is an applied update of ``buffer_size`` staleness-weighted results.
* **Exact resume.** Tasks are seeded by ``(seed, site, device, round)`` and participants by
  ``(seed, round)``; the checkpoint holds meta-parameters, optimizer and aggregator state. A
  run stopped after round r and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from actors.cloud import SitePlanError, check_resources, on_cloud, plan_partitions
from actors.conditions import availability_schedule
from actors.contract import Personalize, UpdateKind
from actors.federation import Federation, RoundOutcome, broadcast
from cluster import ray_logs
from cluster.connect import join_or_start, shutdown
from cluster.console import Printer
from cluster.topology import Topology
from experiments import dp, secagg
from experiments.buffered import train_buffered
from experiments.config import (
    ConfigError,
    ExperimentConfig,
    FederatedConfig,
)
from experiments.entry import add_run_arguments, config_from_args
from experiments.loop import RunLoop
from experiments.run_storage import where_line
from experiments.runlog import (
    RowTable,
    RunLog,
    federated_summary,
    headline,
    round_line,
    round_row,
)
from experiments.site_jobs import (
    auto_shard,
    choose_participants,
    federated_section,
    site_conditions,
    site_jobs,
    site_stores,
    tasks_per_site,
)
from experiments.stopping import exit_code
from metalearn.aggregation import Aggregator
from metalearn.availability import Schedule
from metalearn.checkpoint import save_checkpoint
from metalearn.data.errors import DataSetError
from metalearn.from_config import algorithm_from_config
from metalearn.outer import OuterOptimizer
from metalearn.params import Params, num_bytes
from metalearn.site_models import save_site_model
from metalearn.storage import StorageError

#: Exit status of a run stopped below quorum (2 is a configuration error, 128+N a signal).
QUORUM_LOST_EXIT = 3


class QuorumLost(RuntimeError):
    """Too many rounds in a row below ``federated.quorum``; the message is the one line the
    command prints (the cause, the settings to change, how to resume)."""


def quorum_lost(fed: FederatedConfig, missed: int, round_idx: int,
                outcome: RoundOutcome) -> QuorumLost:
    arrived, called = outcome.count("ok"), len(outcome.sites)
    why = "; ".join(f"{s['site']} {s['status']}" + (f" ({s['error'][:80]})" if s.get("error")
                                                     else "")
                    for s in outcome.sites if s["status"] != "ok")
    hint = f"--set federated.quorum={arrived}" if arrived else "bring the sites back"
    return QuorumLost(
        f"stopped at round {round_idx}: {missed} rounds in a row below federated.quorum="
        f"{fed.quorum} (last round: {arrived} of {called} updates arrived; {why or 'no sites'})."
        f" Round {round_idx} is checkpointed: lower federated.quorum ({hint}), raise "
        f"federated.max_missed_rounds={fed.max_missed_rounds} or federated.deadline_s="
        f"{fed.deadline_s}, or fix the sites, then run the same command to resume")


if TYPE_CHECKING:
    from experiments.progress import RunConsole
    from experiments.train import RowSink


def train_federated(cfg: ExperimentConfig, *, resume: bool = True, address: str | None = None,
                    echo: Printer = print, progress: RunConsole | None = None,
                    on_row: RowSink | None = None) -> dict[str, Any]:
    """Train across the topology's edge sites as configured; write the run folder and its
    report; summarize. ``progress`` draws the rounds, a live table of the sites and the
    meta-test; ``on_row`` is told each round's metrics row."""
    fed = federated_section(cfg)
    topology = fed.resolved_topology()
    devices = {s.name: fed.devices_per_site or s.devices for s in topology.sites}
    per_site = tasks_per_site(cfg, len(devices))
    if fed.devices_per_round and fed.devices_per_round > per_site:
        raise ConfigError(f"federated.devices_per_round {fed.devices_per_round} exceeds the "
                          f"{per_site} tasks per site: some devices would sample no task")
    dp.check_fits(fed, devices, per_site)
    config = cfg.to_dict()  # the run folder's copy is self-contained: the topology in full
    config["federated"]["topology"] = topology.model_dump(mode="json")
    log = RunLog(cfg.run_dir)
    log.write_config(config)

    started = join_or_start(address or fed.address, topology)
    ray_logs.route_driver_logs(ray_logs.log_dir_for(cfg.run_dir), echo)
    cloud: Cloud | None = None
    # The cloud's own work is vector ops on ~1e5 floats (pack, aggregate, Adam): one thread.
    # Two OpenMP threads gain nothing at that size and, when the sites keep the cores busy,
    # wait on each other for a time slice (100+ ms stalls were measured here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_resources(topology)
        cloud = Cloud.start(cfg, topology, devices, per_site, log.site_table(), echo)
        # Everything alive now (modules, config, the actors' handles) lives for the run:
        # move it out of the collector's reach, so a full collection mid-round walks only
        # what the rounds allocate (the same trick as Serve's RAY_SERVE_FREEZE_GC_ON_STARTUP).
        gc.collect()
        gc.freeze()  # undone in `finally`: the caller's heap is theirs again after the run
        echo(f"federated {cfg.algorithm.name} on {cfg.data.dataset}: {len(devices)} sites, "
             f"{per_site} tasks per site, {fed.local_steps} local step(s), "
             f"{cfg.train.steps} rounds -> {cfg.run_dir}")
        if fed.mode == "sync":
            loop = _train_rounds(cfg, cloud, log, devices, resume, echo, progress, on_row)
        else:
            loop = train_buffered(cfg, cloud, log, devices, resume, echo)
        if loop.stopped_by:
            return loop.stopped_summary(cfg.name)

        personal = make_site_models(cfg, cloud, loop.step, per_site, echo)
        cloud.federation.release()  # the sites' work is done: free them before the meta-test
        echo(f"meta-testing on {cfg.eval.episodes} episodes of {cfg.data.test_tasks} ...")
        with (nullcontext() if progress is None
              else progress.bar("meta-test on the cloud node", None, "episodes")):
            result = meta_test_on_cloud(cfg, cloud.outer.params, cfg.eval.episodes, topology)
        summary = {**result, "name": cfg.name, "algorithm": cfg.algorithm.name,
                   "train_steps": loop.step, "train_time_s": round(loop.elapsed_s, 2),
                   "train_tasks": int(sum(r.get("round_tasks", 0) for r in log.rows)),
                   "federated": federated_summary(log.rows, cloud.site_log.rows, personal, fed,
                                                  topology, per_site)}
        if cloud.privacy is not None:
            summary["privacy"] = cloud.privacy.summary(loop.step)
        log.write_summary(summary)
        from experiments.plots import write_federated_plots  # matplotlib: only now

        write_federated_plots(cfg.run_dir, log.rows, personal)
        echo(f"{cfg.name}: {headline(result)} after {loop.step} rounds ({loop.elapsed_s:.0f} s)")
        from experiments.report import write_report

        echo(f"report: {write_report(cfg.run_dir)}")
        return summary
    finally:
        log.close()
        gc.unfreeze()
        torch.set_num_threads(threads)
        if cloud is not None:
            cloud.federation.release()
        if started:
            shutdown()


def _train_rounds(cfg: ExperimentConfig, cloud: Cloud, log: RunLog, devices: Mapping[str, int],
                  resume: bool, echo: Printer, progress: RunConsole | None,
                  on_row: RowSink | None) -> RunLoop:
    """The rounds, resumed from the latest checkpoint; returns the loop (where it stopped)."""
    fed, rounds = federated_section(cfg), cfg.train.steps
    if cloud.privacy is not None:  # a target epsilon may allow fewer rounds
        rounds = cloud.privacy.rounds
        echo(cloud.privacy.describe())
    if cloud.secagg is not None:
        echo(cloud.secagg.describe())
    with RunLoop(cfg.run_dir, unit="round", total=rounds, echo=echo, progress=progress,
                 checkpoint_every=cfg.train.checkpoint_every,
                 time_budget_s=cfg.train.time_budget_s,
                 stop_after=fed.stop_after_rounds) as loop:
        state = loop.resume(cloud.outer) if resume else None
        if state is not None:
            cloud.restore(state, loop.step)
            log.truncate_to(loop.step, key="round")
            if state.get("quorum") != fed.quorum and int(state["missed"]):
                echo(f"federated.quorum is now {fed.quorum} (was {state.get('quorum')}): the "
                     f"{int(state['missed'])} round(s) missed before round {loop.step} no "
                     "longer count")

        def checkpoint() -> None:
            # the tables (and the guarantee) first, the checkpoint that commits them last: a
            # driver killed in between resumes from the previous checkpoint and cuts the
            # tables back to it, never to a checkpoint whose rows it lost
            log.flush()
            cloud.site_log.flush()
            if cloud.privacy is not None:
                cloud.privacy.write(cfg.run_dir, loop.step)
            save_checkpoint(cfg.run_dir, loop.step, {**cloud.state(), "elapsed_s": loop.elapsed_s})
            log.committed(loop.step)

        last_trouble: list[str] = []
        for round_idx in loop.steps(save=checkpoint):
            t0 = time.perf_counter()
            row, outcome = _one_round(fed, cloud, round_idx, devices, cfg.seed,
                                      clock_s=loop.elapsed_s)
            cloud.missed = cloud.missed + 1 if row["skipped"] else 0
            row["time_s"] = loop.count(time.perf_counter() - t0)
            cloud.site_log.extend({"round": round_idx, **s} for s in outcome.sites)
            if cfg.train.eval_every and round_idx % cfg.train.eval_every == 0:
                result = meta_test_on_cloud(cfg, cloud.outer.params, cfg.train.eval_episodes,
                                            cloud.topology)
                row.update({f"test_{k}": v for k, v in result.items() if isinstance(v, float)})
                echo(f"  round {round_idx}: meta-test {headline(result)}")
            if (fed.site_models_every and round_idx % fed.site_models_every == 0
                    and round_idx < rounds):  # the last round's are made after the loop
                make_site_models(cfg, cloud, round_idx, tasks_per_site(cfg, len(devices)), echo)
            log.append(row)
            if progress is not None:
                progress.sites(outcome.sites)
            if on_row is not None:
                on_row(row)
            trouble = [f"{s['site']} {s['status']}" for s in outcome.sites
                       if s["status"] not in ("ok", "away")]  # away: its schedule, no trouble
            # Trouble is news when it changes (a site goes down, comes back, turns late); a
            # site down for an hour is one line, not one a round (the rows keep every round).
            if (round_idx % cfg.train.log_every == 0 or round_idx == rounds
                    or trouble != last_trouble):
                echo(round_line(row, rounds, trouble))
            last_trouble = trouble
            if cloud.missed >= fed.max_missed_rounds:
                checkpoint()
                raise quorum_lost(fed, cloud.missed, round_idx, outcome)
    if cloud.privacy is not None and cloud.privacy.stops_early and loop.step == rounds:
        echo(f"privacy budget: stopped after round {rounds} of {cfg.train.steps} (epsilon "
             f"{cloud.privacy.epsilon(rounds):.3f}; one more round would exceed the target "
             f"{cloud.privacy.dp.target_epsilon:g} at delta {cloud.privacy.dp.delta:g})")
    return loop


def make_site_models(cfg: ExperimentConfig, cloud: Cloud, round_idx: int, per_site: int,
                     echo: Printer) -> list[dict[str, Any]]:
    """Each site's scores on its held-out tasks and its personalized model, made at the site
    from the meta-parameters of ``round_idx`` (:meth:`actors.edge.EdgeNode.personalize`);
    the models go to run storage as ``adapted/site-NAME.pt`` (served as ``RUN@site-NAME``).
    Only parameters and scores cross: the driver never sees a site's data. Returns the
    report's rows."""
    fed = federated_section(cfg)
    if fed.personalize_episodes <= 0:
        return []
    ask = Personalize(round=round_idx, episodes=fed.personalize_episodes,
                      steps=fed.site_model_steps, lr=cfg.train.outer_lr,
                      optimizer=cfg.train.outer_optimizer, tasks_per_step=per_site)
    rows, models = cloud.federation.personalize(cloud.outer.params, ask, echo)
    scores = {r["site"]: r for r in rows}
    written = [save_site_model(cfg.run_dir, site, cloud.outer.layout.unpack(reply.params),
                               {"round": reply.round, "steps": reply.steps,
                                "lr": ask.lr, "optimizer": ask.optimizer,
                                "scores": scores.get(site, {}),
                                "train_metrics": dict(reply.train_metrics)})
               for site, reply in sorted(models.items())]
    if written:
        echo(f"  site models (round {round_idx}, {ask.steps} step(s) each): "
             + ", ".join(p.name for p in written))
    return rows


def _one_round(fed: FederatedConfig, cloud: Cloud, round_idx: int, devices: Mapping[str, int],
               seed: int, clock_s: float = 0.0) -> tuple[dict[str, Any], RoundOutcome]:
    """One round: participants, parameters out, replies in, aggregate, outer step; its row.
    ``clock_s``: the run's clock at the round's start (counted training time), against which
    sites that come and go are available or away."""
    t0 = time.perf_counter()
    present = [s for s in devices if s not in cloud.schedules or cloud.schedules[s].is_on(clock_s)]
    participants = (choose_participants(present, devices, fed, seed, round_idx) if present
                    else {})
    params_ref = broadcast(cloud.outer.flat_params().to(torch.float32).numpy(),
                           len(participants))
    t_sent = time.perf_counter()
    clip = None if cloud.privacy is None else cloud.privacy.clip_norm
    secure = None
    if cloud.secagg is None:
        outcome = cloud.federation.run_round(
            params_ref, round_idx, participants, fed.deadline_s, clip,
            run_clock_s=clock_s + (time.perf_counter() - t0) if cloud.schedules else None)
        outcome.sites.extend({"site": s, "status": "away"} for s in devices if s not in present)
        outcome.sites.sort(key=lambda r: r["site"])
        skipped = len(outcome.updates) < fed.quorum
    else:
        secure = cloud.secagg.round(cloud.federation, round_idx, participants, params_ref, clip)
        outcome = secure.outcome
        skipped = secure.result is None
    t_back = t_aggregated = time.perf_counter()
    if not skipped:
        if secure is not None and secure.result is not None:
            aggregated = _secure_aggregate(cloud, secure.result.total, outcome, participants,
                                           round_idx)
            # what every site's update is (the masked replies say it too): local_update
            # returns the algorithm's meta-gradient for one local step, a delta for more
            kind: UpdateKind = "gradient" if fed.local_steps == 1 else "delta"
        else:
            aggregated = (cloud.aggregator.aggregate(outcome.updates) if cloud.privacy is None
                          else cloud.privacy.release(outcome, participants, round_idx))
            kind = outcome.updates[0].kind
        t_aggregated = time.perf_counter()
        cloud.outer.step_flat(aggregated, kind)
    t_end = time.perf_counter()
    row = round_row(round_idx, outcome, cloud.param_bytes, list(devices), wall_s=t_end - t0)
    row.update(put_s=t_sent - t0, aggregate_s=t_aggregated - t_back,
               outer_step_s=t_end - t_aggregated, skipped=skipped)
    if secure is not None:
        row.update(secure.fields())
    if cloud.privacy is not None and clip is not None:
        arrived = len(outcome.updates) if secure is None else (
            0 if secure.result is None else len(secure.result.survivors))
        row.update(cloud.privacy.round_fields(round_idx, clip, arrived))
    return row, outcome


def _secure_aggregate(cloud: Cloud, total: np.ndarray, outcome: RoundOutcome,
                      participants: Mapping[str, list[int]], round_idx: int) -> torch.Tensor:
    """The round's update from the unmasked sum of the survivors' updates: their mean (every
    site computes the same number of tasks, so this is the task-weighted mean), or, under
    privacy, the noised sum over the expected number of units."""
    summed = torch.from_numpy(total)
    if cloud.privacy is not None:
        return cloud.privacy.release(outcome, participants, round_idx, total=summed)
    return summed / outcome.count("ok")


@dataclass
class Cloud:
    """What the cloud holds during a run: the meta-parameters and their optimizer, the
    aggregation rule, the handle on the sites, the per-site table, and the count of rounds in
    a row below quorum. :meth:`state` is exactly what a checkpoint keeps of it."""

    outer: OuterOptimizer
    aggregator: Aggregator
    federation: Federation
    topology: Topology
    site_log: RowTable
    param_bytes: int
    quorum: int = 1  # the quorum ``missed`` is counted against
    missed: int = 0
    privacy: dp.CloudPrivacy | None = None
    secagg: secagg.CloudSecAgg | None = None
    schedules: dict[str, Schedule] = field(default_factory=dict)  # sites that come and go

    @classmethod
    def start(cls, cfg: ExperimentConfig, topology: Topology, devices: Mapping[str, int],
              per_site: int, site_log: RowTable, echo: Printer) -> Cloud:
        """Initial meta-parameters, the sites' partitions, and one started actor per site;
        ``site_log``: the run's per-site table."""
        fed = federated_section(cfg)
        privacy = dp.CloudPrivacy.start(fed, devices, cfg.train.steps)  # budget errors first
        torch.manual_seed(cfg.seed)
        outer = OuterOptimizer(algorithm_from_config(cfg.to_dict()).init_params(),
                               lr=cfg.train.outer_lr, kind=cfg.train.outer_optimizer)
        try:
            shard = auto_shard(cfg, topology)
            plans = plan_partitions(cfg.to_dict()["data"], topology, cfg.seed,
                                    fed.holdout_fraction,
                                    stores=(site_stores(cfg, topology)
                                            if cfg.data.dataset == "omniglot" else None),
                                    shard=shard)
        except SitePlanError as err:
            raise ConfigError(str(err)) from None
        if cfg.data.dataset == "omniglot":
            how = (f"{shard.partitioner['name']} shards made by the run" if shard is not None
                   else "given")
            echo(f"  site stores ({how}): " + ", ".join(
                f"{p['store']} ({len(p['characters']) + len(p['holdout'])} classes)"
                for p in plans.values()))
        federation = Federation.start(
            site_jobs(cfg, topology, plans, devices, per_site, dim=outer.layout.numel),
            {s.name: s.actor_cpus for s in topology.sites}, outer.layout, echo)
        return cls(outer, fed.aggregator.build(), federation, topology,
                   site_log, num_bytes(outer.params), fed.quorum,
                   privacy=privacy,
                   secagg=secagg.CloudSecAgg.start(fed, devices, outer.layout.numel),
                   schedules={s.name: availability_schedule(cfg.seed, s.name, site_conditions(s))
                              for s in topology.sites if s.availability is not None})

    def state(self, with_sites: bool = True) -> dict[str, Any]:
        """What a checkpoint keeps; ``with_sites``: the sites' sampler states too (not in
        asynchronous runs, whose sites are always mid-call)."""
        sites = self.federation.sampler_states() if with_sites else {}
        return {"outer": self.outer.state_dict(), "params": self.outer.params,
                "aggregator": self.aggregator.state_dict(), "torch_rng": torch.get_rng_state(),
                "missed": self.missed, "quorum": self.quorum, "sites": sites,
                **({} if self.privacy is None else {"privacy": self.privacy.state_dict()})}

    def restore(self, state: Mapping[str, Any], round_idx: int) -> None:
        """The rest of a checkpoint (the loop restored the parameters and optimizer)."""
        self.aggregator.load_state_dict(state["aggregator"])
        # Rounds missed against another quorum (or a checkpoint that did not say) do not
        # count against this one.
        self.missed = int(state["missed"]) if state.get("quorum") == self.quorum else 0
        if self.privacy is not None:
            self.privacy.load_state_dict(state.get("privacy"))
        elif "privacy" in state:
            raise ConfigError("the latest checkpoint was trained with federated.privacy; going "
                              "on without it would void the guarantee its privacy.json states: "
                              "start afresh (--fresh) or keep the privacy section")
        self.federation.load_sampler_states(state["sites"])
        self.site_log.truncate_to(round_idx, key="round")


# --------------------------------------------------------------------------- the meta-test

def meta_test_task(cfg: ExperimentConfig, params: Params, episodes: int) -> dict[str, Any]:
    """The meta-test, as a task body (it loads the meta-test data in its own process): on
    Omniglot's test split, or on the cloud's own store (``federated.data.test_store``)."""
    from experiments.train import meta_test

    algorithm = algorithm_from_config(cfg.to_dict())
    store = None if cfg.federated is None else cfg.federated.data.test_store
    if store is None:
        return meta_test(cfg, algorithm, params, episodes)
    from metalearn.data.episodes import OmniglotEpisodes
    from metalearn.data.store import load_store
    from metalearn.evaluation import evaluate

    data = load_store(store).as_omniglot()
    ev, train = cfg.eval, cfg.data
    sampler = OmniglotEpisodes(data, np.arange(data.num_characters), ways=ev.ways or train.ways,
                               shots=ev.shots or train.shots,
                               queries=ev.queries or train.queries, rotations=train.rotations,
                               seed=ev.seed)
    return evaluate(algorithm, params, sampler.sample, episodes, steps=ev.steps, batch=ev.batch)


def meta_test_on_cloud(cfg: ExperimentConfig, params: Params, episodes: int,
                       topology: Topology) -> dict[str, Any]:
    return ray.get(on_cloud(meta_test_task, topology).remote(cfg, params, episodes))


# --------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.federated",
                                     description="federated meta-training on Ray")
    add_run_arguments(parser, "a YAML config with a federated section")
    parser.add_argument("--address", default=None, help="Ray address (default: embedded)")
    args = parser.parse_args(argv)
    try:
        from experiments.progress import RunConsole

        cfg = config_from_args(args)
        out = RunConsole()  # plain lines in `ray job logs` (not a terminal)
        out.echo(where_line(cfg))
        summary = train_federated(cfg, resume=not args.fresh, address=args.address,
                                  echo=out.echo, progress=out)
    except (ConfigError, FileNotFoundError, StorageError, DataSetError) as err:
        print(f"edgemeta federated: error: {err}", file=sys.stderr)
        return 2
    except QuorumLost as err:
        print(f"edgemeta federated: {err}", file=sys.stderr)
        return QUORUM_LOST_EXIT
    return exit_code(summary)

if __name__ == "__main__":
    sys.exit(main())
