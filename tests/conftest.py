"""Test-wide settings: no Ray usage stats, and the shared Omniglot copy beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "EDGEMETA_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["EDGEMETA_DATA_DIR"] = str(_shared)
