"""The run folder: resolved config, metrics tables, summary. One writer per run.

The folder is in run storage (:mod:`metalearn.storage`): a local folder, or a URI such as
``s3://bucket/runs/NAME``; every file is made in memory and written whole.

Metrics accumulate as rows in memory and are flushed to parquet (atomically, the whole table)
just before every checkpoint is written, so a table on disk holds at least the rows up to the
latest checkpoint (even for a run killed between the two), and a resumed run cuts it back to
that checkpoint and continues it instead of duplicating or losing rows. A centralized run has
one table (``metrics.parquet``, a row per step); a federated run adds a row per site and round
(``sites.parquet``), and :func:`round_row` and :func:`federated_summary` say what a round's row
and the summary's federated part hold. Trackers (MLflow, TensorBoard: :mod:`experiments.tracking`)
get the tables' rows after each checkpoint is written.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from experiments.tracking import Tracking
from metalearn.storage import PathLike, location

if TYPE_CHECKING:  # typing only: the run log itself needs nothing of Ray
    from actors.federation import RoundOutcome
    from cluster.topology import Topology
    from experiments.config import FederatedConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.parquet"
SITES_FILE = "sites.parquet"
SUMMARY_FILE = "summary.json"


class RowTable:
    """Rows of one table kept in memory, persisted whole (atomically) as one parquet file.
    ``key`` is the column that numbers the rows (a step or round), ``series`` the one that
    names a series of rows in a table of several (``site``), as trackers name them."""

    def __init__(self, path: PathLike, key: str = "step", series: str | None = None) -> None:
        self.path = location(path)
        self.key = key
        self.series = series
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def truncate_to(self, step: int, key: str | None = None) -> None:
        """Reload the table on disk and keep rows up to ``step`` of ``key`` (default: the
        table's) (resume after a crash)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        df = pd.read_parquet(io.BytesIO(data))
        self.rows = df[df[key or self.key] <= step].to_dict("records")

    def flush(self) -> None:
        if not self.rows:
            return
        buf = io.BytesIO()
        pd.DataFrame(self.rows).to_parquet(buf, index=False)
        self.path.write_bytes(buf.getvalue())


class RunLog(RowTable):
    """A run's folder: its config, its metrics table (a row per step or round), its summary;
    and the one place where a run's rows reach the trackers its config asks for
    (:mod:`experiments.tracking`): the tables it made are sent after each checkpoint."""

    def __init__(self, run_dir: PathLike) -> None:
        self.run_dir = location(run_dir)
        self.run_dir.mkdir()
        super().__init__(self.run_dir / METRICS_FILE)
        self.tables: list[RowTable] = [self]
        self.tracking: Tracking | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        """``config.yaml``; and the trackers of its ``tracking`` section, started now so that
        a missing package is an error before any work."""
        text = yaml.safe_dump(config, sort_keys=False)
        (self.run_dir / CONFIG_FILE).write_text(text)
        self.tracking = Tracking.start(config, self.run_dir)

    def site_table(self) -> RowTable:
        """The federated run's ``sites.parquet`` (a row per site and round), tracked too."""
        table = RowTable(self.run_dir / SITES_FILE, key="round", series="site")
        self.tables.append(table)
        return table

    def truncate_to(self, step: int, key: str | None = None) -> None:
        super().truncate_to(step, key)
        if self.tracking is not None:
            self.tracking.resume(step)

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        if self.tracking is not None:
            self.tracking.begin()

    def committed(self, step: int) -> None:
        """The checkpoint of ``step`` is written (after :meth:`flush`): the trackers get the
        rows it commits."""
        if self.tracking is not None:
            self.tracking.log(step, [(t.rows, t.key, t.series) for t in self.tables])

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2, sort_keys=True)
        (self.run_dir / SUMMARY_FILE).write_text(text + "\n")
        if self.tracking is not None:
            self.tracking.finish(summary)

    def close(self) -> None:
        """Release the trackers (at the end of a run, finished or not)."""
        if self.tracking is not None:
            self.tracking.close()


def read_run_config(run_dir: PathLike) -> dict[str, Any]:
    try:
        text = (location(run_dir) / CONFIG_FILE).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir} is not a run folder: {CONFIG_FILE} is missing"
                                ) from None
    return yaml.safe_load(text)


def headline(result: Mapping[str, Any]) -> str:
    """A meta-test result in one line: accuracy ± ci95, or MSE by adaptation steps."""
    if "accuracy" in result:
        return f"accuracy {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}"
    return "mse " + ", ".join(f"{k} steps: {v:.3f}" for k, v in result["mse"].items())


# --------------------------------------------------------------------------- federated runs

