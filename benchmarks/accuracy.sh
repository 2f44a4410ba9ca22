#!/usr/bin/env bash
# Omniglot / sinusoid accuracy against a wall-clock budget, for docs/BENCHMARKS.md.
# Each run stops at its time budget (train.time_budget_s), then meta-tests on 600 episodes
# of the 423 held-out characters. Usage: benchmarks/accuracy.sh [BUDGET_SCALE]
#   BUDGET_SCALE multiplies every budget (default 1; 0.1 for a smoke run).
#   ONLY=REGEX runs only the configs whose name matches (e.g. ONLY=5w5s).
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGEMETA_DATA_DIR="${EDGEMETA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
# glibc returns big freed blocks to the kernel and faults them back every step; keep them.
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456
scale="${1:-1}"
out="${OUT:-runs/accuracy}"
run() {
  local config=$1 budget=$2; shift 2
  [[ -z "${ONLY:-}" || "$config" =~ ${ONLY} ]] || return 0
  budget=$(python3 -c "print(max(1, round($budget * $scale)))")
  echo "== $config: budget ${budget}s =="
  .venv/bin/edgemeta train "$config" --fresh --set "output_dir=$out" \
    --set "train.time_budget_s=$budget" "$@"
}
run omniglot_protonet_5w1s 300 --set train.eval_every=100
run sinusoid_maml 300
run omniglot_maml_5w1s 1500 --set "algorithm.options={strategy: grouped}"
run omniglot_fomaml_5w1s 480 --set "algorithm.options={strategy: grouped}"
run omniglot_maml_5w5s 480 --set "algorithm.options={strategy: grouped}"
run omniglot_fomaml_5w5s 300 --set "algorithm.options={strategy: grouped}"
run omniglot_protonet_5w5s 300 --set train.eval_every=100
.venv/bin/python -m benchmarks.accuracy_table "$out"
