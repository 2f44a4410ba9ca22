"""Data lives only at its site: which files each process of a real run opened.

A local multi-node cluster (a head with the ``cloud`` resource, a raylet per site) is started
with ``EDGEMETA_AUDIT_OPENS`` set, so every edge actor, every one-shot site task and every
cloud task records each path it opens through a Python audit hook (``sys.addaudithook``, the
``open`` event; :mod:`cluster.open_audit`). The stores are sharded beforehand, as a data owner
would (``edgemeta data shard``), one of them at a path the topology names. After a short
federated run the records show:

* each site's actor and its store task opened its own store's manifest and examples, and
  nothing of another site's store nor the source npz; the rest of what they opened is code,
  libraries and the system;
* the cloud task opened the source npz (the meta-test split, the cloud's own data: the
  hook sees what a process loads with ``numpy.load``) and no site's store;
* the driver opened no site store and no data file.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import multi_node_cluster

from cluster import open_audit
from experiments.cli import main as cli_main
from experiments.config import load_config
from experiments.federated import train_federated
from metalearn.data.omniglot import find_omniglot

SITES = ["site-0", "site-1"]
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory):
    """The cluster's processes inherit the audit setting from their raylets; the test process
    itself records only inside :func:`open_audit.recording`."""
    folder = tmp_path_factory.mktemp("audit")
    previous = os.environ.get(open_audit.ENV)
    os.environ[open_audit.ENV] = str(folder)
    try:
        with multi_node_cluster(SITES):
            os.environ.pop(open_audit.ENV)
            if previous is not None:
                os.environ[open_audit.ENV] = previous
            yield folder
    finally:
        if previous is None:
            os.environ.pop(open_audit.ENV, None)
        else:
            os.environ[open_audit.ENV] = previous


def by_role(folder: Path) -> dict[str, set[str]]:
    """``{role: paths}``, merging the processes of a role (``edge.site-0``, ``cloud``)."""
    out: dict[str, set[str]] = defaultdict(set)
    for name, paths in open_audit.read_records(folder).items():
        out[name.rsplit("-", 1)[0]] |= {os.path.realpath(p) for p in paths}
    return dict(out)


def inside(path: str, folder: str | Path) -> bool:
    return path == str(folder) or path.startswith(str(folder).rstrip("/") + "/")


def test_each_site_opens_only_its_own_store(audit_dir: Path, tmp_path: Path) -> None:
    stores_root = tmp_path / "stores"
    config = tmp_path / "audited.yaml"
    config.write_text(json.dumps({
        "name": "audited", "seed": 2, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2},
        "model": {"name": "omniglot_conv", "channels": 4},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
        "train": {"meta_batch": 4, "steps": 2, "checkpoint_every": 100},
        "eval": {"episodes": 4, "batch": 4},
        "federated": {"topology": {"sites": [{"name": "site-0", "store": "zero"},
                                             {"name": "site-1"}]},
                      "personalize_episodes": 2, "deadline_s": 60,
                      "data": {"stores": str(stores_root),
                               "partitioner": {"name": "dirichlet", "alpha": 1.0}}}}))
    assert cli_main(["data", "shard", str(config)]) == 0  # the data owner, before the run
    stores = {"site-0": stores_root / "zero", "site-1": stores_root / "site-1"}
    source = os.path.realpath(find_omniglot())

    with open_audit.recording("driver", audit_dir):
        summary = train_federated(load_config(config), echo=lambda _: None)
    assert summary["train_steps"] == 2 and 0.0 <= summary["accuracy"] <= 1.0

    roles = by_role(audit_dir)
    assert {f"{kind}.{s}" for kind in ("edge", "site-task") for s in SITES} | {
        "cloud", "driver"} <= set(roles)
    allowed_elsewhere = [REPO, sys.prefix, sys.base_prefix, "/usr", "/etc", "/proc", "/sys",
                         "/dev", "/tmp/ray", audit_dir]
    for site in SITES:
        own = os.path.realpath(stores[site])
        others = [os.path.realpath(p) for s, p in stores.items() if s != site]
        for role in (f"edge.{site}", f"site-task.{site}"):
            paths = roles[role]
            assert {f"{own}/manifest.json", f"{own}/examples.npy"} <= paths, role
            assert source not in paths, f"{role} opened the source data set"
            assert not [p for p in paths if any(inside(p, o) for o in others)], \
                f"{role} opened another site's store"
            stray = [p for p in paths if not inside(p, own)
                     and not any(inside(p, a) for a in allowed_elsewhere)]
            assert stray == [], f"{role} opened files outside its store and the code: {stray}"
    for role in ("cloud", "driver"):
        assert not [p for p in roles[role] if inside(p, os.path.realpath(stores_root))], \
            f"{role} opened a site's store"
    assert source in roles["cloud"]  # its meta-test split: the hook sees numpy.load
    assert source not in roles["driver"]
