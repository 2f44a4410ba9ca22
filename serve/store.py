"""The model store: which model an id names, where its parameters live, and how to adapt them.

Nothing here imports Ray, so the same code backs the Serve ingress (which resolves ids), the
model replicas (which load and adapt), the bare FastAPI server of the benchmark, and unit tests.

Ids (``RUN`` is a run folder's name; the first run folder served is the default run):

* ``RUN@STEP`` — the meta-model checkpoint of that step (``checkpoints/step_NNNNNN.pt``).
* ``latest`` / ``RUN@latest`` — whatever the run's ``checkpoints/latest`` pointer names *now*.
  It is resolved to ``RUN@STEP`` before any cache lookup, so a new checkpoint rolls out
  without a restart and a request never sees half of one (checkpoints are written atomically
  before the pointer moves). The pointer is stat-ed at most every ``poll_s`` seconds.
* ``RUN@site-NAME`` / ``site-NAME`` — site NAME's personalized model
  (:mod:`metalearn.site_models`: the meta-model fine-tuned on the site's own tasks), written
  to ``adapted/site-NAME.pt`` by the federated driver at the end of training, or by
  ``edgemeta site onboard`` for a site that joined later.
* ``RUN@ad-HEX`` / ``ad-HEX`` — a model made by ``/v1/adapt``, stored in ``adapted/ad-HEX.pt``
  so that any replica can load it. ``HEX`` hashes the base parameters, the support set and the
  number of steps: the same request always names the same model, and a repeat costs no inner loop.
  The adapted models of a run folder are bounded (:mod:`serve.quota`: count, bytes, optional
  TTL; least recently used evicted first), so an evicted ``ad-HEX`` is unknown until the same
  request makes it again.

:meth:`ModelStore.resolve` turns any of these into a :class:`ModelRef`, whose ``id``
(``RUN@STEP``, ``RUN@site-NAME``, ``RUN@ad-HEX``) is canonical: one spelling per model, and one
model per spelling, for as long as the file exists. Canonical ids key every model cache and
route requests between replicas; :meth:`ModelStore.locate` maps one back to its file without
resolving anything. Ids are matched against a strict pattern before any path is built from them,
so an id cannot walk out of the run folder.

A run folder is a local folder or a URI in run storage (``s3://bucket/runs/NAME``, see
:mod:`metalearn.storage`): replicas on different nodes then read each other's adapted models and
the driver's checkpoints without a shared disk. Locally the ``latest`` pointer is stat-ed and
re-read only when it changed; in an object store it is re-read (a GET of a few bytes) at most
every ``poll_s``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch
import yaml
from torch import Tensor, nn

from metalearn.algorithms.base import MetaAlgorithm
from metalearn.checkpoint import (
    checkpoint_dir,
    checkpoint_path,
    latest_step,
    list_checkpoints,
    read_torch,
)
from metalearn.params import Params
from metalearn.site_models import SITE_MODELS_DIR, site_model_path
from metalearn.storage import Location, PathLike, location
from serve.adapted import ADAPTED_FORMAT, adapted_key, fingerprint, replace_atomically
from serve.errors import UnknownModel
from serve.quota import Entry, StoreQuota, Usage, evictions
from serve.signature import ModelSignature

ADAPTED_DIR = SITE_MODELS_DIR  # /v1/adapt's models beside the site models
_RUN = r"[A-Za-z0-9_.-]{1,100}"
_VERSION = r"latest|\d{1,12}|site-[a-z0-9][a-z0-9-]{0,40}|ad-[0-9a-f]{24}"
_ID = re.compile(rf"^(?:(?P<run>{_RUN})@)?(?P<version>{_VERSION})$")
_SITE_FILE = re.compile(r"^site-([a-z0-9][a-z0-9-]{0,40})\.pt$")
_ADAPTED_FILE = re.compile(r"^(ad-[0-9a-f]{24})\.pt$")

Kind = Literal["meta", "site", "adapted"]


def batch_independent(model: nn.Module) -> bool:
    """Whether one input's output is independent of the other inputs in its batch.

    MAML's BatchNorm keeps no running statistics: it normalises with the statistics of the
    batch at hand, so stacking two clients' requests into one forward pass would change both
    answers. Only models without batch normalisation may be concatenated across requests.
    """
    return not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


@dataclass(frozen=True)
class ModelRef:
    """A resolved model id: which run, which kind, and the file that holds the parameters."""

    run: str
    kind: Kind
    key: str  # step (as text, no leading zeros), site-NAME, or ad-HEX
    path: Location

    @property
    def id(self) -> str:
        """The canonical id: what caches are keyed by and what requests are routed by."""
        return f"{self.run}@{self.key}"

    @property
    def step(self) -> int | None:
        return int(self.key) if self.kind == "meta" else None


@dataclass
class LoadedModel:
    """Parameters in memory with the run's algorithm (shared) that adapts and runs them."""

    ref: ModelRef
    params: Params
    algorithm: MetaAlgorithm
    signature: ModelSignature
    batch_independent: bool
    fingerprint: str = ""
    groupable: bool = True  # predict_groups worked (or was not tried yet)

    @property
    def id(self) -> str:
        return self.ref.id


