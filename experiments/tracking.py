"""Experiment tracking: a run's metrics rows also in MLflow and TensorBoard, if configured.

The run folder's parquet tables are the record of a run; the trackers the ``tracking`` section
asks for (:mod:`experiments.tracking_config`) receive the same rows through the one hook in
:class:`experiments.runlog.RunLog`, for centralized and federated runs alike: every numeric
value of a row of ``metrics.parquet`` under its column's name, those of ``sites.parquet`` as
``site/<site>/<column>``, at the row's step (a round in a federated run); NaN and missing values
are no point (the tables cannot tell them apart). The resolved config goes to MLflow as params
(flattened: ``train.outer_lr``) and as ``config.yaml``, to TensorBoard as text; the final
meta-test's numbers as ``summary/...`` points at the last step.

Rows go to the trackers after the checkpoint that commits them is written, so a tracker holds
what a resumed run keeps: ``tracking.json`` in the run folder records the last step sent and
the MLflow run, a resumed run continues that MLflow run and sends what its checkpoint committed
but the trackers missed, and TensorBoard hides the steps after it (``purge_step``). The MLflow
run is made (and recorded) at the run's first row, long before a checkpoint; the points a run
killed while sending got through are not sent again. Only a run killed while its MLflow run is
being made leaves an empty run beside the one its resumption makes. MLflow's file store (the
default) writes a file per metric and is not safe against a kill: a driver SIGKILLed while it
wrote has left an empty metric file that MLflow then refuses to read (a one-line error here);
a database or server store (``tracking.mlflow.uri``) has no such gap.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments.config import ConfigError
from experiments.tracking_config import DEFAULT_MLFLOW_FOLDER, TrackingConfig
from metalearn.storage import Location

STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'edgemeta[tracking]'"

#: A metric point: name, value, step.
Point = tuple[str, float, int]
#: A table as the trackers read it: its rows, the column that numbers them, and the column
#: that names a series of rows (``site``), if any.
Table = tuple[Sequence[Mapping[str, Any]], str, str | None]


def metric_points(rows: Iterable[Mapping[str, Any]], key: str, series: str | None,
                  after: int, upto: int) -> list[Point]:
    """The points of the rows numbered in ``(after, upto]``: each finite or infinite number,
    named by its column (``<series>/<value>/<column>`` for a table of series)."""
    skip = {key, "step", "round", series}
    out: list[Point] = []
    for row in rows:
        step = int(row[key])
        if not after < step <= upto:
            continue
        prefix = "" if series is None else f"{series}/{row[series]}/"
        for column, value in row.items():
            number = _number(value)
            if column not in skip and number is not None:
                out.append((prefix + column, number, step))
    return out


def _number(value: Any) -> float | None:
    """A row's value as a metric, or None for text, NaN and missing values."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
        return None if math.isnan(number) else number
    return None


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: nested keys joined by dots, leaves as text (lists and
    empty mappings as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def summary_points(summary: Mapping[str, Any], step: int) -> list[Point]:
    """The summary's numbers (to two levels: ``summary/mse/5``) as points at ``step``."""
    out: list[Point] = []
    for key, value in summary.items():
        leaves = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, leaf in leaves:
            number = _number(leaf)
            if number is not None:
                name = f"summary/{key}" if sub is None else f"summary/{key}/{sub}"
                out.append((name, number, step))
    return out


class MlflowTracker:
    """One MLflow run per edgemeta run, through MLflow's client API (no global active run)."""

    def __init__(self, uri: str, experiment: str) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise ConfigError(f"tracking.mlflow is set but MLflow is not installed: {INSTALL} "
                              "(or pip install mlflow-skinny)") from None
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store only for those who ask (its default is a
            # database); a local store that needs no server is what the default promises
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment)
        except (MlflowException, ImportError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            hint = ("" if uri.split(":", 1)[0] in ("file", "http", "https") or "://" not in uri
                    else " (a database store needs the full mlflow package: pip install mlflow)")
            raise ConfigError(f"tracking.mlflow: cannot use the store {uri!r}{hint}: {first}"
                              ) from None
        self.run_id = ""

    def _experiment(self, name: str) -> str:
        """The experiment's id, made if missing (runs started side by side, as Tune's trials
        are, may both try: the loser finds the winner's)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def open(self, name: str, run_id: str | None, run_dir: Location) -> bool:
        """Continue ``run_id`` if the store still has it (True), else start a run (False)."""
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                self.client.get_run(run_id)
            except MlflowException:
                run_id = None
        if run_id:
            self.run_id = str(run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            return True
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"edgemeta.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        return False

    def describe(self, config: Mapping[str, Any], continued: bool) -> None:
        """The config as params and as ``config.yaml``; on a continued run, the keys new since
        as params and those changed (MLflow keeps a param's first value) as tags."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        params = flat_params(config)
        known = self.client.get_run(self.run_id).data.params if continued else {}
        fresh = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()
                 if k not in known]
        changed = [RunTag(f"resumed.{k}", v[:MAX_TAG_VAL_LENGTH])
                   for k, v in params.items() if k in known and known[k] != v]
        self.client.log_batch(self.run_id, params=fresh, tags=changed)
        self.client.log_text(self.run_id, yaml.safe_dump(dict(config), sort_keys=False),
                             "config.yaml")

    def log(self, points: Sequence[Point]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, stamp, step)
                                                    for name, value, step in points])

    def already_logged(self, points: Sequence[Point]) -> set[tuple[str, int]]:
        """Which ``(name, step)`` of ``points`` the run holds already (what a run killed
        while sending them got through)."""
        return {(metric.key, metric.step) for name in {name for name, _, _ in points}
                for metric in self.client.get_metric_history(self.run_id, name)}

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        """Nothing to release: the client writes each batch as it is given."""


