"""Centralized meta-training: the single-process reference that federated runs are held against.

Read top to bottom, it is the whole algorithm: sample a batch of tasks, ask the algorithm for the
meta-gradient, let the outer optimizer apply it, log, checkpoint, and evaluate on meta-test
characters that training never sees. Re-running the same config resumes from the latest
checkpoint of its run folder; Ctrl-C or SIGTERM stops after the current step with a checkpoint
(:mod:`experiments.stopping`), so a stopped run loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from cluster.console import Printer
from experiments.config import ExperimentConfig
from experiments.loop import RunLoop
from experiments.runlog import RunLog, headline
from metalearn.algorithms.base import MetaAlgorithm
from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.evaluation import evaluate, evaluate_by_steps
from metalearn.from_config import algorithm_from_config, sampler_from_config, task_type
from metalearn.outer import OuterOptimizer
from metalearn.params import Params
from metalearn.storage import PathLike

if TYPE_CHECKING:
    from experiments.progress import RunConsole

#: Told each metrics row as it is logged (a Tune trial reports it for early stopping).
RowSink = Callable[[dict[str, Any]], None]


def meta_test(cfg: ExperimentConfig, algorithm: MetaAlgorithm, params: Params,
              episodes: int, progress: RunConsole | None = None) -> dict[str, Any]:
    """Meta-test result on held-out tasks: accuracy ± ci95, or MSE by adaptation steps
    (drawn as a progress bar of episodes when ``progress`` is given)."""
    data = cfg.to_dict()["data"]
    data.update({k: v for k in ("ways", "shots", "queries")
                 if (v := getattr(cfg.eval, k)) is not None})
    sampler = sampler_from_config(data, "test", seed=cfg.eval.seed)
    sinusoid = task_type(data) == "regression"
    total = episodes * (len(cfg.eval.steps_list) if sinusoid else 1)
    bar = (nullcontext(None) if progress is None
           else progress.bar("meta-test", total, "episodes"))
    with bar as shown:
        counted = None if shown is None else shown.advance
        if sinusoid:
            by_steps = evaluate_by_steps(algorithm, params, sampler.sample, episodes,
                                         steps_list=cfg.eval.steps_list, batch=cfg.eval.batch,
                                         on_episodes=counted)
            ordered = sorted(by_steps.items())
            return {"mse": {str(k): v["mse"] for k, v in ordered},
                    "ci95": {str(k): v["ci95"] for k, v in ordered},
                    "episodes": episodes}
        return evaluate(algorithm, params, sampler.sample, episodes, steps=cfg.eval.steps,
                        batch=cfg.eval.batch, on_episodes=counted)


def train(cfg: ExperimentConfig, *, resume: bool = True, echo: Printer = print,
          progress: RunConsole | None = None, on_row: RowSink | None = None) -> dict[str, Any]:
    """Train centrally as configured, write the run folder and its report, and return the
    summary.

    Stopped by SIGINT/SIGTERM, it checkpoints the last finished step and returns
    ``{"stopped_by": "SIGTERM", "train_steps": ...}`` without meta-testing. ``progress`` draws
    the steps and the meta-test as bars; ``on_row`` is told each step's metrics row."""
    run_dir = cfg.run_dir
    config = cfg.to_dict()
    log = RunLog(run_dir)
    log.write_config(config)

    torch.manual_seed(cfg.seed)
    algorithm = algorithm_from_config(config)
    outer = OuterOptimizer(algorithm.init_params(), lr=cfg.train.outer_lr,
                           kind=cfg.train.outer_optimizer)
    sampler = sampler_from_config(config["data"], "train", seed=cfg.seed)
    with RunLoop(run_dir, unit="step", total=cfg.train.steps, echo=echo, progress=progress,
                 checkpoint_every=cfg.train.checkpoint_every,
                 time_budget_s=cfg.train.time_budget_s) as loop:
        state = loop.resume(outer) if resume else None
        if state is not None:
            sampler.load_state_dict(state["sampler"])
            log.truncate_to(loop.step)

        def checkpoint() -> None:
            # the table first, the checkpoint that commits it last: a run killed in between
            # resumes from the previous checkpoint and cuts the table back to it
            log.flush()
            save_checkpoint(run_dir, loop.step, {
                "outer": outer.state_dict(), "params": outer.params,
                "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                "elapsed_s": loop.elapsed_s})
            log.committed(loop.step)

        shape = (f"{cfg.data.shots}-shot" if task_type(config["data"]) == "regression"
                 else f"{cfg.data.ways}-way {cfg.data.shots}-shot")
        echo(f"training {cfg.algorithm.name} on {cfg.data.dataset} ({shape}) "
             f"for {cfg.train.steps} steps -> {run_dir}")
        for step in loop.steps(save=checkpoint):
            _one_step(cfg, algorithm, outer, sampler, log, step, loop, echo)
            if on_row is not None:
                on_row(log.rows[-1])
    if loop.stopped_by:
        log.close()
        return {**loop.stopped_summary(cfg.name), "train_steps": loop.step,
                "train_time_s": round(loop.elapsed_s, 2)}

    echo(f"meta-testing on {cfg.eval.episodes} episodes of {cfg.data.test_tasks} ...")
    result = meta_test(cfg, algorithm, outer.params, cfg.eval.episodes, progress)
    summary = {**result, "name": cfg.name, "algorithm": cfg.algorithm.name,
               "train_steps": loop.step, "train_time_s": round(loop.elapsed_s, 2),
               "train_tasks": loop.step * cfg.train.meta_batch}
    log.write_summary(summary)
    log.close()
    echo(f"{cfg.name}: {headline(result)} after {loop.step} steps ({loop.elapsed_s:.0f} s)")
    from experiments.report import write_report  # matplotlib: only now

    echo(f"report: {write_report(run_dir)}")
    return summary


def _one_step(cfg: ExperimentConfig, algorithm: MetaAlgorithm, outer: OuterOptimizer,
              sampler: Any, log: RunLog, step: int, loop: RunLoop, echo: Printer) -> None:
    """One meta-step: sample tasks, meta-gradient, outer step; log (and evaluate) it."""
    t0 = time.perf_counter()
    tasks = sampler.sample(cfg.train.meta_batch)
    update = algorithm.meta_update(outer.params, tasks)
    outer.step(update.tensors, update.kind)
    elapsed = loop.count(time.perf_counter() - t0)
    row: dict[str, Any] = {"step": step, "time_s": elapsed, "tasks": step * len(tasks),
                           **update.metrics}
    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
        result = meta_test(cfg, algorithm, outer.params, cfg.train.eval_episodes)
        row.update({f"test_{k}": v for k, v in result.items() if isinstance(v, float)})
        echo(f"  step {step}: meta-test {headline(result)}")
    log.append(row)
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        metrics = " ".join(f"{k} {v:.3f}" for k, v in update.metrics.items())
        echo(f"step {step}/{cfg.train.steps} {metrics} ({step / max(elapsed, 1e-9):.2f} it/s)")


def evaluate_run(run_dir: PathLike, step: int | None = None, episodes: int | None = None,
                 overrides: list[str] | None = None, echo: Printer = print,
                 progress: RunConsole | None = None) -> dict[str, Any]:
    """Re-evaluate a run folder's checkpoint (default: the latest) on meta-test tasks.

    ``overrides`` (``section.key=value``) change the evaluation without retraining, e.g.
    ``eval.steps=10`` to adapt with the MAML reference code's 10 test-time steps.
    """
    from experiments.config import apply_overrides, parse_config
    from experiments.runlog import read_run_config

    cfg = parse_config(apply_overrides(read_run_config(run_dir), overrides or []), str(run_dir))
    algorithm = algorithm_from_config(cfg.to_dict())
    state = load_checkpoint(run_dir, step)
    result = meta_test(cfg, algorithm, state["params"], episodes or cfg.eval.episodes, progress)
    result["step"] = int(state["step"])
    echo(f"{run_dir} @ step {result['step']}: {headline(result)}")
    return result
