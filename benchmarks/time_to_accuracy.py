"""Time to accuracy under system heterogeneity: four ways to run rounds over slow and absent sites.

Federated second-order MAML on Omniglot 5-way 1-shot (the strided 64-filter conv net, 15
queries), ``--sites`` sites holding whole alphabets, their speeds spread geometrically from 1 to
``1 / --spread`` (a duty cycle on each site's compute: the topology's ``speed``), each away a
``--unavailability`` share of the time (seeded exponential on/off periods, ``--mean-on-s``).
Every cell trains for the same ``--budget-s`` seconds of the run's clock (counted training
time: neither the start of the cluster nor checkpoints nor evaluations count), one mode a
cell:

``wait_for_all``
    synchronous rounds, the cloud waits for every available site (meta-gradients, one local
    step);
``deadline``
    the same, but a round closes after ``deadline_s`` and later updates are dropped;
    ``deadline_s`` is ``--deadline-frac`` times the median round of the ``wait_for_all`` cell;
``budget_fednova``
    each site takes as many local meta-steps (SGD at ``--local-lr``) as fit in
    ``local_time_budget_s`` (``--budget-frac`` times that median round; at least one, at most
    ``--max-local-steps``), the cloud aggregates with FedNova;
``fedbuff``
    asynchronous rounds (FedBuff): sites train continuously, the cloud applies an update
    every ``--buffer-size`` results, each weighted ``1/sqrt(1 + staleness)``.

A round in which no update arrives (every site away, or still busy with a call the deadline
gave up on: the first round's warm-up can outlast many deadlines) is skipped and costs its
time; no number of them ends a cell (``max_missed_rounds`` is set out of reach).

Every checkpoint is kept (one a round or applied update). After training, in the cell's own
process and with the cluster shut down (so evaluation never slows a site), the model the cloud
held at each ``--eval-every-s`` seconds of the run's clock (the latest checkpoint at or before
it) is meta-tested on ``--eval-episodes`` episodes of the held-out test characters (the same
episodes for every point); the run's own final meta-test (``--final-episodes``) gives the
accuracy at the budget. Time to X % is the first evaluation point at or above X %, so it is
known to within ``--eval-every-s``.

Cells run in fresh processes through :mod:`benchmarks.cells` (one JSON line each; a table that
stopped resumes with the cells it lacks).

    python -m benchmarks.time_to_accuracy --out runs/tta/omniglot.jsonl
    python -m benchmarks.time_to_accuracy --table runs/tta/omniglot.jsonl --targets 0.9,0.95
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.cells import fill_table, read_rows

MODES = ("wait_for_all", "deadline", "budget_fednova", "fedbuff")


def site_speeds(sites: int, spread: float) -> list[float]:
    """Speeds from 1 (site-0) down to ``1 / spread`` (the last site), geometrically."""
    if sites == 1:
        return [1.0]
    return [round(spread ** (-i / (sites - 1)), 4) for i in range(sites)]


def topology(args: argparse.Namespace) -> dict[str, Any]:
    """``--sites`` sites of different speeds, each away ``--unavailability`` of the time."""
    u = args.unavailability
    availability = (None if u == 0 else
                    {"mean_on_s": args.mean_on_s, "mean_off_s": args.mean_on_s * u / (1 - u)})
    return {"sites": [{"name": f"site-{i}", "speed": speed,
                       **({"availability": availability} if availability else {})}
                      for i, speed in enumerate(site_speeds(args.sites, args.spread))]}


def mode_section(mode: str, args: argparse.Namespace, round_s: float | None) -> dict[str, Any]:
    """What ``mode`` changes in the ``federated`` section; ``round_s``: the median round of
    the ``wait_for_all`` cell, which the deadline and the local-work budget are cut from."""
    if mode == "wait_for_all":
        return {}
    if mode == "fedbuff":
        return {"mode": "async", "buffer_size": args.buffer_size}
    assert round_s is not None, "the wait_for_all cell runs first"
    if mode == "deadline":
        return {"deadline_s": round(args.deadline_frac * round_s, 3)}
    return {"local_time_budget_s": round(args.budget_frac * round_s, 3),
            "local_steps": args.max_local_steps, "local_lr": args.local_lr,
            "local_optimizer": "sgd", "aggregator": {"name": "fednova"}}


def cell_config(mode: str, args: argparse.Namespace, round_s: float | None) -> dict[str, Any]:
    tasks = args.tasks_per_site
    return {
        "name": f"tta-{mode}", "seed": args.seed, "output_dir": str(args.out.parent / "runs"),
        "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 15},
        "model": {"name": "omniglot_conv", "channels": 64, "pooling": "stride"},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 3},
        "train": {"meta_batch": args.sites * tasks, "steps": 1_000_000,
                  "time_budget_s": args.budget_s, "outer_lr": 0.002, "log_every": 50,
                  "checkpoint_every": 1},
        "eval": {"episodes": args.final_episodes},
        "federated": {"topology": topology(args), "tasks_per_site": tasks, "quorum": 1,
                      "max_missed_rounds": 1_000_000, "personalize_episodes": 0,
                      **mode_section(mode, args, round_s)},
    }


# --------------------------------------------------------------------------- one cell

def clock_curve(run_dir: Path, cfg: Any, every_s: float, episodes: int) -> list[list[float]]:
    """``[clock_s, step, accuracy, ci95]`` of the model held at each ``every_s`` of the run's
    clock (the latest checkpoint at or before it; step 0 is the initial model)."""
    from experiments.train import meta_test
    from metalearn.checkpoint import list_checkpoints, load_checkpoint
    from metalearn.from_config import algorithm_from_config

    algorithm = algorithm_from_config(cfg.to_dict())
    clocks = {step: float(load_checkpoint(run_dir, step)["elapsed_s"])
              for step in list_checkpoints(run_dir)}
    budget = cfg.train.time_budget_s
    curve: list[list[float]] = []
    points = [every_s * i for i in range(1, int(budget // every_s) + 1)]
    for at in points:
        held = [s for s, c in clocks.items() if c <= at]
        step = max(held, default=0)
        if curve and curve[-1][1] == step:  # the same model: the same result
            curve.append([at, step, curve[-1][2], curve[-1][3]])
            continue
        params = (algorithm_from_config(cfg.to_dict()).init_params() if step == 0
                  else load_checkpoint(run_dir, step)["params"])
        result = meta_test(cfg, algorithm, params, episodes)
        curve.append([at, step, float(result["accuracy"]), float(result["ci95"])])
        print(f"  {at:.0f} s (update {step}): {100 * result['accuracy']:.1f} %", flush=True,
              file=sys.stderr)
    return curve


def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Train one mode, then evaluate its clock curve; the result row."""
    from experiments.config import parse_config
    from experiments.federated import train_federated

    cfg = parse_config(payload["config"])
    summary = train_federated(cfg, resume=False, echo=lambda _: None)
    rounds = pd.read_parquet(cfg.run_dir / "metrics.parquet")
    sites = pd.read_parquet(cfg.run_dir / "sites.parquet")
    durations = rounds["time_s"].diff().fillna(rounds["time_s"].iloc[0])
    status = sites["status"].value_counts().to_dict()
    curve = clock_curve(cfg.run_dir, cfg, payload["eval_every_s"], payload["eval_episodes"])
    return {"accuracy": summary["accuracy"], "ci95": summary["ci95"],
            "rounds": int(summary["train_steps"]), "train_time_s": summary["train_time_s"],
            "median_round_s": float(statistics.median(durations)),
            "updates_per_round": float(len(sites[sites["status"] == "ok"]) / len(rounds)),
            "status": {str(k): int(v) for k, v in status.items()},
            "local_steps_mean": (float(sites["local_steps"].mean())
                                 if "local_steps" in sites else None),
            "settings": {k: v for k, v in payload["config"]["federated"].items()
                         if k in ("deadline_s", "local_time_budget_s", "local_steps",
                                  "local_lr", "buffer_size", "mode", "aggregator")},
            "curve": curve}


