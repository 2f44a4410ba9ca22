"""Compressed updates: bytes per round and meta-test accuracy per codec, same budget per cell.

Federated MAML on sinusoid regression (the bundled ``federated_sinusoid`` setup: 4 non-IID
sites) or Omniglot 5-way 1-shot, with ``local_steps`` local meta-steps (deltas). Every cell
runs ``python -m experiments.federated`` in a fresh process with an embedded Ray cluster and
appends one JSON line to ``--out``; cells already there are skipped, so an interrupted table
resumes where it stopped.

    python -m benchmarks.compression_table --rounds 200 --out runs/compression/sinusoid.jsonl
    python -m benchmarks.compression_table --table runs/compression/sinusoid.jsonl  # markdown
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

CODECS: dict[str, dict[str, Any] | None] = {
    "float32": None,
    "fp16": {"codec": "fp16"},
    "int8 (per tensor)": {"codec": "int8", "block": 0},
    "int8 (block 64)": {"codec": "int8", "block": 64},
    "topk 5% + error feedback": {"codec": "topk", "fraction": 0.05, "error_feedback": True},
    "topk 5%, no feedback": {"codec": "topk", "fraction": 0.05, "error_feedback": False},
}


def cell_config(dataset: str, codec: dict[str, Any] | None, *, rounds: int, local_steps: int,
                out_dir: str, name: str, seed: int) -> dict[str, Any]:
    federated: dict[str, Any] = {"topology": {"sites": 4, "devices": 25},
                                 "devices_per_round": 4, "local_steps": local_steps,
                                 "local_lr": 0.01 if dataset == "sinusoid" else 0.2,
                                 "personalize_episodes": 0}
    if codec is not None:
        federated["compression"] = dict(codec)
    common = {"name": name, "seed": seed, "output_dir": out_dir, "federated": federated}
    if dataset == "sinusoid":
        return {**common,
                "data": {"dataset": "sinusoid", "shots": 10, "queries": 10},
                "model": {"name": "sinusoid_mlp", "hidden": 40},
                "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1,
                              "test_steps": 10},
                "train": {"meta_batch": 32, "steps": rounds, "outer_lr": 0.001,
                          "log_every": rounds, "checkpoint_every": rounds},
                "eval": {"episodes": 600, "steps_list": [0, 1, 10], "batch": 50}}
    return {**common,
            "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 15},
            "model": {"name": "omniglot_conv", "channels": 64, "pooling": "stride"},
            "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 3},
            "train": {"meta_batch": 16, "steps": rounds, "outer_lr": 0.002,
                      "log_every": rounds, "checkpoint_every": rounds},
            "eval": {"episodes": 300}}


def run_cell(label: str, codec: dict[str, Any] | None, args: argparse.Namespace) -> dict:
    name = f"compression-{args.dataset}-{label.replace(' ', '_').replace('%', 'pc')}"
    for ch in "(),+":
        name = name.replace(ch, "")
    raw = cell_config(args.dataset, codec, rounds=args.rounds, local_steps=args.local_steps,
                      out_dir=args.runs, name=name, seed=args.seed)
    path = Path(args.runs) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.federated", str(path), "--fresh"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"codec": label, "error": proc.stderr[-2000:] or proc.stdout[-2000:]}
    run = Path(args.runs) / name
    summary = json.loads((run / "summary.json").read_text())
    rows = pd.read_parquet(run / "metrics.parquet")
    out = {"codec": label, "rounds": len(rows), "wall_s": round(wall, 1),
           "bytes_up_per_round": float(rows["bytes_up"].mean()),
           "bytes_up_ratio": float(rows["bytes_up_ratio"].mean()),
           "bytes_down_per_round": float(rows["bytes_down"].mean())}
    if "accuracy" in summary:
        out.update(accuracy=summary["accuracy"], ci95=summary["ci95"])
    else:
        out.update({f"mse_{k}": v for k, v in summary["mse"].items()})
    return out


def table(path: Path) -> str:
    cells = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metric = [k for k in cells[0] if k.startswith(("mse_", "accuracy"))]
    head = ["codec", "bytes up / round", "vs float32", *metric]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['codec']} | failed: {c['error'][-80:]} |")
            continue
        vals = [f"{c['bytes_up_per_round']:,.0f}", f"{c['bytes_up_ratio']:.3f}",
                *(f"{c[k]:.3f}" for k in metric)]
        lines.append(f"| {c['codec']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("sinusoid", "omniglot"), default="sinusoid")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codecs", nargs="*", default=list(CODECS), help="labels of CODECS")
    parser.add_argument("--runs", default="runs/compression")
    parser.add_argument("--out", default="runs/compression/table.jsonl")
    parser.add_argument("--table", type=Path, help="print the markdown table of this file")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = ({json.loads(line)["codec"] for line in out.read_text().splitlines() if line.strip()}
            if out.exists() else set())
    for label in args.codecs:
        if label in done:
            continue
        cell = run_cell(label, CODECS[label], args)
        with out.open("a") as f:
            f.write(json.dumps(cell) + "\n")
        print(json.dumps(cell), flush=True)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
