"""Summarise accuracy runs: the final meta-test result and the curve against time and steps.

Usage: python -m benchmarks.accuracy_table RUNS_ROOT  (the output_dir of benchmarks/accuracy.sh)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main(root: str) -> None:
    print("| run | meta-test | episodes | train steps | train time (s) |")
    print("|---|---|---|---|---|")
    curves = []
    for summary_path in sorted(Path(root).glob("*/summary.json")):
        s = json.loads(summary_path.read_text())
        if "accuracy" in s:
            result = f"{100 * s['accuracy']:.2f} % ± {100 * s['ci95']:.2f}"
        else:
            mse = sorted((int(k), v) for k, v in s["mse"].items())
            result = "MSE by steps " + " / ".join(f"{k}: {v:.3f}" for k, v in mse)
        print(f"| {s['name']} | {result} | {s['episodes']} | {s['train_steps']} | "
              f"{s['train_time_s']:.0f} |")
        metrics = pd.read_parquet(summary_path.parent / "metrics.parquet")
        if "test_accuracy" in metrics:
            curve = metrics.dropna(subset=["test_accuracy"])[["step", "time_s", "test_accuracy"]]
            curves.append((s["name"], curve))
    for name, curve in curves:
        print(f"\n{name}: meta-test accuracy during training (intermediate evaluations)\n")
        print("| step | time (s) | accuracy |")
        print("|---|---|---|")
        for row in curve.itertuples():
            print(f"| {row.step} | {row.time_s:.0f} | {100 * row.test_accuracy:.1f} % |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/accuracy")
