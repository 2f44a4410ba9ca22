"""Resumable tables of federated runs: one cell a fresh process, one JSON line a cell.

A table (robustness, privacy–utility) is a grid of full training runs. Each cell runs in a
child process with an embedded Ray cluster, so one cell's crash or leak cannot touch the next,
and appends its result to a JSONL file; cells already in the file are skipped, so a table that
was interrupted resumes where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_cell(raw: dict[str, Any]) -> dict[str, Any]:
    """Train one cell's config in this process and return its result row."""
    from experiments.config import parse_config
    from experiments.federated import train_federated

    cfg = parse_config(raw)
    t0 = time.perf_counter()
    summary = train_federated(cfg, resume=False, echo=lambda _: None)
    row = {"accuracy": summary["accuracy"], "ci95": summary["ci95"],
           "rounds": summary["train_steps"], "train_time_s": summary["train_time_s"],
           "wall_s": round(time.perf_counter() - t0, 1)}
    if summary.get("privacy"):
        row["epsilon"] = summary["privacy"].get("epsilon")
    return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_in_child(module: str, raw: dict[str, Any]) -> dict[str, Any] | str:
    """Run ``python -m MODULE --cell CONFIG``; its result row, or the error text."""
    proc = subprocess.run([sys.executable, "-m", module, "--cell", json.dumps(raw)],
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"exit {proc.returncode}: {proc.stderr[-800:]}"
    return json.loads(lines[-1])


def fill_table(module: str, out: Path, cells: dict[str, tuple[dict[str, Any], dict[str, Any]]],
               describe: Callable[[dict[str, Any]], str]) -> None:
    """Run every cell (name -> (key fields, config)) not yet in ``out``, appending its row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [row for row in read_rows(out)]
    for name, (key, raw) in cells.items():
        if any(all(row.get(k) == v for k, v in key.items()) for row in done):
            continue
        result = run_in_child(module, raw)
        if isinstance(result, str):
            print(f"{name}: failed ({result})", file=sys.stderr, flush=True)
            continue
        row = {**key, **result}
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.append(row)
        print(f"{name}: {describe(row)}", flush=True)
