"""Raw examples stay at the edge.

Two checks on a real (embedded) Ray cluster with Omniglot:

* everything an edge actor returns is a parameter-shaped tensor, the flat update vector of
  exactly the model's parameter count, or a scalar / string / list of those (ids, names),
  never an image or a label array;
* the driver process never opens the data file: while the driver trains, ``numpy.load``,
  ``load_omniglot`` and ``open`` of the npz raise in this process (the actors, planning and
  meta-test tasks run in other processes and load it there), and every value ``ray.get``
  hands the driver passes the check above.
"""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from helpers import embedded_cluster

from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from experiments.site_jobs import site_jobs
from metalearn.from_config import algorithm_from_config
from metalearn.params import FlatLayout
from metalearn.sites import plan_sites

SITES = 2


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_cluster(SITES) as topology:
        yield topology


def config(tmp_path: Path) -> ExperimentConfig:
    return parse_config({
        "name": "privacy", "seed": 1, "output_dir": str(tmp_path),
        "data": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2},
        "model": {"name": "omniglot_conv", "channels": 8},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
        "train": {"meta_batch": 4, "steps": 2, "checkpoint_every": 100},
        "eval": {"episodes": 6, "batch": 6},
        "federated": {"topology": {"sites": SITES}, "personalize_episodes": 3},
    })


def param_shapes(cfg: ExperimentConfig) -> set[tuple[int, ...]]:
    """Each parameter's shape, and the flat vector of all of them (the wire format)."""
    params = algorithm_from_config(cfg.to_dict()).init_params()
    return {tuple(v.shape) for v in params.values()} | {(FlatLayout.of(params).numel,)}


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every non-container value inside nested dataclasses, dicts, lists and tuples, with its
    path (a typed message such as ``RoundReply`` is walked field by field)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in dataclasses.fields(value)
                for leaf in leaves(getattr(value, f.name), f"{path}.{f.name}")]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in leaves(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [leaf for i, v in enumerate(value) for leaf in leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def assert_no_data(value: Any, shapes: set[tuple[int, ...]]) -> None:
    for path, leaf in leaves(value):
        if isinstance(leaf, torch.Tensor | np.ndarray):
            assert tuple(leaf.shape) in shapes, f"{path}: tensor {tuple(leaf.shape)} is not " \
                                                "shaped like a parameter"
        else:
            assert leaf is None or isinstance(leaf, bool | int | float | str), \
                f"{path}: {type(leaf).__name__} is neither a tensor nor a scalar"


def test_everything_an_edge_returns_is_parameter_shaped_or_scalar(ray_cluster,
                                                                  tmp_path: Path) -> None:
    from actors.contract import RoundReply, RoundTimings
    from actors.edge import spawn_edge

    cfg = config(tmp_path)
    spec = cfg.to_dict()
    topology = ray_cluster
    plans = ray.get(ray.remote(plan_sites).remote(spec["data"], topology.site_names, 1))
    site = topology.sites[0]
    job = site_jobs(cfg, topology, plans, dict.fromkeys(topology.site_names, 2), 3)[site.name]
    edge = spawn_edge(job, site.actor_cpus)
    try:
        params = algorithm_from_config(spec).init_params()
        layout = FlatLayout.of(params)
        result = ray.get(edge.round.remote(ray.put(layout.pack(params)), 1, [0, 1]))
        assert isinstance(result, RoundReply) and isinstance(result.timings, RoundTimings)
        fields = {f.name for m in (result, result.timings) for f in dataclasses.fields(m)}
        assert fields - {"timings"} == {"site", "round", "kind", "update", "num_tasks",
                                        "metrics", "compute_s", "compute_wait_s", "started_at",
                                        "finished_at", "device_ids", "clip_vote", "masked",
                                        "encoded", "local_steps", "idle_s", "network_s"}
        assert result.masked is None  # masked inputs only under secure aggregation
        assert result.encoded is None  # compressed updates only under compression
        assert result.update.shape == (layout.numel,)
        assert result.update.dtype == np.float32
        assert result.num_tasks == 3 and list(result.device_ids) == [0, 1]
        assert all(isinstance(v, float) for v in result.metrics.values())
        shapes = param_shapes(cfg)
        for value in (result, ray.get(edge.personalize.remote(params, 2)),
                      ray.get(edge.info.remote()), ray.get(edge.sampler_state.remote())):
            assert_no_data(value, shapes)
    finally:
        ray.kill(edge)


def test_driver_never_opens_the_data_file(ray_cluster, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    shapes = param_shapes(cfg)
    opened: list[str] = []

    def refuse(what: str):
        def _raise(*args: Any, **kwargs: Any) -> Any:
            opened.append(f"{what}{args[:1]}")
            raise AssertionError(f"the driver process called {what}")
        return _raise

    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if "omniglot" in str(file):
            opened.append(f"open({file})")
            raise AssertionError(f"the driver process opened {file}")
        return real_open(file, *args, **kwargs)

    import metalearn.data.omniglot as omniglot

    monkeypatch.setattr(np, "load", refuse("numpy.load"))
    monkeypatch.setattr(omniglot, "load_omniglot", refuse("load_omniglot"))
    monkeypatch.setattr(omniglot, "_read", refuse("omniglot._read"))
    monkeypatch.setattr(builtins, "open", guarded_open)

    received: list[Any] = []
    real_get = ray.get

    def recording_get(*args: Any, **kwargs: Any) -> Any:
        value = real_get(*args, **kwargs)
        received.append(value)
        return value

    monkeypatch.setattr(ray, "get", recording_get)
    summary = train_federated(cfg, echo=lambda _: None)
    monkeypatch.undo()

    assert opened == []
    assert 0.0 <= summary["accuracy"] <= 1.0  # the meta-test ran, elsewhere
    assert len(summary["federated"]["personalization"]) == SITES
    assert received, "the driver received nothing through ray.get"
    for value in received:
        assert_no_data(value, shapes)


def test_site_compute_runs_below_the_priority_of_its_calls(ray_cluster, tmp_path: Path) -> None:
    """The edge's training thread is niced (``compute_nice``), its call-handling thread is not:
    calls reach a busy site at once instead of waiting for a time slice."""
    from actors.edge import spawn_edge

    cfg = config(tmp_path)
    spec = cfg.to_dict()
    topology = ray_cluster
    plans = ray.get(ray.remote(plan_sites).remote(spec["data"], topology.site_names, 1))
    site = topology.sites[1]
    assert site.compute_nice == 19
    job = site_jobs(cfg, topology, plans, dict.fromkeys(topology.site_names, 1), 1)[site.name]
    edge = spawn_edge(job, site.actor_cpus)
    try:
        nice = ray.get(edge.info.remote()).nice
        assert nice["compute"] == 19
        assert nice["calls"] < nice["compute"]
    finally:
        ray.kill(edge)
