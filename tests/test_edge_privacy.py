"""Raw examples stay at the edge.

Checks on a real (embedded) Ray cluster with Omniglot site stores:

* **What crosses, by contract.** Every value an edge actor returns is walked recursively
  (dataclasses, mappings, lists, tuples, arrays, tensors) and each leaf is held to the type the
  contract gives its place: the one array allowed is ``RoundReply.update`` (float32, 1-D, the
  parameter count); lists of numbers only where the contract has them (``device_ids``,
  ``image_shape``, ``amplitude``), with their sizes bounded; every other leaf a scalar or a
  string.
* **What crosses, by content.** Every numeric content anywhere (arrays, and lists of numbers
  however nested) is searched for the site's examples and the round's labels: no window of it
  equals an image of the site's store (as stored, as the sampler's float, or as turned and fed
  to the model) or the round's support or query label vector.
* **The checker bites.** Replies doctored from a real one (pixels as nested lists in the
  metrics, an image inside the update, a label vector shaped like a bias, labels as device
  ids) are each rejected.
* **The driver never opens data.** While the driver trains, ``numpy.load``, ``load_omniglot``,
  ``load_store`` and ``open`` of the source npz or of any site store raise in this process
  (the sites shard, load and sample in their own processes; the meta-test runs in a cloud
  task), and every value ``ray.get`` hands the driver passes both checks.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from helpers import embedded_cluster

from actors.contract import Personalize, RoundReply, RoundTimings, SiteInfo, SiteModelReply
from experiments.config import ExperimentConfig, parse_config
from experiments.federated import train_federated
from experiments.site_jobs import shard_spec, site_jobs, site_stores
from metalearn.data.shard import shard_sites
from metalearn.data.store import StoreClass, StoreManifest, load_store
from metalearn.from_config import algorithm_from_config
from metalearn.params import FlatLayout
from metalearn.sites import SiteTasks, plan_from_manifests

SITES = 2
WAYS, SHOTS, QUERIES, TASKS = 3, 1, 2, 3
SCALARS = (bool, int, float, str, type(None))
CONTRACT_TYPES = (RoundReply, RoundTimings, SiteInfo, SiteModelReply, StoreManifest,
                  StoreClass)
ARRAYS = {"update", "params"}  # a round's update, a site model: the parameter count each
NUMERIC_LISTS = {"device_ids": 10_000, "image_shape": 2, "amplitude": 2}


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_cluster(SITES) as topology:
        yield topology


def config(tmp_path: Path) -> ExperimentConfig:
    return parse_config({
        "name": "privacy", "seed": 1, "output_dir": str(tmp_path),
        "data": {"dataset": "omniglot", "ways": WAYS, "shots": SHOTS, "queries": QUERIES},
        "model": {"name": "omniglot_conv", "channels": 8},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
        "train": {"meta_batch": SITES * TASKS, "steps": 2, "checkpoint_every": 100},
        "eval": {"episodes": 6, "batch": 6},
        "federated": {"topology": {"sites": SITES}, "personalize_episodes": 3},
    })


# ------------------------------------------------------------------ the checker

def _numeric(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _flat_numbers(value: Any) -> np.ndarray | None:
    """A list or tuple of numbers, however nested, as one float64 vector (else None)."""
    out: list[float] = []

    def walk(v: Any) -> bool:
        if isinstance(v, list | tuple):
            return all(walk(x) for x in v)
        if _numeric(v):
            out.append(float(v))
            return True
        return False

    return np.array(out) if isinstance(value, list | tuple) and value and walk(value) else None


class LeakCheck:
    """Holds a reply to the contract's types and searches its numbers for examples and labels.

    ``images``: uint8 ``[n, 28, 28]`` (the site's store); ``fed``: float images as the model saw
    them (turned); ``labels``: label vectors of the round; ``numel``: the parameter count.
    """

    def __init__(self, images: np.ndarray, fed: Iterable[torch.Tensor],
                 labels: Iterable[np.ndarray], numel: int) -> None:
        self.numel = numel
        self.width = images.shape[1] * images.shape[2]
        flat = images.reshape(len(images), -1)
        forms = [flat.astype(np.float32), flat.astype(np.float32) / np.float32(255),
                 (flat / 255.0).astype(np.float32)]
        forms += [t.reshape(-1, self.width).numpy().astype(np.float32) for t in fed]
        self.image_keys = {hash(row.tobytes()) for form in forms for row in form}
        self.labels = [np.asarray(lab, dtype=np.float32).ravel() for lab in labels]

    # content ---------------------------------------------------------------------------
    def _windows(self, x: np.ndarray, width: int) -> set[int]:
        if x.size < width:
            return set()
        view = np.lib.stride_tricks.sliding_window_view(x.astype(np.float32), width)
        return {hash(row.tobytes()) for row in view}

    def content(self, path: str, numbers: np.ndarray) -> None:
        x = np.asarray(numbers, dtype=np.float64).ravel()
        assert self._windows(x, self.width).isdisjoint(self.image_keys), \
            f"{path}: holds an image of the site"
        for lab in self.labels:
            assert hash(lab.tobytes()) not in self._windows(x, lab.size), \
                f"{path}: holds the round's labels"

    # types -----------------------------------------------------------------------------
    def check(self, value: Any, path: str = "") -> None:
        """Walk ``value``; fail naming the first place that breaks the contract or leaks."""
        name = path.rsplit(".", 1)[-1].split("[")[0]
        if isinstance(value, torch.Tensor):
            value = value.detach().numpy()
        if isinstance(value, np.ndarray):
            assert name in ARRAYS and value.dtype == np.float32 and \
                value.shape in ((self.numel,), (0,)), \
                f"{path}: array {value.dtype}{list(value.shape)} where the contract has none"
            self.content(path, value)
            return
        if isinstance(value, bytes | bytearray | memoryview):
            raise AssertionError(f"{path}: raw bytes cross the wire")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            assert isinstance(value, CONTRACT_TYPES), \
                f"{path}: {type(value).__name__} is not a contract type"
            for f in dataclasses.fields(value):
                self.check(getattr(value, f.name), f"{path}.{f.name}")
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                assert isinstance(k, str), f"{path}: key {k!r} is not a string"
                self.check(v, f"{path}.{k}")
            return
        if isinstance(value, list | tuple):
            numbers = _flat_numbers(value)
            if numbers is not None:
                assert name in NUMERIC_LISTS and numbers.size <= NUMERIC_LISTS[name] and \
                    all(_numeric(v) for v in value), \
                    f"{path}: a list of {numbers.size} numbers where the contract has none"
                self.content(path, numbers)
                return
            for i, v in enumerate(value):
                self.check(v, f"{path}[{i}]")
            return
        assert isinstance(value, SCALARS), f"{path}: {type(value).__name__} is not a scalar"


def label_vectors(tasks: int) -> list[np.ndarray]:
    """A round's support and query labels (every task's labels are the same ordered pattern)."""
    return [np.tile(np.repeat(np.arange(WAYS), n), tasks) for n in (SHOTS, QUERIES)]


def store_images(stores: Mapping[str, str]) -> np.ndarray:
    return np.concatenate([load_store(p).pixels.reshape(-1, 28, 28).numpy()
                           for p in stores.values()])


def numel(cfg: ExperimentConfig) -> int:
    return FlatLayout.of(algorithm_from_config(cfg.to_dict()).init_params()).numel


def sharded_jobs(cfg: ExperimentConfig, topology: Any, devices: int, per_site: int):
    """The sites' jobs as a run makes them: stores sharded, plans from their manifests."""
    stores = site_stores(cfg, topology)
    manifests = {s: m for s, (_, m) in shard_sites(shard_spec(cfg, topology), stores).items()}
    plans = plan_from_manifests(cfg.to_dict()["data"], manifests, stores, cfg.seed)
    return stores, site_jobs(cfg, topology, plans, dict.fromkeys(topology.site_names, devices),
                             per_site)


