#!/usr/bin/env bash
# Create .venv-flwr (Flower's own virtualenv) in the repo root, if missing.
#
# Flower 1.4x pins its own ray (2.55.x) which would clash with the project's ray, so it lives in a
# separate venv. torch is installed FIRST with an exact pin: the CPU wheel is on disk, and a looser
# spec lets pip pull a multi-GB CUDA build. Idempotent: a stamp file marks a finished install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${FLWR_VENV:-$ROOT/.venv-flwr}"
PY="${PY:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
FLWR_SPEC="${FLWR_SPEC:-flwr[simulation]==1.42.*}"
STAMP="$VENV/.flwr-installed"

if [[ -f "$STAMP" ]]; then
    echo "flower_setup: $VENV ready ($(cat "$STAMP"))"
    exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_PIN"
if ! "$VENV/bin/python" -m pip install -q "$TORCH_PIN" "$FLWR_SPEC" psutil; then
    # 1.42 may be yanked or unavailable later: accept any 1.4x that resolves.
    "$VENV/bin/python" -m pip install -q "$TORCH_PIN" "flwr[simulation]>=1.40,<1.50" psutil
fi
"$VENV/bin/python" -c "import flwr, ray, torch; print(f'flwr {flwr.__version__} ray {ray.__version__} torch {torch.__version__}')" \
    | tee "$STAMP"
