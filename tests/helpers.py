"""Helpers shared by test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def train_tiny_run(out: Path, name: str, dataset: str) -> Path:
    """A real two-step MAML run folder (Omniglot with an 8-channel net, or sinusoid)."""
    from experiments.config import parse_config
    from experiments.train import train

    raw: dict[str, Any] = {"name": name, "output_dir": str(out), "seed": 0,
                           "train": {"steps": 2, "meta_batch": 2, "checkpoint_every": 1,
                                     "log_every": 1},
                           "eval": {"episodes": 5, "batch": 5}}
    if dataset == "omniglot":
        raw |= {"data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 3},
                "model": {"name": "omniglot_conv", "channels": 8},
                "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1,
                              "test_steps": 3}}
    else:
        raw |= {"data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
                "model": {"name": "sinusoid_mlp"},
                "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
                "eval": {"episodes": 5, "batch": 5, "steps_list": [0, 1]}}
    train(parse_config(raw), echo=lambda _: None)
    return out / name


@contextmanager
def embedded_cluster(sites: int) -> Iterator[Any]:
    """An embedded Ray cluster for a test module: a CPU per site actor plus one for cloud
    tasks; yields the uniform topology of ``sites`` sites and always shuts Ray down."""
    from cluster.connect import connect, shutdown
    from cluster.topology import uniform_topology

    topology = uniform_topology(sites)
    connect(None, topology, num_cpus=sites + 1, log_to_driver=False)
    try:
        yield topology
    finally:
        shutdown()