# --------------------------------------------------------------------------- the table

def time_to(curve: list[list[float]], target: float) -> float | None:
    return next((at for at, _, acc, _ in curve if acc >= target), None)


def table(path: Path, targets: list[float]) -> str:
    rows = {r["mode"]: r for r in read_rows(path)}
    base = rows.get("wait_for_all")
    head = ("| mode | settings | rounds (fedbuff: updates) | median round (s) | updates a round "
            + "".join(f"| time to {100 * t:g} % (s; × = wait_for_all's time / this) "
                      for t in targets)
            + f"| accuracy at {base['budget_s'] if base else '?'} s |")
    lines = [head, "|" + "---|" * (5 + len(targets) + 1)]
    for mode in MODES:
        r = rows.get(mode)
        if r is None:
            continue
        cells = []
        for t in targets:
            mine = time_to(r["curve"], t)
            ref = None if base is None else time_to(base["curve"], t)
            if mine is None:
                cells.append("not reached")
            elif ref and mode != "wait_for_all":
                cells.append(f"{mine:.0f} ({ref / mine:.2f}×)")
            else:
                cells.append(f"{mine:.0f}")
        settings = ", ".join(f"{k} {v if not isinstance(v, dict) else v['name']}"
                             for k, v in r["settings"].items()) or "–"
        lines.append(f"| {mode} | {settings} | {r['rounds']} | {r['median_round_s']:.2f} | "
                     f"{r['updates_per_round']:.2f} | " + " | ".join(cells)
                     + f" | {100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f} |")
    return "\n".join(lines)


