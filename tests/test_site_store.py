"""Site stores, partitioners, sharding and plans from manifests (no Ray).

* a store round-trips its examples and manifest, refuses a changed examples file, a foreign
  format version and (for the sampler) unequal class counts, and is replaced atomically;
* the partitioners (iid, dirichlet, quantity) cover the classes disjointly, are seeded, keep
  ``min_classes``, and skew as their parameter says;
* ``edgemeta data shard`` writes only each site's own characters, says "up to date" on a second
  run, and rewrites a store whose spec changed;
* a site planned from its store's manifest draws bit for bit the tasks that the source data set
  gives the same site (what keeps the federated equivalence tests meaningful).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.cli import main as cli_main
from experiments.config import parse_config
from experiments.site_jobs import shard_spec, site_stores
from metalearn.data.omniglot import load_omniglot, split_characters
from metalearn.data.partition import (
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)
from metalearn.data.shard import ShardSpec, shard_sites, shard_split
from metalearn.data.store import (
    MANIFEST,
    StoreError,
    load_store,
    read_manifest,
    verify_store,
    write_store,
)
from metalearn.sites import SiteTasks, plan_from_manifests, plan_sites

SITES = ["site-0", "site-1", "site-2"]
DATA = {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 5, "rotations": True,
        "path": None}


@pytest.fixture(scope="module")
def omniglot():
    omni = load_omniglot()
    return omni, split_characters(omni, "trainval")


@pytest.fixture(scope="module")
def alphabet_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    stores = {s: str(root / s) for s in SITES}
    shard_sites(ShardSpec(sites=tuple(SITES), seed=3, min_classes=10), stores)
    return stores


def small_store(path: Path, counts: tuple[int, ...] = (3, 3)) -> np.ndarray:
    rows = sum(counts)
    examples = np.arange(rows * 4 * 5, dtype=np.int64).reshape(rows, 4, 5).astype(np.uint8)
    classes = [(f"a/c{i}", "a" if i % 2 == 0 else "b", n) for i, n in enumerate(counts)]
    write_store(path, examples, classes, {"dataset": "test"}, {"site": "x"})
    return examples


# ------------------------------------------------------------------------------ the format

def test_store_round_trip(tmp_path: Path) -> None:
    examples = small_store(tmp_path / "s")
    assert sorted(os.listdir(tmp_path / "s")) == ["examples.npy", MANIFEST]
    manifest = read_manifest(tmp_path / "s")
    raw = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert raw["format"] == "edgemeta-site-store" and raw["version"] == 1
    assert [c["offset"] for c in raw["classes"]] == [0, 3]
    assert manifest.counts == [3, 3] and manifest.groups == ["a", "b"]
    assert manifest.image_shape == (4, 5) and manifest.rows == 6
    store = load_store(tmp_path / "s")
    assert store.pixels.shape == (2, 3, 4, 5) and store.pixels.dtype == torch.uint8
    assert np.array_equal(store.pixels.reshape(6, 4, 5).numpy(), examples)
    data = store.as_omniglot()
    assert data.num_characters == 2 and list(data.char_alphabet) == [0, 1]
    assert list(data.alphabet_names) == ["a", "b"] and (data.char_vinyals_split == -1).all()


def test_store_refuses_changed_examples_and_foreign_versions(tmp_path: Path) -> None:
    examples = small_store(tmp_path / "s")
    changed = examples.copy()
    changed[0, 0, 0] ^= 1
    np.save(tmp_path / "s" / "examples.npy", changed)
    with pytest.raises(StoreError, match="content hash differs"):
        verify_store(tmp_path / "s")
    with pytest.raises(StoreError, match="content hash differs"):
        load_store(tmp_path / "s")
    small_store(tmp_path / "v")
    raw = json.loads((tmp_path / "v" / MANIFEST).read_text())
    (tmp_path / "v" / MANIFEST).write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(StoreError, match="version 99"):
        read_manifest(tmp_path / "v")
    with pytest.raises(StoreError, match="no site store"):
        read_manifest(tmp_path / "missing")


def test_unequal_counts_are_stored_but_not_sampled_yet(tmp_path: Path) -> None:
    small_store(tmp_path / "u", counts=(2, 4))
    manifest = verify_store(tmp_path / "u")
    assert manifest.counts == [2, 4] and [c.offset for c in manifest.classes] == [0, 2]
    with pytest.raises(StoreError, match=r"\[2, 4\] examples"):
        load_store(tmp_path / "u")


def test_rewrite_replaces_the_store_whole(tmp_path: Path) -> None:
    small_store(tmp_path / "s", counts=(3, 3))
    small_store(tmp_path / "s", counts=(1, 1, 1))
    assert read_manifest(tmp_path / "s").counts == [1, 1, 1]
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary or old folder left behind


# ------------------------------------------------------------------------------ partitioners

def _check_cover(parts: list[np.ndarray], classes: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.sort(classes))  # disjoint and complete


def groups_per_site(parts: list[np.ndarray], group_of: np.ndarray) -> float:
    return float(np.mean([np.unique(group_of[p]).size for p in parts]))


def test_iid_partition(omniglot) -> None:
    _, train = omniglot
    parts = partition_iid(train, 4, seed=1)
    _check_cover(parts, train)
    assert [p.size for p in parts] == [300] * 4
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(train, 4, seed=1),
                                                    strict=True))
    assert not np.array_equal(parts[0], partition_iid(train, 4, seed=2)[0])


def test_dirichlet_partition_skews_alphabets_with_small_alpha(omniglot) -> None:
    omni, train = omniglot
    group = omni.char_alphabet
    skewed = partition_dirichlet(train, group, 4, alpha=0.05, seed=0, min_classes=10)
    mixed = partition_dirichlet(train, group, 4, alpha=100.0, seed=0, min_classes=10)
    for parts in (skewed, mixed):
        _check_cover(parts, train)
        assert min(p.size for p in parts) >= 10
    # Small alpha: most alphabets land (nearly) whole on one site; large alpha: every site
    # gets a share of nearly every alphabet.
    assert groups_per_site(skewed, group) < 0.6 * groups_per_site(mixed, group)
    assert groups_per_site(mixed, group) > 35  # of the 38 meta-training alphabets
    again = partition_dirichlet(train, group, 4, alpha=0.05, seed=0, min_classes=10)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))
    with pytest.raises(ValueError, match="raise alpha or lower min_classes"):
        partition_dirichlet(train, group, 4, alpha=0.001, seed=0, min_classes=290,
                            self_balancing=False)


def test_quantity_partition_gives_unequal_sizes(omniglot) -> None:
    _, train = omniglot
    skewed = partition_quantity(train, 4, alpha=0.3, seed=0, min_classes=10)
    even = partition_quantity(train, 4, alpha=1e4, seed=0, min_classes=10)
    for parts in (skewed, even):
        _check_cover(parts, train)
        assert min(p.size for p in parts) >= 10
    sizes = sorted(p.size for p in skewed)
    assert sizes[-1] > 3 * sizes[0]
    assert max(p.size for p in even) - min(p.size for p in even) <= 12
    with pytest.raises(ValueError, match="min_classes"):
        partition_quantity(train, 4, alpha=1.0, min_classes=301)
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition_classes("shards", train, omniglot[0].char_alphabet, 4, seed=0)


# ------------------------------------------------------------------------------ sharding

def test_each_store_holds_only_its_own_characters(omniglot, alphabet_stores) -> None:
    omni, train = omniglot
    manifests = {s: read_manifest(alphabet_stores[s]) for s in SITES}
    names = [c.name for s in SITES for c in manifests[s].classes]
    assert len(names) == len(set(names)) == train.size  # disjoint, complete
    groups = [set(manifests[s].groups) for s in SITES]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    index = {str(n): i for i, n in enumerate(omni.character_names)}
    store = load_store(alphabet_stores["site-1"])
    ids = [index[c.name] for c in store.manifest.classes]
    assert ids == sorted(ids)  # global order kept: local id i is the i-th character held
    assert torch.equal(store.pixels, omni.pixels[ids])
    assert store.manifest.partition["partitioner"] == {"name": "alphabet"}


def test_shard_cli_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "name": "shard", "seed": 1, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 5},
        "federated": {"topology": {"sites": [{"name": "a"}, {"name": "b", "store": "bee"}]},
                      "data": {"partitioner": {"name": "quantity", "alpha": 0.5}}}}))
    args = ["data", "shard", str(cfg), "--stores", str(tmp_path / "st")]
    assert cli_main(args) == 0
    first = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in first] == ["a", "b"]
    assert all(": written (" in ln and "; quantity)" in ln for ln in first)
    assert first[1].endswith(str(tmp_path / "st" / "bee"))
    stamp = (tmp_path / "st" / "a" / "examples.npy").stat().st_mtime_ns
    assert cli_main(args) == 0
    assert all(": up to date (" in ln for ln in capsys.readouterr().out.splitlines())
    assert (tmp_path / "st" / "a" / "examples.npy").stat().st_mtime_ns == stamp
    assert cli_main([*args, "--set", "federated.data.partitioner=iid", "--site", "a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("a: written (") and "; iid)" in out[0]
    assert cli_main([*args, "--set", "federated.data.partitioner={name: shards}"]) == 2
    assert "partitioner name 'shards'" in capsys.readouterr().err


def test_store_paths_and_spec_follow_the_config(tmp_path: Path) -> None:
    cfg = parse_config({
        "name": "paths", "seed": 4, "output_dir": str(tmp_path),
        "data": {"dataset": "omniglot", "ways": 3},
        "federated": {"topology": {"sites": [{"name": "s0"}, {"name": "s1", "store": "x/y"},
                                             {"name": "s2", "store": "/abs/s2"}]}}})
    topology = cfg.federated.resolved_topology()  # type: ignore[union-attr]
    stores = site_stores(cfg, topology)
    assert stores == {"s0": str(tmp_path / "paths" / "stores" / "s0"),
                      "s1": str(tmp_path / "paths" / "stores" / "x" / "y"), "s2": "/abs/s2"}
    spec = shard_spec(cfg, topology)
    assert spec.seed == 4 and spec.min_classes == 6 and spec.partitioner == {"name": "alphabet"}
    with pytest.raises(ValueError, match="store of its own"):
        parse_config({"federated": {"topology": {"sites": [{"name": "a", "store": "s"},
                                                           {"name": "b", "store": "s"}]}}})
    clash = parse_config({"output_dir": str(tmp_path), "federated": {"topology": {
        "sites": [{"name": "a", "store": "b"}, {"name": "b"}]}}})
    with pytest.raises(ValueError, match="resolve to one"):
        site_stores(clash, clash.federated.resolved_topology())  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ planning

def test_plans_from_manifests_draw_the_source_plans_tasks(alphabet_stores) -> None:
    """The alphabet stores give each site exactly the characters (in the same order) that
    planning on the whole source gave, so every task is the same, bit for bit."""
    source = plan_sites(DATA, SITES, seed=3, holdout_fraction=0.2)
    manifests = {s: read_manifest(alphabet_stores[s]) for s in SITES}
    plans = plan_from_manifests(DATA, manifests, alphabet_stores, seed=3, holdout_fraction=0.2)
    for site in SITES:
        plan = plans[site]
        assert plan["store"] == alphabet_stores[site]
        assert plan["store_sha256"] == manifests[site].sha256
        assert len(plan["characters"]) + len(plan["holdout"]) == manifests[site].num_classes
        assert plan["alphabets"] == source[site]["alphabets"]
        ours = SiteTasks(DATA, plan, devices=3, seed=3)
        theirs = SiteTasks(DATA, source[site], devices=3, seed=3)
        a, b = ours.round_sampler([0, 2], 4)(5), theirs.round_sampler([0, 2], 4)(5)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert torch.equal(ours.holdout_sampler().sample(2).query_x,
                           theirs.holdout_sampler().sample(2).query_x)


def test_a_store_changed_after_planning_is_refused(alphabet_stores, tmp_path: Path) -> None:
    manifest = read_manifest(alphabet_stores["site-0"])
    plan = plan_from_manifests(DATA, {"site-0": manifest}, alphabet_stores, 3)["site-0"]
    moved = {**plan, "store_sha256": "0" * 64}
    with pytest.raises(StoreError, match="changed since the cloud planned"):
        SiteTasks(DATA, moved).load()
    with pytest.raises(ValueError, match="fewer than shots"):
        plan_from_manifests({**DATA, "queries": 20}, {"site-0": manifest}, alphabet_stores, 3)


def test_a_meta_test_store_gives_the_test_splits_result(tmp_path: Path) -> None:
    """The cloud's own meta-test store, made from the test split, scores exactly what the
    test split itself scores (same characters in the same order: the same episodes)."""
    from experiments.federated import meta_test_task
    from metalearn.from_config import algorithm_from_config

    status, manifest = shard_split(tmp_path / "test")
    assert status == "written" and manifest.num_classes == 423 and len(manifest.groups) == 13
    assert shard_split(tmp_path / "test")[0] == "up to date"
    raw = {"name": "mt", "output_dir": str(tmp_path), "seed": 0,
           "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 3},
           "model": {"name": "omniglot_conv", "channels": 4},
           "eval": {"episodes": 4, "batch": 4}, "federated": {"topology": 2}}
    split = parse_config(raw)
    store = parse_config({**raw, "federated": {"topology": 2, "data": {
        "test_store": str(tmp_path / "test")}}})
    torch.manual_seed(0)
    params = algorithm_from_config(split.to_dict()).init_params()
    assert meta_test_task(store, params, 4) == meta_test_task(split, params, 4)
    with pytest.raises(ValueError, match=r"federated\.data\.test_store"):
        parse_config({**raw, "data": {"dataset": "sinusoid"}, "model": {"name": "sinusoid_mlp"},
                      "federated": {"topology": 2, "data": {"test_store": "x"}}})
