"""Byzantine robustness: meta-test accuracy for aggregation rule x attack, same budget per cell.

Federated MAML on Omniglot 5-way 1-shot with ``--sites`` sites, the last ``--attackers`` of
them malicious (the attack is configured in the topology, as a user would). Every cell runs in
a fresh process with an embedded Ray cluster and appends one JSON line to ``--out``; cells
already there are skipped, so an interrupted table resumes where it stopped.

    python -m benchmarks.robustness_table --sites 5 --attackers 1 --out runs/robustness/5x1.jsonl
    python -m benchmarks.robustness_table --table runs/robustness/5x1.jsonl   # markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.cells import fill_table, read_rows, run_cell

ATTACKS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "sign_flip": {"name": "sign_flip", "factor": 4.0},
    "scale": {"name": "scale", "factor": 10.0},
    "gaussian": {"name": "gaussian", "sigma": 1.0},
    "alie": {"name": "alie", "z": 1.0, "samples": 3},
    "label_flip": {"name": "label_flip"},
}


def rules(sites: int, attackers: int) -> dict[str, dict[str, Any]]:
    """The rules that can run with ``sites`` updates a round and ``f = attackers``."""
    f = max(1, attackers)
    out: dict[str, dict[str, Any]] = {
        "weighted_mean": {"name": "weighted_mean"},
        "median": {"name": "median"},
        "trimmed_mean": {"name": "trimmed_mean", "trim": round(f / sites + 1e-9, 3)},
        "krum": {"name": "krum", "f": f},
        "multi_krum": {"name": "multi_krum", "f": f},
    }
    if sites >= 4 * f + 3:
        out["bulyan"] = {"name": "bulyan", "f": f}
    return out


def cell_config(rule: dict[str, Any], attack: dict[str, Any] | None, *, sites: int,
                attackers: int, rounds: int, tasks: int, out_dir: str, name: str) -> dict:
    topology = [{"name": f"site-{i}"} for i in range(sites)]
    for site in topology[sites - attackers:]:
        if attack is not None:
            site["attack"] = dict(attack)
    return {
        "name": name, "seed": 0, "output_dir": out_dir,
        "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 15},
        "model": {"name": "omniglot_conv", "channels": 64, "pooling": "stride"},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 3},
        "train": {"meta_batch": sites * tasks, "steps": rounds, "outer_lr": 0.002,
                  "log_every": rounds, "checkpoint_every": rounds},
        "eval": {"episodes": 300},
        "federated": {"topology": {"sites": topology}, "tasks_per_site": tasks,
                      "quorum": sites, "aggregator": rule, "personalize_episodes": 0},
    }


def table(path: Path) -> str:
    rows = read_rows(path)
    rule_names = list(dict.fromkeys(r["rule"] for r in rows))
    attack_names = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    acc = {(r["rule"], r["attack"]): r for r in rows}
    lines = ["| rule | " + " | ".join(attack_names) + " |",
             "|---|" + "---|" * len(attack_names)]
    for rule in rule_names:
        cells = []
        for attack in attack_names:
            r = acc.get((rule, attack))
            cells.append("–" if r is None else
                         f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--attackers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--tasks", type=int, default=4, help="tasks per site and round")
    p.add_argument("--rules", default=None, help="comma list (default: all that fit)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma list")
    p.add_argument("--out", type=Path, default=Path("runs/robustness/table.jsonl"))
    p.add_argument("--table", type=Path, default=None, help="print the markdown table of a file")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one JSON config
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return 0
    chosen = rules(args.sites, args.attackers)
    if args.rules:
        chosen = {k: v for k, v in chosen.items() if k in args.rules.split(",")}
    grid = {}
    for attack_name in args.attacks.split(","):
        for rule_name, rule in chosen.items():
            name = f"rob_{args.sites}x{args.attackers}_{rule_name}_{attack_name}"
            key = {"rule": rule_name, "attack": attack_name, "sites": args.sites,
                   "attackers": args.attackers, "tasks_per_site": args.tasks}
            grid[name] = (key, cell_config(
                rule, ATTACKS[attack_name], sites=args.sites, attackers=args.attackers,
                rounds=args.rounds, tasks=args.tasks, out_dir=str(args.out.parent / "runs"),
                name=name))
    fill_table("benchmarks.robustness_table", args.out, grid,
               lambda row: f"{100 * row['accuracy']:.2f}% ({row['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