def round_row(round_idx: int, outcome: RoundOutcome, param_bytes: int,
              site_names: Sequence[str], wall_s: float) -> dict[str, Any]:
    """The per-round metrics row: timings, traffic, who arrived, task-weighted metrics.

    ``participants`` counts the sites chosen for the round (among those available: ``away``
    counts the sites off their availability schedule, not asked), ``called`` those actually sent
    the parameters (not a site still busy with a late call, nor one that is down).
    ``wall_s`` is the whole round as the driver lives it, from packing the parameters to the
    end of the outer step (``calls_s``: the calls alone); ``overhead_s`` is that
    beyond the slowest arrived site's compute: packing and ``ray.put``, dispatch, transfers,
    reading the results, aggregation, the outer step, and any wait for sites that turned out
    late. ``dispatch_s_max`` / ``reply_s_max``: the longest delivery of a call (sent by the
    driver to started on the site) and of a reply (finished on the site to seen by the driver).
    ``compute_wait_s_max``: the longest wait, inside a site's ``compute_s``, between the call
    starting and the site's compute thread getting a CPU (sites sharing a node's cores).
    ``bytes_up`` counts what the arrived updates weighed on the wire (compressed, with
    ``federated.compression``), ``bytes_up_ratio`` that over their float32 size.
    ``local_steps_min`` / ``_max``: the fewest and most local meta-steps behind an arrived
    update (they differ when ``local_time_budget_s`` sizes the work to each site).

    Under secure aggregation a row per participant may also have status ``aborted`` (the round
    was aborted before its call), ``bytes_up`` counts the masked inputs, and the driver adds the
    ``secagg_*`` columns (:meth:`actors.secure_round.SecureRound.fields`).
    """
    ok = [s for s in outcome.sites if s["status"] == "ok"]
    compute = [s["compute_s"] for s in ok]
    away = outcome.count("away")  # off their availability schedule: not asked
    called = len(outcome.sites) - away - outcome.count("busy") - outcome.count("down")
    row: dict[str, Any] = {
        "round": round_idx, "step": round_idx, "wall_s": wall_s, "calls_s": outcome.wall_s,
        "compute_s_max": max(compute, default=float("nan")),
        "compute_s_mean": float(np.mean(compute)) if compute else float("nan"),
        "overhead_s": wall_s - max(compute, default=0.0),
        "dispatch_s_max": max((s["dispatch_s"] for s in ok), default=float("nan")),
        "reply_s_max": max((s["reply_s"] for s in ok), default=float("nan")),
        "compute_wait_s_max": max((s["compute_wait_s"] for s in ok), default=float("nan")),
        "bytes_down": param_bytes * called, "bytes_up": sum(s["bytes_up"] for s in ok),
        "participants": len(outcome.sites) - away, "called": called, "arrived": len(ok),
        "away": away,
        "late": outcome.count("late"), "failed": outcome.count("failed"),
        "busy": outcome.count("busy"), "down": outcome.count("down"),
        "round_tasks": sum(s["num_tasks"] for s in ok),
    }
    steps = [s.get("local_steps", 1) for s in ok]
    row["local_steps_min"] = min(steps, default=0)
    row["local_steps_max"] = max(steps, default=0)
    # what the arrived updates cost against float32 (below 1 with compression)
    row["bytes_up_ratio"] = (row["bytes_up"] / (param_bytes * len(ok)) if ok and param_bytes
                             else float("nan"))
    total = row["round_tasks"]
    for key in ("loss_before", "loss_after", "acc_before", "acc_after"):
        vals = [(s[key], s["num_tasks"]) for s in ok if key in s]
        if vals and total:
            row[key] = sum(v * n for v, n in vals) / sum(n for _, n in vals)
    by_site = {s["site"]: s.get("compute_s", float("nan")) for s in outcome.sites}
    row.update({f"compute_s.{s}": by_site.get(s, float("nan")) for s in site_names})
    return row


def round_line(row: Mapping[str, Any], rounds: int, trouble: Sequence[str]) -> str:
    """A round's row as one console line (metrics, timing, and what went wrong)."""
    metrics = " ".join(f"{k} {row[k]:.3f}" for k in ("loss_after", "acc_after")
                       if k in row and row[k] == row[k])
    skipped = ""
    if row["skipped"]:
        abort = row.get("secagg_abort")
        skipped = f" SKIPPED (secure aggregation: {abort})" if abort else " SKIPPED (below quorum)"
    return (f"round {row['round']}/{rounds} arrived {row['arrived']}/{row['called']} "
            f"{metrics} wall {row['wall_s']:.2f}s overhead {row['overhead_s']:.3f}s"
            + (f" [{', '.join(trouble)}]" if trouble else "") + skipped)


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
        "local_steps": fed.local_steps, "aggregator": fed.aggregator.model_dump(mode="json"),
        "secure_aggregation": (None if fed.secure_aggregation is None
                               else fed.secure_aggregation.model_dump(mode="json")),
        "compression": (None if fed.compression is None
                        else fed.compression.model_dump(mode="json")),
        "site_fraction": fed.site_fraction, "quorum": fed.quorum,
        "rounds": len(df), "skipped_rounds": int(df["skipped"].sum()) if len(df) else 0,
        "late": count("late"), "failed": count("failed"), "busy": count("busy"),
        "down": count("down"), "away": count("away"),
        "median_round_s": float(df["wall_s"].median()) if len(df) else None,
        "median_overhead_s": float(df["overhead_s"].median()) if len(df) else None,
        "bytes_down": int(df["bytes_down"].sum()) if len(df) else 0,
        "bytes_up": int(df["bytes_up"].sum()) if len(df) else 0,
        "personalization": personal,
    }
