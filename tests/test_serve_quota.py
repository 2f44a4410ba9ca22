"""The adapted-model quota: the eviction policy, and the store that applies it to real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import train_tiny_run

from serve.quota import Entry, StoreQuota, evictions
from serve.store import ModelStore


def test_least_recently_used_go_first_until_count_and_bytes_fit() -> None:
    entries = [Entry("a", 100, 1.0), Entry("b", 100, 3.0), Entry("c", 100, 2.0),
               Entry("d", 300, 4.0)]
    assert evictions(entries, StoreQuota(max_models=3, max_bytes=10_000), now=5.0) == ["a"]
    assert evictions(entries, StoreQuota(max_models=10, max_bytes=400), now=5.0) == ["a", "c"]
    assert evictions(entries, StoreQuota(max_models=10, max_bytes=10_000), now=5.0) == []


def test_the_model_to_keep_survives_even_when_it_alone_is_over() -> None:
    entries = [Entry("old", 10, 1.0), Entry("new", 500, 2.0)]
    assert evictions(entries, StoreQuota(1, 100), now=3.0, keep=("new",)) == ["old"]
    assert evictions([Entry("new", 500, 2.0)], StoreQuota(1, 100), 3.0, keep=("new",)) == []


def test_ttl_expires_unused_models() -> None:
    entries = [Entry("stale", 1, 0.0), Entry("fresh", 1, 95.0)]
    assert evictions(entries, StoreQuota(10, 10, ttl_s=50), now=100.0) == ["stale"]
    assert evictions(entries, StoreQuota(10, 10, ttl_s=None), now=100.0) == []


@pytest.fixture(scope="module")
def sine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("runs"), "sine", "sinusoid")


def _adapt(store: ModelStore, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    base = store.get("latest")
    x, y = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)
    return store.adapt(base, x, y, steps=1).ref.key


def test_the_store_keeps_its_bound_and_a_reused_model_is_kept(sine: Path) -> None:
    store = ModelStore([sine], poll_s=0.0, cache_size=4, quota=StoreQuota(3, 1 << 20))
    first = _adapt(store, 0)
    keys = [first] + [_adapt(store, s) for s in (1, 2)]
    os.utime(sine / "adapted" / f"{first}.pt", (1.0, 1.0))  # long unused ...
    assert _adapt(store, 0) == first  # ... until asked again: a use, not a new model
    fourth = _adapt(store, 3)  # one over: the least recently used (keys[1]) goes
    left = {e.key for e in store.runs["sine"].adapted_entries()}
    assert left == {first, keys[2], fourth}
    listing = store.listing()
    assert listing["adapted_total"] == 3 and listing["runs"][0]["adapted_models"] == 3
    assert listing["adapted_quota"] == {"max_models": 3, "max_bytes": 1 << 20, "ttl_s": None}

