"""``edgemeta tune CONFIG --space SPACE.yaml``: hyper-parameter search with Ray Tune.

A search space names any keys of the config (``section.key``, as ``--set`` does) and a
distribution for each::

    metric: loss_after        # a column of the run's metrics rows (default), minimized
    mode: min
    samples: 8                # trials (a grid multiplies them)
    cpus_per_trial: 1
    asha: {grace_period: 5, reduction_factor: 2}   # early stopping by steps
    space:
      train.outer_lr: {loguniform: [1.0e-4, 1.0e-2]}
      algorithm.inner_lr: {uniform: [0.005, 0.05]}
      train.meta_batch: {choice: [4, 8, 16]}
      model.hidden: {randint: [20, 80]}

Each trial is a real centralized training run (:func:`experiments.train.train`) in its own
run folder under the experiment's folder, reporting every step's metrics row to Tune; ASHA
stops the trials that trail. Trials run side by side as far as the machine's CPUs allow
(``cpus_per_trial`` each). The results (one row per trial: the values tried, the last
metrics, the meta-test) go to ``results.parquet`` and the best trial's full config to
``best.yaml``, which ``edgemeta train best.yaml`` accepts. Running the same command again
restores the experiment with Tune's ``Tuner.restore`` (unfinished trials go on; ``--fresh``
starts over).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune

from cluster import ray_logs
from cluster.console import Printer
from experiments.config import ConfigError, ExperimentConfig, apply_overrides, parse_config
from metalearn.storage import PathLike, is_uri, location

if TYPE_CHECKING:
    from experiments.progress import Bar, RunConsole

RESULTS_FILE = "results.parquet"
BEST_FILE = "best.yaml"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(2, ge=1, description="steps every trial gets before a cut")
    reduction_factor: float = Field(2.0, gt=1, description="keep 1/this at each rung")


class SearchSpace(BaseModel):
    """The search space file (``--space``)."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, dict[str, Any]] = Field(description="config key -> {distribution: args}")
    metric: str = "loss_after"
    mode: Literal["min", "max"] = "min"
    samples: int = Field(4, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    asha: Asha = Field(default_factory=Asha)

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if not self.space:
            raise ValueError("space: give at least one config key to search")
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: expected one of {list(DISTRIBUTIONS)} with its "
                                 f"arguments, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; got {spec}")
            name, args = next(iter(spec.items()))
            if name in ("uniform", "loguniform", "randint") and (
                    not isinstance(args, list) or len(args) != 2 or not args[0] < args[1]):
                raise ValueError(f"space.{key}.{name}: expected [low, high] with low < high; "
                                 f"got {args}")
            if name in ("choice", "grid") and (not isinstance(args, list) or not args):
                raise ValueError(f"space.{key}.{name}: expected a non-empty list; got {args}")
        return self


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    try:
        return SearchSpace.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def _overrides(values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]  # JSON is YAML


def trial_config(raw: dict[str, Any], values: Mapping[str, Any]) -> ExperimentConfig:
    """The base config with a trial's values set (checked as ``--set`` checks them)."""
    return parse_config(apply_overrides(raw, _overrides(values)), "tune trial")


def check_space(raw: dict[str, Any], space: SearchSpace) -> None:
    """Refuse a key the config does not have, or a value it would refuse, before any trial."""
    for key, spec in space.space.items():
        name, args = next(iter(spec.items()))
        samples = args if name in ("choice", "grid") else args[:1]
        for value in samples:
            try:
                trial_config(raw, {key: value})
            except ConfigError as err:
                lines = [ln.strip() for ln in str(err).splitlines()]
                detail = "; ".join(lines[1:]) or lines[0]  # past "invalid config ...:"
                raise ConfigError(f"search space key {key} = {value!r}: {detail}") from None


def _param_space(space: SearchSpace) -> dict[str, Any]:
    build = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
             "randint": lambda a: tune.randint(a[0], a[1] + 1),  # inclusive, as written
             "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.space.items():
        name, args = next(iter(spec.items()))
        out[key] = build[name](args)
    return out


def _trial(values: dict[str, Any], raw: dict[str, Any]) -> None:
    """One trial: a training run in the trial's folder, every row reported to Tune."""
    from experiments.train import train

    cfg = trial_config(raw, values)
    cfg = cfg.model_copy(update={"name": "run",
                                 "output_dir": tune.get_context().get_trial_dir()})
    summary = train(cfg, resume=True, echo=lambda _: None,
                    on_row=lambda row: tune.report(_numbers(row)))
    final = {f"meta_test_{k}": v for k, v in _flat(summary).items()
             if k.split(".")[0] in ("accuracy", "ci95", "mse")}
    last = {}
    if (cfg.run_dir / "metrics.parquet").is_file():
        import pandas as pd

        last = _numbers(pd.read_parquet(cfg.run_dir / "metrics.parquet").iloc[-1].to_dict())
    tune.report({**last, **final, "done": True})


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def _flat(summary: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, Mapping)})
        else:
            out[k] = v
    return out