def curves(path: Path) -> str:
    """Each mode's accuracy at every evaluation point (a markdown table)."""
    rows = {r["mode"]: r for r in read_rows(path)}
    present = [m for m in MODES if m in rows]
    if not present:
        return ""
    points = [p[0] for p in rows[present[0]]["curve"]]
    lines = ["| clock (s) | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for i, at in enumerate(points):
        lines.append(f"| {at:.0f} | " + " | ".join(
            f"{100 * rows[m]['curve'][i][2]:.1f} (u {rows[m]['curve'][i][1]})"
            if i < len(rows[m]["curve"]) else "–" for m in present) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sites", type=int, default=8)
    p.add_argument("--spread", type=float, default=4.0, help="fastest / slowest site speed")
    p.add_argument("--unavailability", type=float, default=0.2, help="share of time away")
    p.add_argument("--mean-on-s", type=float, default=120.0, help="mean on period (run clock)")
    p.add_argument("--tasks-per-site", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=3600.0, help="run clock per cell")
    p.add_argument("--eval-every-s", type=float, default=120.0)
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--final-episodes", type=int, default=600)
    p.add_argument("--deadline-frac", type=float, default=0.5)
    p.add_argument("--budget-frac", type=float, default=1.0)
    p.add_argument("--max-local-steps", type=int, default=8)
    p.add_argument("--local-lr", type=float, default=0.1)
    p.add_argument("--buffer-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="0.9,0.95", help="accuracies for the table")
    p.add_argument("--out", type=Path, default=Path("runs/tta/omniglot.jsonl"))
    p.add_argument("--table", type=Path, default=None, help="print the markdown tables")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one payload
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table, [float(t) for t in args.targets.split(",")]))
        print()
        print(curves(args.table))
        return 0
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return 0
    scale = {"sites": args.sites, "spread": args.spread, "unavailability": args.unavailability,
             "budget_s": args.budget_s, "tasks_per_site": args.tasks_per_site,
             "seed": args.seed}
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        base = [r for r in read_rows(args.out) if r["mode"] == "wait_for_all"
                and all(r.get(k) == v for k, v in scale.items())]
        round_s = base[0]["median_round_s"] if base else None
        if mode in ("deadline", "budget_fednova") and round_s is None:
            raise SystemExit(f"mode {mode} is cut from the wait_for_all cell's median round: "
                             "run wait_for_all first (it is first in --modes by default)")
        payload = {"config": cell_config(mode, args, round_s),
                   "eval_every_s": args.eval_every_s, "eval_episodes": args.eval_episodes}
        fill_table("benchmarks.time_to_accuracy", args.out,
                   {mode: ({"mode": mode, **scale}, payload)},
                   lambda row: f"{100 * row['accuracy']:.1f} % at the budget, "
                               f"{row['rounds']} updates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
