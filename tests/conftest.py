"""Test-wide settings: no Ray usage stats, and the shared Omniglot copy beside the checkout."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "EDGEMETA_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["EDGEMETA_DATA_DIR"] = str(_shared)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast, and does not collapse (40× was seen) when
    other processes oversubscribe the cores and OpenMP threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def heap_given_back() -> Iterator[None]:
    """An EdgeNode freezes the collector's heap at start (it is an actor's whole life): a module
    that builds EdgeNode objects in this process gives the heap back afterwards, with
    ``pytestmark = pytest.mark.usefixtures("heap_given_back")``."""
    yield
    gc.unfreeze()
