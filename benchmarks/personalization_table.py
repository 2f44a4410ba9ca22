"""Per-site held-out accuracy of the global meta-model against each site's own model.

Runs ``federated_omniglot_4sites`` (second-order MAML, 5-way 1-shot) on 4 uniform sites under
each partition (whole alphabets; Dirichlet label skew with alpha 0.1 and 1.0) for the same
time budget, each run making its site models at the end (``federated.personalize_steps``),
then prints one markdown table from the runs' ``summary.json``: per site, the meta-model and
the site model, each after test-time adaptation on the same held-out episodes.

    python -m benchmarks.personalization_table --out runs/personal --budget-s 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PARTITIONS = {
    "alphabet": ["federated.data.partitioner={name: alphabet}"],
    "dirichlet-0.1": ["federated.data.partitioner={name: dirichlet, alpha: 0.1}"],
    "dirichlet-1.0": ["federated.data.partitioner={name: dirichlet, alpha: 1.0}"],
}


def run(out: Path, name: str, extra: list[str], budget_s: float, episodes: int) -> Path:
    sets = [f"name={name}", f"output_dir={out}", "federated.topology=4",
            f"train.time_budget_s={budget_s}", f"eval.episodes={episodes}",
            f"federated.personalize_episodes={episodes}", "train.checkpoint_every=1000",
            *extra]
    cmd = [sys.executable, "-m", "experiments.federated", "federated_omniglot_4sites", "--fresh",
           *(a for s in sets for a in ("--set", s))]
    subprocess.run(cmd, check=True)
    return out / name


def table(runs: dict[str, Path]) -> str:
    lines = ["| partition | site | meta-model, after adaptation | "
             "site model, after adaptation | difference (points) |",
             "|---|---|---|---|---|"]
    for part, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        for row in summary["federated"]["personalization"]:
            if "error" in row:
                lines.append(f"| {part} | {row['site']} | failed: {row['error'][:60]} | | |")
                continue
            g, s = 100 * row["after_accuracy"], 100 * row["site_after_accuracy"]
            lines.append(f"| {part} | {row['site']} | {g:.1f} ± {100 * row['after_ci95']:.1f}"
                         f" | {s:.1f} ± {100 * row['site_after_ci95']:.1f} | {s - g:+.1f} |")
        lines.append(f"| {part} | meta-test | {100 * summary['accuracy']:.1f} ± "
                     f"{100 * summary['ci95']:.1f} ({summary['train_steps']} rounds) | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/personal")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--only", action="append", default=[], choices=list(PARTITIONS))
    args = p.parse_args()
    out = Path(args.out).resolve()
    runs = {}
    for part, extra in PARTITIONS.items():
        if args.only and part not in args.only:
            continue
        runs[part] = run(out, f"personal-{part}", extra, args.budget_s, args.episodes)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
