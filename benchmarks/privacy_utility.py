"""Privacy–utility: meta-test accuracy against epsilon, devices as the unit of privacy.

Federated second-order MAML on Omniglot 5-way 1-shot, 4 sites (whole alphabets each) of
``--devices`` virtual devices; every round each device takes part with probability ``--rate``
(Poisson), draws one task of its own, and its meta-gradient is clipped at its site (adaptive
clipping at the median norm) before the site sends the sum. For each target epsilon at
``delta``, the noise multiplier is the smallest that keeps ``--rounds`` rounds within it, found
by ``dp_accounting.calibrate_dp_mechanism`` over the very event the run's accountant composes;
the run then reports the epsilon it spent. The ``none`` cell is the same run without DP.

    python -m benchmarks.privacy_utility --out runs/privacy/curve.jsonl
    python -m benchmarks.privacy_utility --table runs/privacy/curve.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting import rdp

from benchmarks.cells import fill_table, read_rows, run_cell
from privacy.accounting import RoundSampling, effective_noise_multiplier, round_event

SITES = 4


def vote_noise_std(expected_units: float) -> float:
    """The adaptive clip's count noise, as the config's description advises (units / 20)."""
    return expected_units / 20.0


def calibrate(epsilon: float, delta: float, rate: float, rounds: int, devices: int) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within ``epsilon``."""
    sampling = RoundSampling("poisson", devices, rate=rate)
    votes = vote_noise_std(rate * devices * SITES)

    def event(z: float) -> dp_accounting.DpEvent:
        one = round_event(sampling, effective_noise_multiplier(z, votes))
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(), event, epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(0.3, 50.0)))


def cell_config(epsilon: float | None, *, delta: float, rate: float, rounds: int, devices: int,
                out_dir: str, name: str) -> dict[str, Any]:
    per_round = max(1, round(rate * devices))
    fed: dict[str, Any] = {
        "topology": {"sites": SITES, "devices": devices},
        "tasks_per_site": 2 * per_round, "devices_per_round": per_round, "quorum": SITES,
        "personalize_episodes": 0,
    }
    if epsilon is not None:
        z = calibrate(epsilon, delta, rate, rounds, devices)
        fed["privacy"] = {
            "unit": "device", "clip_norm": 1.0,
            "noise_multiplier": math.ceil(z * 1e4) / 1e4,  # rounded up: within the target
            "delta": delta, "sampling": "poisson",
            "adaptive_clip": {"target_quantile": 0.5, "clip_lr": 0.2,
                              "count_noise_std": vote_noise_std(rate * devices * SITES)},
        }
    return {
        "name": name, "seed": 0, "output_dir": out_dir,
        "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 15},
        "model": {"name": "omniglot_conv", "channels": 64, "pooling": "stride"},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 3},
        "train": {"meta_batch": SITES * per_round, "steps": rounds, "outer_lr": 0.002,
                  "log_every": rounds, "checkpoint_every": rounds},
        "eval": {"episodes": 300},
        "federated": fed,
    }


def table(path: Path) -> str:
    lines = ["| target ε | ε spent (δ) | noise multiplier σ | clip C (initial) | q | rounds "
             "| accuracy |", "|---|---|---|---|---|---|---|"]
    for r in read_rows(path):
        eps = r.get("epsilon")
        spent = "–" if eps is None else f"{eps:.2f} ({r['delta']:g})"
        lines.append(
            f"| {r['target'] or 'no DP'} | {spent} | "
            f"{r.get('sigma') or '–'} | {1.0 if r.get('sigma') else '–'} | {r['rate']:g} | "
            f"{r['rounds']} | {100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilons", default="none,8,3,1", help="comma list; none = without DP")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--devices", type=int, default=500, help="devices per site")
    p.add_argument("--rate", type=float, default=0.05, help="Poisson rate of a device a round")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("runs/privacy/curve.jsonl"))
    p.add_argument("--table", type=Path, default=None, help="print the markdown table of a file")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one JSON config
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return 0
    grid = {}
    for text in args.epsilons.split(","):
        target = None if text == "none" else float(text)
        name = f"dp_{text}_{args.devices}x{SITES}_q{args.rate:g}_r{args.rounds}"
        raw = cell_config(target, delta=args.delta, rate=args.rate, rounds=args.rounds,
                          devices=args.devices, out_dir=str(args.out.parent / "runs"), name=name)
        privacy = raw["federated"].get("privacy")
        key = {"target": target, "delta": args.delta, "devices": args.devices,
               "rate": args.rate, "rounds": args.rounds,
               "sigma": privacy["noise_multiplier"] if privacy else None}
        grid[name] = (key, raw)
    fill_table("benchmarks.privacy_utility", args.out, grid,
               lambda row: f"{100 * row['accuracy']:.2f}% eps {row.get('epsilon')} "
                           f"({row['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
