"""Meta-test accuracy against training steps and time, from a run folder's saved checkpoints.

    .venv/bin/python -m benchmarks.checkpoint_curve RUN_DIR [--episodes 600] [--every 1000]
        [--steps 1000,8000] [--set eval.steps=10]

Training's own intermediate evaluations use few episodes (``train.eval_episodes``); this
re-evaluates chosen checkpoints on the full meta-test protocol (the same episodes for every
checkpoint: the config's eval seed), so the curve and "the budget that reaches X %" rest on
600-episode means with 95 % intervals. Train time per step comes from ``metrics.parquet``.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from experiments.config import apply_overrides, parse_config
from experiments.runlog import read_run_config
from experiments.train import meta_test
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config


def saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--every", type=int, default=1000, help="evaluate steps divisible by this "
                   "(and the last saved one)")
    p.add_argument("--steps", default="", help="comma list of checkpoint steps (instead of "
                   "--every)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate differently from the run's config, e.g. --set eval.steps=10")
    args = p.parse_args(argv)
    cfg = parse_config(apply_overrides(read_run_config(args.run_dir), args.set),
                       str(args.run_dir))
    algorithm = algorithm_from_config(cfg.to_dict())
    steps = saved_steps(args.run_dir)
    if not steps:
        raise SystemExit(f"{args.run_dir} has no saved checkpoints")
    if args.steps:
        wanted = [int(x) for x in args.steps.split(",") if x.strip()]
        missing = sorted(set(wanted) - set(steps))
        if missing:
            raise SystemExit(f"{args.run_dir} has no checkpoint for steps {missing}")
        chosen = wanted
    else:
        chosen = [s for s in steps if s % args.every == 0]
        if steps[-1] not in chosen:
            chosen.append(steps[-1])
    metrics = pd.read_parquet(args.run_dir / "metrics.parquet").set_index("step")
    test_steps = algorithm.test_steps if cfg.eval.steps is None else cfg.eval.steps
    print(f"test-time adaptation: {test_steps} steps", file=sys.stderr)
    print(f"| step | train time (s) | meta-test accuracy ({args.episodes} episodes, 95 % CI) |")
    print("|---|---|---|")
    for step in chosen:
        t0 = time.perf_counter()
        params = load_checkpoint(args.run_dir, step)["params"]
        result = meta_test(cfg, algorithm, params, args.episodes)
        train_s = float(metrics.loc[step, "time_s"]) if step in metrics.index else float("nan")
        print(f"| {step} | {train_s:.0f} | {100 * result['accuracy']:.2f} % "
              f"± {100 * result['ci95']:.2f} |", flush=True)
        print(f"  (evaluated in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