# ------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def one_site(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """site-0's actor after one round on devices 0 and 1, with what it returned."""
    from actors.edge import spawn_edge

    cfg = config(tmp_path_factory.mktemp("one"))
    topology = ray_cluster
    stores, jobs = sharded_jobs(cfg, topology, devices=2, per_site=TASKS)
    job = jobs["site-0"]
    edge = spawn_edge(job, topology.sites[0].actor_cpus)
    try:
        params = algorithm_from_config(cfg.to_dict()).init_params()
        reply = ray.get(edge.round.remote(FlatLayout.of(params).pack(params), 1, [0, 1]))
        ask = Personalize(round=2, episodes=2, steps=2, lr=1e-3, optimizer="adam",
                          tasks_per_step=TASKS)
        answers = {"round": reply, "personalize": ray.get(edge.personalize.remote(params, ask)),
                   "info": ray.get(edge.info.remote()),
                   "sampler_state": ray.get(edge.sampler_state.remote()),
                   "manifest": ray.get(edge.manifest.remote())}
        tasks = SiteTasks(job.learner["data"], job.data_plan, job.devices, job.seed)
        batch = tasks.round_sampler([0, 1], 1)(TASKS)
        checker = LeakCheck(store_images({"site-0": stores["site-0"]}),
                            [batch.support_x, batch.query_x], label_vectors(TASKS), numel(cfg))
        yield cfg, job, answers, checker
    finally:
        ray.kill(edge)


