#!/usr/bin/env bash
# Federated (4 non-IID sites) vs centralized MAML, Omniglot 5-way 1-shot, for
# docs/BENCHMARKS.md: the same number of meta-gradient tasks (32 a step / a round), the same
# seed and protocol, then 600 meta-test episodes each with 95 % CI.
# Usage: benchmarks/fed_vs_central.sh [STEPS]   (default 300; each step / round is 32 tasks)
# The federated side splits the 1200 meta-training characters by alphabet over the 4 sites of
# cluster/topologies/local4.yaml (embedded Ray) and holds none out, so both sides train on the
# same characters; only how tasks are drawn differs (within one site's alphabets vs anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGEMETA_DATA_DIR="${EDGEMETA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456
export RAY_USAGE_STATS_ENABLED=0
steps="${1:-300}"
out="${OUT:-runs/fed_vs_central}"
common=(--fresh --set "output_dir=$out" --set "train.steps=$steps" --set train.eval_every=0
        --set "algorithm.options={strategy: grouped}")
echo "== centralized: $steps steps =="
.venv/bin/edgemeta train omniglot_maml_5w1s "${common[@]}" --set name=central_5w1s
echo "== federated: $steps rounds over 4 sites =="
.venv/bin/edgemeta federated federated_omniglot_4sites "${common[@]}" --set name=federated_5w1s \
  --set federated.holdout_fraction=0 --set federated.personalize_episodes=0
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = {n: json.loads((Path(sys.argv[1]) / n / "summary.json").read_text())
        for n in ("central_5w1s", "federated_5w1s")}
print("| run | meta-test accuracy (600 episodes) | meta-gradient tasks | train time |")
print("|---|---|---|---|")
for name, s in rows.items():
    tasks = s.get("train_tasks", s["train_steps"] * 32)
    print(f"| {name} | {100 * s['accuracy']:.2f} % ± {100 * s['ci95']:.2f} | {tasks} | "
          f"{s['train_time_s']:.0f} s |")
gap = 100 * (rows["federated_5w1s"]["accuracy"] - rows["central_5w1s"]["accuracy"])
print(f"\nfederated - centralized: {gap:+.2f} points")
PY