def _read_params(path: Location) -> Params:
    """Parameters from a checkpoint-like file: ``{"params": {...}}`` or a bare dict."""
    try:
        obj = read_torch(path)
    except FileNotFoundError:
        raise UnknownModel(f"model file {path.name} disappeared") from None
    if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        obj = obj["params"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UnknownModel(f"{path.name} holds no parameter dict")
    return dict(obj)


class RunStore:
    """One run folder: its config, algorithm, checkpoints, site models and adapted models."""

    def __init__(self, run_dir: PathLike, poll_s: float = 0.2,
                 algorithm_factory: Callable[[dict[str, Any]], MetaAlgorithm] | None = None,
                 quota: StoreQuota | None = None) -> None:
        self.quota = quota
        self.run_dir = location(run_dir).resolve()
        try:
            config_text = (self.run_dir / "config.yaml").read_text()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{run_dir} is not a run folder: config.yaml is missing"
                                    ) from None
        self.name = self.run_dir.name
        if not re.fullmatch(_RUN, self.name):
            raise ValueError(f"run folder name {self.name!r} is not a valid run id")
        self.config: dict[str, Any] = yaml.safe_load(config_text)
        self.signature = ModelSignature.from_config(self.config)
        self.poll_s = float(poll_s)
        self._factory = algorithm_factory
        self._algorithm: MetaAlgorithm | None = None
        self._latest: int | None = None
        self._latest_sig: tuple[int, int, int] | None = None
        self._latest_checked = float("-inf")
        self._lock = threading.Lock()

    @property
    def algorithm(self) -> MetaAlgorithm:
        """The algorithm of the run, rebuilt from its config exactly as training built it
        (on first use: the ingress, which never runs a model, never builds one)."""
        if self._algorithm is None:
            if self._factory is None:
                from metalearn.from_config import algorithm_from_config

                self._factory = algorithm_from_config
            self._algorithm = self._factory(self.config)
        return self._algorithm

    @property
    def adapted_dir(self) -> Location:
        return self.run_dir / ADAPTED_DIR

    def latest(self) -> int | None:
        """The step ``latest`` names, re-read only when the pointer file changed.

        A look at most every ``poll_s`` keeps this cheap on the request path. Locally it is a
        stat, and ``os.replace`` gives the pointer a new inode, so a change is seen even
        within one mtime tick; in an object store the pointer is simply read again.
        """
        now = time.monotonic()
        if now - self._latest_checked < self.poll_s:
            return self._latest
        with self._lock:
            self._latest_checked = now
            pointer = checkpoint_dir(self.run_dir) / "latest"
            try:
                sig = pointer.change_marker()
            except FileNotFoundError:
                self._latest, self._latest_sig = None, None
                return None
            if sig is None or sig != self._latest_sig:
                try:
                    self._latest = latest_step(self.run_dir)
                    self._latest_sig = sig
                except (FileNotFoundError, ValueError, OSError):
                    pass  # replaced between stat and read, torn by hand, or the store did
                    # not answer this time: keep the last one
            return self._latest

    def at(self, key: str) -> ModelRef:
        """The reference for a canonical key (a step without leading zeros, ``site-NAME`` or
        ``ad-HEX``): a name-to-path mapping that reads nothing from disk."""
        if key.isdigit():
            return ModelRef(self.name, "meta", key, checkpoint_path(self.run_dir, int(key)))
        if key.startswith("site-"):
            return ModelRef(self.name, "site", key, site_model_path(self.run_dir, key[5:]))
        return ModelRef(self.name, "adapted", key, self.adapted_dir / f"{key}.pt")

    def resolve(self, version: str) -> ModelRef:
        """The model ``version`` names in this run now; :class:`UnknownModel` if there is none."""
        if version == "latest":
            step = self.latest()
            if step is None:
                raise UnknownModel(f"run {self.name!r} has no checkpoint yet")
            return self.at(str(step))
        if version.isdigit():
            ref = self.at(str(int(version)))
            if not ref.path.is_file():
                raise UnknownModel(f"run {self.name!r} has no checkpoint for step {ref.key}; "
                                   f"steps: {list_checkpoints(self.run_dir)[-20:]}")
            return ref
        ref = self.at(version)
        if not ref.path.is_file():
            what = "per-site model" if ref.kind == "site" else "adapted model"
            raise UnknownModel(f"run {self.name!r} has no {what} {version!r}")
        return ref

    def load(self, ref: ModelRef) -> LoadedModel:
        """Read a model's parameters from disk (no caching here: callers cache)."""
        params = _read_params(ref.path)
        if ref.kind == "adapted":
            self.touch(ref)
        algorithm = self.algorithm
        return LoadedModel(ref, params, algorithm, self.signature,
                           batch_independent(algorithm.model), fingerprint(params))

    def save_adapted(self, key: str, params: Params, base: ModelRef, steps: int,
                     support_size: int) -> ModelRef:
        """Persist an adapted model atomically, so every replica can load it by its id."""
        buf = io.BytesIO()
        torch.save({"format": ADAPTED_FORMAT, "params": {k: v.detach().contiguous()
                                                          for k, v in params.items()},
                    "base": base.id, "steps": steps, "support_size": support_size,
                    "created_s": time.time()}, buf)
        ref, data = self.at(key), buf.getvalue()
        self.enforce_quota(Entry(key, len(data), time.time()))  # room first: never over
        replace_atomically(ref.path, data)
        return ref

    # ------------------------------------------------------------ the adapted models' quota

    def touch(self, ref: ModelRef) -> None:
        """Mark an adapted model used now: its modification time is its last use (LRU)."""
        if not ref.path.is_local:
            return  # objects keep their write time: in an object store, least recently made
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: params are in hand
            os.utime(ref.path.path)

    def adapted_entries(self) -> list[Entry]:
        """The adapted models stored now (not the per-site models, which the driver owns)."""
        try:
            files = self.adapted_dir.files()
        except FileNotFoundError:  # a file evicted by another replica while listed
            files = self.adapted_dir.files()
        return [Entry(m.group(1), f.size, f.mtime) for f in files
                if (m := _ADAPTED_FILE.match(f.name)) is not None]

    def enforce_quota(self, incoming: Entry | None = None) -> Usage:
        """Delete what :func:`serve.quota.evictions` picks, counting ``incoming`` (a model about
        to be written, which is kept) as stored; what is left, ``incoming`` included."""
        entries = [e for e in self.adapted_entries() if incoming is None or e.key != incoming.key]
        if incoming is not None:
            entries.append(incoming)
        if self.quota is None:
            return Usage(len(entries), sum(e.bytes for e in entries))
        keep = () if incoming is None else (incoming.key,)
        gone = set(evictions(entries, self.quota, time.time(), keep))
        for key in gone:
            self.at(key).path.unlink(missing_ok=True)
        left = [e for e in entries if e.key not in gone]
        return Usage(len(left), sum(e.bytes for e in left))

    def listing(self, limit: int) -> dict[str, Any]:
        latest = self.latest()
        metas = [{"id": f"{self.name}@{s}", "run": self.name, "step": s, "latest": s == latest}
                 for s in list_checkpoints(self.run_dir)]
        sites, adapted = [], []
        for entry in self.adapted_dir.files():
            if (m := _SITE_FILE.match(entry.name)) is not None:
                sites.append({"id": f"{self.name}@site-{m.group(1)}", "run": self.name,
                              "site": m.group(1), "bytes": entry.size,
                              "modified": entry.mtime})
            elif (m := _ADAPTED_FILE.match(entry.name)) is not None:
                adapted.append({"id": f"{self.name}@{m.group(1)}", "run": self.name,
                                "bytes": entry.size, "modified": entry.mtime})
        adapted.sort(key=lambda a: a["modified"], reverse=True)
        sig = self.signature
        run = {"run": self.name, "algorithm": sig.algorithm, "dataset": sig.dataset,
               "task_type": sig.task_type, "ways": sig.ways,
               "input_shape": list(sig.input_shape),
               "latest": None if latest is None else f"{self.name}@{latest}",
               "adapted_models": len(adapted), "adapted_bytes": sum(a["bytes"] for a in adapted)}
        return {"run": run, "meta_models": metas,
                "site_models": sorted(sites, key=lambda s: s["id"]),
                "adapted_models": adapted[:limit], "adapted_total": len(adapted)}