def test_what_an_edge_returns_holds_to_the_contract_and_leaks_nothing(one_site) -> None:
    cfg, job, answers, checker = one_site
    reply = answers["round"]
    assert isinstance(reply, RoundReply) and isinstance(reply.timings, RoundTimings)
    fields = {f.name for m in (reply, reply.timings) for f in dataclasses.fields(m)}
    assert fields - {"timings"} == {"site", "round", "kind", "update", "num_tasks",
                                    "metrics", "compute_s", "compute_wait_s", "started_at",
                                    "finished_at", "device_ids", "clip_vote", "masked",
                                    "encoded", "local_steps", "idle_s", "network_s"}
    assert reply.masked is None  # masked inputs only under secure aggregation
    assert reply.encoded is None  # compressed updates only under compression
    assert reply.update.shape == (numel(cfg),) and reply.update.dtype == np.float32
    assert reply.num_tasks == TASKS and list(reply.device_ids) == [0, 1]
    assert all(isinstance(v, float) for v in reply.metrics.values())
    manifest = answers["manifest"]
    assert isinstance(manifest, StoreManifest)
    assert manifest.sha256 == job.data_plan["store_sha256"]
    assert manifest.num_classes == len(job.data_plan["characters"]) + len(job.data_plan["holdout"])
    assert answers["info"].characters == len(job.data_plan["characters"])
    site_model = answers["personalize"]
    assert isinstance(site_model, SiteModelReply) and site_model.steps == 2
    assert site_model.params.shape == (numel(cfg),) and site_model.params.dtype == np.float32
    assert set(site_model.global_scores) == set(site_model.personal_scores) == {
        "before_accuracy", "before_ci95", "after_accuracy", "after_ci95"}
    for name, value in answers.items():
        checker.check(value, name)