class TensorBoardTracker:
    """Event files under ``<run>/tensorboard``, written by torch's ``SummaryWriter``."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tracking.tensorboard is true but TensorBoard is not installed: "
                              f"{INSTALL} (or pip install tensorboard)") from None
        self.folder = folder
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def open(self, name: str, config: Mapping[str, Any], sent: int) -> None:
        """A writer that hides the events after ``sent`` a killed run left behind."""
        self.writer = self._writer_class(str(self.folder), purge_step=sent + 1)
        if sent == 0:
            text = yaml.safe_dump(dict(config), sort_keys=False)
            self.writer.add_text("config", f"```yaml\n{text}```", 0)

    def log(self, points: Sequence[Point]) -> None:
        for name, value, step in points:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Tracking:
    """The trackers of one run, and where they are: the last step sent and the MLflow run."""

    def __init__(self, run_dir: Location, config: Mapping[str, Any],
                 mlflow: MlflowTracker | None, tensorboard: TensorBoardTracker | None) -> None:
        self.run_dir = run_dir
        self.config = config
        self.mlflow = mlflow
        self.tensorboard = tensorboard
        self.sent = 0
        self.opened = False
        self._unsure: tuple[int, int] | None = None  # steps MLflow may hold some points of

    @classmethod
    def start(cls, config: Mapping[str, Any], run_dir: Location) -> Tracking | None:
        """The trackers ``config['tracking']`` asks for (None when it asks for none); a
        missing package or an unusable store is a :class:`ConfigError` before the run starts."""
        settings = TrackingConfig.model_validate(config.get("tracking") or {})
        if not settings.enabled:
            return None
        mlflow = tensorboard = None
        if settings.mlflow is not None:
            uri = settings.mlflow.uri or _default_mlflow_uri(run_dir)
            mlflow = MlflowTracker(uri, settings.mlflow.experiment)
        if settings.tensorboard:
            if not run_dir.is_local:
                raise ConfigError(f"tracking.tensorboard writes event files into the run folder,"
                                  f" which must be local (this run is in {run_dir})")
            tensorboard = TensorBoardTracker(run_dir.path / TENSORBOARD_DIR)
        return cls(run_dir, config, mlflow, tensorboard)

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return {}

    def _open(self, resumed_at: int | None) -> None:
        state = self._state() if resumed_at is not None else {}
        self.sent = min(int(state.get("sent_step", 0)), resumed_at or 0)
        name = str(self.config.get("name", self.run_dir.name))
        continued = False
        if self.mlflow is not None:
            same_store = state.get("mlflow_uri") == self.mlflow.uri
            try:
                continued = self.mlflow.open(name, state.get("mlflow_run_id") if same_store
                                             else None, self.run_dir)
            except ValueError as err:  # MLflow's file store, half-written by a killed run
                raise ConfigError(
                    f"tracking.mlflow: the store {self.mlflow.uri!r} cannot be read ({err}); a "
                    "run killed while MLflow wrote to its file store can leave it so: remove "
                    "the broken run there, or use a database or server store") from None
            if not continued:
                self.sent = 0  # a new MLflow run gets every row
        if continued and resumed_at is not None and resumed_at > self.sent:
            self._unsure = (self.sent, resumed_at)
        self.opened = True
        self._save_state()  # at once: a run killed from here on continues this MLflow run
        if self.mlflow is not None:
            self.mlflow.describe(self.config, continued)
        if self.tensorboard is not None:
            self.tensorboard.open(name, self.config, self.sent)

    def _save_state(self) -> None:
        state: dict[str, Any] = {"sent_step": self.sent}
        if self.mlflow is not None:
            state |= {"mlflow_uri": self.mlflow.uri, "mlflow_run_id": self.mlflow.run_id}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def _trackers(self) -> list[MlflowTracker | TensorBoardTracker]:
        return [t for t in (self.mlflow, self.tensorboard) if t is not None]

    def begin(self) -> None:
        """The run's first row of this session is here: a run that did not resume starts
        afresh (opened now, long before the first checkpoint that a kill may follow)."""
        if not self.opened:
            self._open(None)

    def resume(self, step: int) -> None:
        """The run resumes after ``step``: continue the trackers' record from there."""
        self.close()
        self._open(step)

    def log(self, step: int, tables: Sequence[Table]) -> None:
        """The checkpoint of ``step`` is written: send its tables' rows not yet sent."""
        if not self.opened:
            self._open(None)
        points = [p for rows, key, series in tables
                  for p in metric_points(rows, key, series, self.sent, step)]
        if points and self.tensorboard is not None:
            self.tensorboard.log(points)
        if self.mlflow is not None and self._unsure is not None:
            # sent once by a run killed before it could record so: not again
            low, high = self._unsure
            held = self.mlflow.already_logged([p for p in points if low < p[2] <= high])
            points = [p for p in points if (p[0], p[2]) not in held]
            self._unsure = None
        if points and self.mlflow is not None:
            self.mlflow.log(points)
        self.sent = max(self.sent, step)
        self._save_state()

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run ended: its summary's numbers, then the trackers end their record."""
        if not self.opened:
            self._open(None)
        points = summary_points(summary, self.sent)
        for tracker in self._trackers():
            if points:
                tracker.log(points)
            tracker.finish()

    def close(self) -> None:
        """Release the trackers (a stopped run; a resumed one opens them again)."""
        for tracker in self._trackers():
            tracker.close()


def _default_mlflow_uri(run_dir: Location) -> str:
    """A local file store in ``<output_dir>/mlruns``, beside the runs."""
    output_dir = run_dir.parent
    if not output_dir.is_local:
        raise ConfigError(f"tracking.mlflow.uri: give one (the default, a file store in "
                          f"<output_dir>/{DEFAULT_MLFLOW_FOLDER}, needs a local output_dir; "
                          f"the runs go to {output_dir})")
    return (output_dir.path / DEFAULT_MLFLOW_FOLDER).resolve().as_uri()