K = TypeVar("K")
V = TypeVar("V")


@dataclass
class LRUCache(Generic[K, V]):
    """A small least-recently-used map (for callers outside Serve's ``@serve.multiplexed``)."""

    capacity: int
    _items: OrderedDict[K, V] = field(default_factory=OrderedDict)

    def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


@dataclass
class AdaptResult:
    ref: ModelRef
    params: Params
    steps: int
    created: bool
    adapt_ms: float


class ModelStore:
    """All served runs; resolves ids, loads parameters, adapts.

    ``cache_size`` > 0 keeps an LRU of loaded models here; a Serve model replica passes 0 and
    lets ``@serve.multiplexed`` be the cache, keyed by canonical ids.
    """

    def __init__(self, run_dirs: Sequence[PathLike], poll_s: float = 0.2, cache_size: int = 0,
                 algorithm_factory: Callable[[dict[str, Any]], MetaAlgorithm] | None = None,
                 quota: StoreQuota | None = None) -> None:
        if not run_dirs:
            raise ValueError("serve at least one run folder")
        self.quota = quota
        self.runs: dict[str, RunStore] = {}
        for d in run_dirs:
            run = RunStore(d, poll_s, algorithm_factory, quota)
            if run.name in self.runs:
                raise ValueError(f"two run folders are named {run.name!r}; names must differ")
            self.runs[run.name] = run
        self.default_run = next(iter(self.runs))
        self.cache: LRUCache[str, LoadedModel] = LRUCache(cache_size)

    def resolve(self, model_id: str) -> ModelRef:
        """Any id a client may send, to the one model it names now (404 if none)."""
        m = _ID.match(model_id)
        if m is None:
            raise UnknownModel(f"{model_id[:200]!r} is not a model id; use `latest`, "
                               "`RUN@STEP`, `RUN@latest`, `RUN@site-NAME` or an id from /v1/adapt")
        run_name = m.group("run") or self.default_run
        run = self.runs.get(run_name)
        if run is None:
            raise UnknownModel(f"unknown run {run_name!r}; serving {sorted(self.runs)}")
        return run.resolve(m.group("version"))

    def locate(self, canonical_id: str) -> ModelRef:
        """The reference a canonical id (:attr:`ModelRef.id`) stands for, resolving nothing.

        A model replica's loader is only ever given ids the ingress resolved, so a moving name
        (``latest``), a short form or a non-canonical step here is a bug upstream, not a
        client's error: ``ValueError``.
        """
        m = _ID.match(canonical_id)
        run = self.runs.get(m.group("run") or "") if m is not None else None
        version = m.group("version") if m is not None else ""
        moving = version == "latest" or (version.isdigit() and str(int(version)) != version)
        if run is None or moving:
            raise ValueError(f"{canonical_id[:200]!r} is not a canonical model id of this store")
        return run.at(version)

    def run_of(self, ref: ModelRef) -> RunStore:
        return self.runs[ref.run]

    def load(self, ref: ModelRef) -> LoadedModel:
        return self.run_of(ref).load(ref)

    def get(self, model_id: str) -> LoadedModel:
        """Resolve and load through this store's own LRU (outside Serve)."""
        ref = self.resolve(model_id)
        model = self.cache.get(ref.id)
        if model is None:
            model = self.load(ref)
            self.cache.put(ref.id, model)
        return model

    def adapt(self, base: LoadedModel, support_x: Tensor, support_y: Tensor,
              steps: int | None) -> AdaptResult:
        """Run the algorithm's own inner loop (as in training) and persist the result.

        An adaptation that already exists on disk (same content id) is loaded, not recomputed.
        """
        algorithm = base.algorithm
        n_steps = algorithm.test_steps if steps is None else int(steps)
        key = adapted_key(base.fingerprint, support_x, support_y, n_steps)
        run = self.run_of(base.ref)
        existing = run.at(key)
        if existing.path.is_file():
            try:
                params = _read_params(existing.path)
            except UnknownModel:
                pass  # evicted between the check and the read: adapt again, under the same id
            else:
                run.touch(existing)
                return AdaptResult(existing, params, n_steps, False, 0.0)
        t0 = time.perf_counter()
        with torch.enable_grad():
            adapted = algorithm.adapt(base.params, support_x, support_y, steps=n_steps)
        adapted = {k: v.detach() for k, v in adapted.items()}
        ms = (time.perf_counter() - t0) * 1e3
        ref = run.save_adapted(key, adapted, base.ref, n_steps, int(support_x.shape[0]))
        return AdaptResult(ref, adapted, n_steps, True, ms)

    def listing(self, limit: int = 200) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": [], "meta_models": [], "site_models": [],
                               "adapted_models": [], "adapted_total": 0,
                               "adapted_quota": None if self.quota is None
                               else self.quota.describe()}
        for run in self.runs.values():
            part = run.listing(limit)
            out["runs"].append(part["run"])
            for k in ("meta_models", "site_models", "adapted_models"):
                out[k].extend(part[k])
            out["adapted_total"] += part["adapted_total"]
        out["adapted_models"] = out["adapted_models"][:limit]
        return out