def tune_config_file(config_path: PathLike, space_path: str | Path, *,
                     overrides: list[str] | None = None, fresh: bool = False,
                     echo: Printer = print, progress: RunConsole | None = None,
                     ) -> dict[str, Any]:
    """Run (or restore) the search; write results.parquet and best.yaml; return what it found.
    ``progress`` draws the trials as they end."""
    import ray
    from ray.tune.schedulers import ASHAScheduler

    from cluster.connect import connect, shutdown

    raw = yaml.safe_load(location(config_path).read_text()) or {}
    raw = apply_overrides(raw, overrides or [])
    base = parse_config(raw, str(config_path))
    if is_uri(base.output_dir):
        raise ConfigError(f"edgemeta tune: output_dir {base.output_dir} is object storage; Tune "
                          f"keeps its experiment in a local folder: give a local output_dir")
    if base.federated is not None:
        raise ConfigError("edgemeta tune: federated configs are not searched (each trial would "
                          "need its own set of sites); tune the learner with a centralized "
                          "config, then run federated with the best values")
    space = load_space(space_path)
    check_space(raw, space)
    storage = Path(base.output_dir).resolve()
    exp_dir = storage / f"{base.name}-tune"
    if fresh and exp_dir.exists():
        shutil.rmtree(exp_dir)
    started = not ray.is_initialized()
    if started:
        connect(None, None, num_cpus=os.cpu_count())
    ray_logs.route_driver_logs(exp_dir / "logs", echo)
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        concurrent = max(1, int(cpus // space.cpus_per_trial))
        trials = space.samples * math.prod(len(next(iter(s.values())))
                                           for s in space.space.values() if "grid" in s)
        trainable = tune.with_resources(tune.with_parameters(_trial, raw=raw),
                                        {"cpu": space.cpus_per_trial})
        restore = tune.Tuner.can_restore(str(exp_dir))
        echo(f"{'restoring' if restore else 'searching'} {len(space.space)} key(s) of "
             f"{base.name}: {trials} trial(s), {concurrent} at a time, ASHA on {space.metric} "
             f"({space.mode}) -> {exp_dir}" + (" (--fresh starts over)" if restore else ""))
        with (nullcontext(None) if progress is None or restore
              else progress.bar("trials", trials, "trials")) as bar:
            if restore:  # Tune keeps the run's settings; its trials resume in their folders
                tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
            else:
                scheduler = ASHAScheduler(max_t=base.train.steps + 1,
                                          grace_period=space.asha.grace_period,
                                          reduction_factor=space.asha.reduction_factor)
                tuner = tune.Tuner(
                    trainable, param_space=_param_space(space),
                    tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode,
                                                scheduler=scheduler, num_samples=space.samples,
                                                max_concurrent_trials=concurrent,
                                                trial_dirname_creator=lambda t: t.trial_id),
                    run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(storage),
                                              verbose=1 if ray_logs.verbose() else 0,
                                              callbacks=_callbacks(bar)))
            with _quiet_tune():
                results = tuner.fit()
        return _write_results(results, raw, base, space, exp_dir, echo)
    finally:
        if started:
            shutdown()


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's own console output off unless verbose: its older reporter honours ``verbose=0``
    (the newer one prints its settings table regardless), and the TensorBoard logger, whose
    missing package would cost a warning a run, is left out (JSON and CSV results stay)."""
    quiet = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    if ray_logs.verbose():
        yield
        return
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _callbacks(bar: Bar | None) -> list[Any]:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback(), TrialsDone(bar)]


class TrialsDone(tune.Callback):
    """Advances the trials bar as each trial ends (finished, stopped early, or failed).

    Tune pickles its run settings into the experiment folder (for restore); the bar is this
    process's console, so a copy carries none."""

    def __init__(self, bar: Bar | None) -> None:
        self.bar = bar

    def __getstate__(self) -> dict[str, Any]:
        return {"bar": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.bar is not None:
            self.bar.advance()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.bar is not None:
            self.bar.advance()


def _write_results(results: Any, raw: dict[str, Any], base: ExperimentConfig,
                   space: SearchSpace, exp_dir: Path, echo: Printer) -> dict[str, Any]:
    df = results.get_dataframe()
    keep = [c for c in df.columns if c.startswith("config/") or c in (
        "trial_id", "training_iteration", space.metric, "done", "time_total_s")
        or c.startswith("meta_test_")]
    table = df[keep].rename(columns=lambda c: c.removeprefix("config/"))
    # A trial ASHA stopped early has its metric from fewer steps: it cannot be compared with
    # the trials that ran to the end (and were meta-tested), so it is never the best.
    table["finished"] = table.filter(like="meta_test_").notna().any(axis=1)
    table.to_parquet(exp_dir / RESULTS_FILE, index=False)
    done = [r for r in results if r.error is None and r.metrics
            and any(k.startswith("meta_test_") for k in r.metrics)]
    pool = done or [r for r in results if r.error is None and r.metrics]
    if not pool:
        raise RuntimeError(f"every trial failed; see the trials' error files under {exp_dir}")
    pick = min if space.mode == "min" else max
    best = pick(pool, key=lambda r: r.metrics.get(space.metric, math.inf if space.mode == "min"
                                                  else -math.inf))
    values = {k: best.config[k] for k in space.space}
    best_raw = apply_overrides(raw, _overrides(values))
    best_raw["name"] = f"{base.name}-best"
    parse_config(best_raw, "best config")  # what `edgemeta train` will read
    (exp_dir / BEST_FILE).write_text(
        f"# best of {len(pool)} finished trial(s) by {space.metric} ({space.mode}): "
        f"{best.metrics.get(space.metric)}\n" + yaml.safe_dump(best_raw, sort_keys=False))
    errors = sum(1 for r in results if r.error is not None)
    echo(f"{len(table)} trial(s), {errors} failed; best {space.metric} "
         f"{best.metrics.get(space.metric):.4g} with "
         + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    echo(f"results: {exp_dir / RESULTS_FILE}")
    echo(f"best config: {exp_dir / BEST_FILE} (edgemeta train {exp_dir / BEST_FILE})")
    return {"trials": len(table), "errors": errors, "best": values,
            "best_metric": best.metrics.get(space.metric), "dir": str(exp_dir)}
