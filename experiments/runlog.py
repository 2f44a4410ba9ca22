"""The run folder: resolved config, metrics table, summary. One writer per run.

Metrics accumulate as rows in memory and are flushed to ``metrics.parquet`` (atomically, the
whole table) at every checkpoint, so the table on disk always matches a checkpoint and a resumed
run continues it instead of duplicating or losing rows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from metalearn.checkpoint import atomic_write_bytes

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"


class RunLog:
    """Rows of metrics for one run, persisted in its folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def write_config(self, config: dict[str, Any]) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write_bytes(self.run_dir / CONFIG_FILE, text.encode())

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def truncate_to(self, step: int, key: str = "step") -> None:
        """Reload the table on disk and keep rows up to ``step`` (resume after a crash)."""
        path = self.run_dir / METRICS_FILE
        if path.exists():
            df = pd.read_parquet(path)
            self.rows = df[df[key] <= step].to_dict("records")

    def flush(self) -> None:
        if not self.rows:
            return
        buf = io.BytesIO()
        pd.DataFrame(self.rows).to_parquet(buf, index=False)
        atomic_write_bytes(self.run_dir / METRICS_FILE, buf.getvalue())

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2, sort_keys=True)
        atomic_write_bytes(self.run_dir / SUMMARY_FILE, (text + "\n").encode())


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {CONFIG_FILE} is missing")
    return yaml.safe_load(path.read_text())
