#!/usr/bin/env bash
# Matching Networks and Siamese networks on Omniglot 5-way 1-shot against a wall-clock budget,
# for docs/BENCHMARKS.md ("Matching Networks, Siamese, CAVIA"). Each run stops at its time budget
# (train.time_budget_s), then meta-tests on 600 episodes of the 423 held-out characters.
# Usage: benchmarks/accuracy_metric.sh [BUDGET_S] (default 600); OUT=folder, ONLY=REGEX.
set -euo pipefail
cd "$(dirname "$0")/.."
export EDGEMETA_DATA_DIR="${EDGEMETA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456
budget="${1:-600}"
out="${OUT:-runs/accuracy-metric}"
py="${PYTHON:-.venv/bin/python}"
for config in omniglot_matching_5w1s omniglot_siamese_5w1s sinusoid_cavia; do
  [[ -z "${ONLY:-}" || "$config" =~ ${ONLY} ]] || continue
  echo "== $config: budget ${budget}s =="
  "$py" -m experiments.cli train "$config" --fresh --set "output_dir=$out" \
    --set "train.time_budget_s=$budget"
done
"$py" -m benchmarks.accuracy_table "$out"