def test_the_checker_rejects_what_would_leak(one_site) -> None:
    """Each doctored reply carries data the shape-only check of old let through."""
    _, job, answers, checker = one_site
    reply = answers["round"]
    tasks = SiteTasks(job.learner["data"], job.data_plan, job.devices, job.seed)
    batch = tasks.round_sampler([0, 1], 1)(TASKS)
    image = load_store(job.data_plan["store"]).pixels[0, 0].numpy()
    seen = batch.support_x[1, 0, 0].numpy()  # an image as the model saw it (maybe turned)
    bias_shape = (8,)  # the conv net's biases with 8 channels
    labels = batch.support_y.reshape(-1).numpy().astype(np.float32)
    planted = reply.update.copy()
    planted[100:100 + 784] = seen.ravel()
    labelled = reply.update.copy()
    labelled[7:7 + labels.size] = labels
    contract, image_found, labels_found = ("where the contract has none",
                                           "holds an image of the site", "holds the round's labels")
    doctored = {
        "pixels as nested lists": (dataclasses.replace(
            reply, metrics={**reply.metrics, "x": (image / 255.0).tolist()}), contract),
        "raw uint8 pixels as a flat list": (
            {**dataclasses.asdict(answers["personalize"]), "x": image.ravel().tolist()},
            contract),
        "an image inside the update": (dataclasses.replace(reply, update=planted), image_found),
        "labels inside the update": (dataclasses.replace(reply, update=labelled), labels_found),
        "a label vector shaped like a bias": (
            {**dataclasses.asdict(answers["personalize"]), "bias": labels[:bias_shape[0]]},
            contract),
        "labels as device ids": (dataclasses.replace(
            reply, device_ids=tuple(int(v) for v in labels)), labels_found),
        "a tensor in the metrics": (dataclasses.replace(
            reply, metrics={**reply.metrics, "x": torch.zeros(3)}), contract),
    }
    for what, (value, why) in doctored.items():
        with pytest.raises(AssertionError, match=why):
            checker.check(value, what)
    # the content check alone also finds the pixels a contract breach carried
    with pytest.raises(AssertionError, match=image_found):
        checker.content("x", np.array((image / 255.0).tolist()))
    # and each doctoring alone is what is caught: the genuine values pass
    checker.check(reply, "round")
    checker.check(answers["personalize"], "personalize")


def test_driver_never_opens_the_data_file(ray_cluster, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    stores_root = str(cfg.run_dir / "stores")
    opened: list[str] = []

    def refuse(what: str):
        def _raise(*args: Any, **kwargs: Any) -> Any:
            opened.append(f"{what}{args[:1]}")
            raise AssertionError(f"the driver process called {what}")
        return _raise

    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if "omniglot" in str(file) or str(file).startswith(stores_root):
            opened.append(f"open({file})")
            raise AssertionError(f"the driver process opened {file}")
        return real_open(file, *args, **kwargs)

    import metalearn.data.omniglot as omniglot
    import metalearn.data.store as store

    monkeypatch.setattr(np, "load", refuse("numpy.load"))
    monkeypatch.setattr(omniglot, "load_omniglot", refuse("load_omniglot"))
    monkeypatch.setattr(omniglot, "_read", refuse("omniglot._read"))
    monkeypatch.setattr(store, "load_store", refuse("load_store"))
    monkeypatch.setattr(store, "read_manifest", refuse("read_manifest"))
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
    stores = site_stores(cfg, ray_cluster)
    assert all(Path(p, "manifest.json").is_file() for p in stores.values())  # sharded there
    assert received, "the driver received nothing through ray.get"
    kinds = {type(x).__name__ for v in received for x in (v if isinstance(v, list) else [v])}
    assert {"StoreManifest", "SiteInfo", "RoundReply"} <= kinds
    checker = LeakCheck(store_images(stores), [], label_vectors(TASKS), numel(cfg))
    for i, value in enumerate(received):
        checker.check(value, f"received[{i}]")


def test_site_compute_runs_below_the_priority_of_its_calls(ray_cluster, tmp_path: Path) -> None:
    """The edge's training thread is niced (``compute_nice``), its call-handling thread is not:
    calls reach a busy site at once instead of waiting for a time slice."""
    from actors.edge import spawn_edge

    cfg = config(tmp_path)
    topology = ray_cluster
    site = topology.sites[1]
    assert site.compute_nice == 19
    _, jobs = sharded_jobs(cfg, topology, devices=1, per_site=1)
    edge = spawn_edge(jobs[site.name], site.actor_cpus)
    try:
        nice = ray.get(edge.info.remote()).nice
        assert nice["compute"] == 19
        assert nice["calls"] < nice["compute"]
    finally:
        ray.kill(edge)
