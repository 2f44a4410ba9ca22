"""The model store: which model an id names, where its parameters live, and how to run it.

Nothing here imports Ray, so the same code backs a Serve replica, the bare FastAPI server of the
benchmark, and unit tests.

Ids (``RUN`` is a run folder's name; the first run folder served is the default run):

* ``RUN@STEP`` — the meta-model checkpoint of that step (``checkpoints/step_NNNNNN.pt``).
* ``latest`` / ``RUN@latest`` — whatever the run's ``checkpoints/latest`` pointer names *now*.
  It is resolved to ``RUN@STEP`` before any cache lookup, so a new checkpoint rolls out
  without a restart and a request never sees half of one (checkpoints are written atomically
  before the pointer moves). The pointer is stat-ed at most every ``poll_s`` seconds.
* ``RUN@site-NAME`` / ``site-NAME`` — a per-site model the federated driver wrote to
  ``adapted/site-NAME.pt``.
* ``RUN@ad-HEX`` / ``ad-HEX`` — a model made by ``/v1/adapt``, stored in ``adapted/ad-HEX.pt``
  so that any replica can load it. ``HEX`` hashes the base parameters, the support set and the
  number of steps: the same request always names the same model, and a repeat costs no inner loop.

Ids are matched against a strict pattern before any path is built from them, so an id cannot
walk out of the run folder.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from metalearn.algorithms.base import MetaAlgorithm, TaskType
from metalearn.checkpoint import (
    checkpoint_dir,
    checkpoint_path,
    latest_step,
    list_checkpoints,
)
from metalearn.params import Params

ADAPTED_DIR = "adapted"
IMAGE_SIZE = 28
ADAPTED_FORMAT = "edgemeta-adapted/1"
_RUN = r"[A-Za-z0-9_.-]{1,100}"
_VERSION = r"latest|\d{1,12}|site-[a-z0-9][a-z0-9-]{0,40}|ad-[0-9a-f]{24}"
_ID = re.compile(rf"^(?:(?P<run>{_RUN})@)?(?P<version>{_VERSION})$")
_SITE_FILE = re.compile(r"^site-([a-z0-9][a-z0-9-]{0,40})\.pt$")
_ADAPTED_FILE = re.compile(r"^(ad-[0-9a-f]{24})\.pt$")

Kind = Literal["meta", "site", "adapted"]


class StoreError(Exception):
    """An error a client caused, with the HTTP status it deserves and a message for it."""

    status = 400


class UnknownModel(StoreError):
    status = 404


class BadInput(StoreError):
    status = 422


class TooLarge(StoreError):
    status = 413


@dataclass(frozen=True)
class ModelRef:
    """A resolved model id: which run, which kind, and the file that holds the parameters."""

    run: str
    kind: Kind
    key: str  # step (as text), site name, or ad-HEX
    path: Path

    @property
    def id(self) -> str:
        return f"{self.run}@{self.key}"

    @property
    def step(self) -> int | None:
        return int(self.key) if self.kind == "meta" else None


@dataclass(frozen=True)
class ModelSpec:
    """What a run's model takes and gives, read from its ``config.yaml``.

    ``ways`` is the number of classes the model's head outputs; ``None`` for an embedding
    (ProtoNet), whose classes are those of the support set.
    """

    task_type: TaskType
    dataset: str
    algorithm: str
    ways: int | None
    max_ways: int = 64

    @staticmethod
    def from_config(config: dict[str, Any]) -> ModelSpec:
        data, alg = config["data"], config["algorithm"]
        regression = data["dataset"] == "sinusoid"
        ways = None if regression or alg["name"] == "protonet" else int(data["ways"])
        return ModelSpec("regression" if regression else "classification", data["dataset"],
                         alg["name"], ways)

    def read(self, raw: Sequence[Any] | None, packed: str | None, limit: int,
             what: str = "inputs") -> Tensor:
        """The batch of a request, from JSON numbers (``raw``) or packed float32 (``packed``)."""
        if packed is not None:
            return self.unpack(packed, limit, what)
        assert raw is not None, "the request schema requires one of the two"
        return self.inputs(raw, limit, what)

    def unpack(self, packed: str, limit: int, what: str = "inputs") -> Tensor:
        """``*_b64`` inputs: base64 of little-endian float32, row-major, whole inputs only."""
        try:
            data = base64.b64decode(packed, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadInput(f"{what}_b64: not valid base64 ({err})") from None
        per = 1 if self.dataset == "sinusoid" else IMAGE_SIZE * IMAGE_SIZE
        if len(data) % (4 * per):
            shape = "one value" if per == 1 else f"{IMAGE_SIZE}x{IMAGE_SIZE} values"
            raise BadInput(f"{what}_b64: {len(data)} bytes are not whole inputs of {shape} "
                           f"({4 * per} bytes each, little-endian float32)")
        n = len(data) // (4 * per)
        if n > limit:
            raise TooLarge(f"{what}_b64: {n} inputs exceed this server's limit of {limit}")
        values = np.frombuffer(data, dtype="<f4").astype(np.float32)  # own, writable, native
        shape = (n, 1) if per == 1 else (n, 1, IMAGE_SIZE, IMAGE_SIZE)
        return self._finite(torch.from_numpy(values.reshape(shape)), what)

    def inputs(self, raw: Sequence[Any], limit: int, what: str = "inputs") -> Tensor:
        """A float32 batch in the layout training used: ``[N, 1, 28, 28]`` or ``[N, 1]``."""
        if len(raw) > limit:
            raise TooLarge(f"{what}: {len(raw)} inputs exceed this server's limit of {limit}")
        if not raw:
            raise BadInput(f"{what}: at least one input is needed")
        try:  # numpy reads nested lists ~2.5x faster than torch.tensor (13 vs 34 µs an image)
            with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                x = torch.from_numpy(np.array(raw, dtype=np.float32))
        except (ValueError, TypeError) as err:
            raise BadInput(f"{what}: inputs must all have the same shape ({err})") from None
        if self.dataset == "sinusoid":
            if x.dim() == 1:
                x = x.unsqueeze(-1)
            if x.dim() != 2 or x.shape[1] != 1:
                raise BadInput(f"{what}: each input must be one number (a sinusoid x value) "
                               f"or a one-element list; got shape {list(x.shape[1:])} per input")
        else:
            if x.dim() != 3 or tuple(x.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
                raise BadInput(f"{what}: each input must be a {IMAGE_SIZE}x{IMAGE_SIZE} image "
                               f"({IMAGE_SIZE} rows of {IMAGE_SIZE} numbers); got shape "
                               f"{list(x.shape[1:])} per input")
            x = x.unsqueeze(1)
        return self._finite(x, what)

    @staticmethod
    def _finite(x: Tensor, what: str) -> Tensor:
        if not bool(torch.isfinite(x).all()):
            raise BadInput(f"{what}: values must be finite float32 numbers (NaN, infinity or "
                           f"beyond float32's range found)")
        return x

    def targets(self, raw: Sequence[Any], n: int) -> Tensor:
        """Support labels (int64, classification) or targets (``[N, 1]`` float32)."""
        if len(raw) != n:
            raise BadInput(f"support_labels has {len(raw)} entries but there are {n} inputs")
        if self.task_type == "regression":
            y = torch.tensor([float(v) for v in raw], dtype=torch.float32).unsqueeze(-1)
            if not bool(torch.isfinite(y).all()):
                raise BadInput("support_labels: targets must be finite float32 numbers")
            return y
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise BadInput("support_labels: a classification model needs integer class labels")
        classes = sorted(set(raw))
        ways = self.ways if self.ways is not None else self.max_ways
        if len(classes) > ways:
            raise BadInput(f"support_labels: the support set has {len(classes)} classes but "
                           f"the model has {ways} outputs")
        if classes[0] < 0 or classes[-1] >= ways:
            bad = classes[0] if classes[0] < 0 else classes[-1]
            raise BadInput(f"support_labels: label {bad} is out of range for a {ways}-way "
                           f"model (labels are 0..{ways - 1})")
        if self.ways is None and classes != list(range(len(classes))):
            raise BadInput(f"support_labels: labels must be 0..k-1 with every class present; "
                           f"got classes {classes}")
        return torch.tensor(raw, dtype=torch.int64)


def batch_independent(model: nn.Module) -> bool:
    """Whether one input's output is independent of the other inputs in its batch.

    MAML's BatchNorm keeps no running statistics: it normalises with the statistics of the
    batch at hand, so stacking two clients' requests into one forward pass would change both
    answers. Only models without batch normalisation may be concatenated across requests.
    """
    return not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def fingerprint(params: Params) -> str:
    """A digest of parameter values (names, dtypes, shapes, bytes), for content-derived ids."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapted_key(base_fingerprint: str, support_x: Tensor, support_y: Tensor,
                steps: int) -> str:
    """``ad-HEX``: the same base parameters, support set and steps give the same key."""
    h = hashlib.sha256(f"{ADAPTED_FORMAT}|{base_fingerprint}|{steps}|".encode())
    for t in (support_x, support_y):
        t = t.detach().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return "ad-" + h.hexdigest()[:24]


@dataclass
class LoadedModel:
    """Parameters in memory with the run's algorithm (shared) that adapts and runs them."""

    ref: ModelRef
    params: Params
    algorithm: MetaAlgorithm
    spec: ModelSpec
    batch_independent: bool
    fingerprint: str = ""
    groupable: bool = True  # predict_groups worked (or was not tried yet)

    @property
    def id(self) -> str:
        return self.ref.id


def _params_of(obj: Any, path: Path) -> Params:
    """Parameters from a checkpoint-like file: ``{"params": {...}}`` or a bare dict."""
    if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        obj = obj["params"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UnknownModel(f"{path.name} holds no parameter dict")
    return dict(obj)


def replace_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file and ``os.replace`` it in: readers see all of it or nothing.

    Unlike checkpoints, adapted models skip ``fsync``: a crash may lose one, but the same
    request recreates it under the same id, and an fsync per ``/adapt`` costs milliseconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UnknownModel(f"model file {path.name} disappeared") from None


class RunStore:
    """One run folder: its config, algorithm, checkpoints, site models and adapted models."""

    def __init__(self, run_dir: str | Path, poll_s: float = 0.2,
                 algorithm_factory: Callable[[dict[str, Any]], MetaAlgorithm] | None = None
                 ) -> None:
        self.run_dir = Path(run_dir).resolve()
        config_file = self.run_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder: config.yaml is missing")
        self.name = self.run_dir.name
        if not re.fullmatch(_RUN, self.name):
            raise ValueError(f"run folder name {self.name!r} is not a valid run id")
        self.config: dict[str, Any] = yaml.safe_load(config_file.read_text())
        self.spec = ModelSpec.from_config(self.config)
        self.poll_s = float(poll_s)
        self._factory = algorithm_factory
        self._algorithm: MetaAlgorithm | None = None
        self._latest: int | None = None
        self._latest_sig: tuple[int, int, int] | None = None
        self._latest_checked = float("-inf")
        self._lock = threading.Lock()

    @property
    def algorithm(self) -> MetaAlgorithm:
        """The algorithm of the run, rebuilt from its config exactly as training built it."""
        if self._algorithm is None:
            if self._factory is None:
                from metalearn.from_config import algorithm_from_config

                self._factory = algorithm_from_config
            self._algorithm = self._factory(self.config)
        return self._algorithm

    @property
    def adapted_dir(self) -> Path:
        return self.run_dir / ADAPTED_DIR

    def latest(self) -> int | None:
        """The step ``latest`` names, re-read only when the pointer file changed.

        A stat at most every ``poll_s`` keeps this cheap on the request path; ``os.replace``
        gives the pointer a new inode, so a change is seen even within one mtime tick.
        """
        now = time.monotonic()
        if now - self._latest_checked < self.poll_s:
            return self._latest
        with self._lock:
            self._latest_checked = now
            pointer = checkpoint_dir(self.run_dir) / "latest"
            try:
                st = os.stat(pointer)
            except FileNotFoundError:
                self._latest, self._latest_sig = None, None
                return None
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if sig != self._latest_sig:
                try:
                    self._latest = latest_step(self.run_dir)
                    self._latest_sig = sig
                except (FileNotFoundError, ValueError):
                    pass  # replaced between stat and read, or torn by hand: keep the last one
            return self._latest

    def ref(self, version: str) -> ModelRef:
        """The model ``version`` names in this run; :class:`UnknownModel` if there is none."""
        if version == "latest":
            step = self.latest()
            if step is None:
                raise UnknownModel(f"run {self.name!r} has no checkpoint yet")
            return ModelRef(self.name, "meta", str(step), checkpoint_path(self.run_dir, step))
        if version.isdigit():
            step = int(version)
            path = checkpoint_path(self.run_dir, step)
            if not path.is_file():
                raise UnknownModel(f"run {self.name!r} has no checkpoint for step {step}; "
                                   f"steps: {list_checkpoints(self.run_dir)[-20:]}")
            return ModelRef(self.name, "meta", str(step), path)
        kind: Kind = "site" if version.startswith("site-") else "adapted"
        path = self.adapted_dir / f"{version}.pt"
        if not path.is_file():
            what = "per-site model" if kind == "site" else "adapted model"
            raise UnknownModel(f"run {self.name!r} has no {what} {version!r}")
        return ModelRef(self.name, kind, version, path)

    def load(self, ref: ModelRef) -> LoadedModel:
        """Read a model's parameters from disk (no caching here: callers cache)."""
        params = _params_of(_torch_load(ref.path), ref.path)
        algorithm = self.algorithm
        return LoadedModel(ref, params, algorithm, self.spec, batch_independent(algorithm.model),
                           fingerprint(params))

    def save_adapted(self, key: str, params: Params, base: ModelRef, steps: int,
                     support_size: int) -> ModelRef:
        """Persist an adapted model atomically, so every replica can load it by its id."""
        buf = io.BytesIO()
        torch.save({"format": ADAPTED_FORMAT, "params": {k: v.detach().contiguous()
                                                          for k, v in params.items()},
                    "base": base.id, "steps": steps, "support_size": support_size,
                    "created_s": time.time()}, buf)
        path = self.adapted_dir / f"{key}.pt"
        replace_atomically(path, buf.getvalue())
        return ModelRef(self.name, "adapted", key, path)

    def listing(self, limit: int) -> dict[str, Any]:
        latest = self.latest()
        metas = [{"id": f"{self.name}@{s}", "run": self.name, "step": s, "latest": s == latest}
                 for s in list_checkpoints(self.run_dir)]
        sites, adapted = [], []
        if self.adapted_dir.is_dir():
            for entry in os.scandir(self.adapted_dir):
                if (m := _SITE_FILE.match(entry.name)) is not None:
                    st = entry.stat()
                    sites.append({"id": f"{self.name}@site-{m.group(1)}", "run": self.name,
                                  "site": m.group(1), "bytes": st.st_size,
                                  "modified": st.st_mtime})
                elif (m := _ADAPTED_FILE.match(entry.name)) is not None:
                    st = entry.stat()
                    adapted.append({"id": f"{self.name}@{m.group(1)}", "run": self.name,
                                    "bytes": st.st_size, "modified": st.st_mtime})
        adapted.sort(key=lambda a: a["modified"], reverse=True)
        run = {"run": self.name, "algorithm": self.spec.algorithm, "dataset": self.spec.dataset,
               "task_type": self.spec.task_type, "ways": self.spec.ways,
               "latest": None if latest is None else f"{self.name}@{latest}"}
        return {"run": run, "meta_models": metas, "site_models": sorted(sites,
                                                                          key=lambda s: s["id"]),
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
    """All served runs; resolves ids, loads parameters, adapts and predicts.

    ``cache_size`` > 0 keeps an LRU of loaded models here; a Serve replica passes 0 and lets
    ``@serve.multiplexed`` be the cache, keyed by resolved ids.
    """

    def __init__(self, run_dirs: Sequence[str | Path], poll_s: float = 0.2, cache_size: int = 0,
                 algorithm_factory: Callable[[dict[str, Any]], MetaAlgorithm] | None = None
                 ) -> None:
        if not run_dirs:
            raise ValueError("serve at least one run folder")
        self.runs: dict[str, RunStore] = {}
        for d in run_dirs:
            run = RunStore(d, poll_s, algorithm_factory)
            if run.name in self.runs:
                raise ValueError(f"two run folders are named {run.name!r}; names must differ")
            self.runs[run.name] = run
        self.default_run = next(iter(self.runs))
        self.cache: LRUCache[str, LoadedModel] = LRUCache(cache_size)

    def resolve(self, model_id: str) -> ModelRef:
        m = _ID.match(model_id)
        if m is None:
            raise UnknownModel(f"{model_id[:200]!r} is not a model id; use `latest`, "
                               "`RUN@STEP`, `RUN@latest`, `RUN@site-NAME` or an id from /v1/adapt")
        run_name = m.group("run") or self.default_run
        run = self.runs.get(run_name)
        if run is None:
            raise UnknownModel(f"unknown run {run_name!r}; serving {sorted(self.runs)}")
        return run.ref(m.group("version"))

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
        existing = run.adapted_dir / f"{key}.pt"
        if existing.is_file():
            ref = ModelRef(run.name, "adapted", key, existing)
            return AdaptResult(ref, run.load(ref).params, n_steps, False, 0.0)
        t0 = time.perf_counter()
        with torch.enable_grad():
            adapted = algorithm.adapt(base.params, support_x, support_y, steps=n_steps)
        adapted = {k: v.detach() for k, v in adapted.items()}
        ms = (time.perf_counter() - t0) * 1e3
        ref = run.save_adapted(key, adapted, base.ref, n_steps, int(support_x.shape[0]))
        return AdaptResult(ref, adapted, n_steps, True, ms)

    def listing(self, limit: int = 200) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": [], "meta_models": [], "site_models": [],
                               "adapted_models": [], "adapted_total": 0}
        for run in self.runs.values():
            part = run.listing(limit)
            out["runs"].append(part["run"])
            for k in ("meta_models", "site_models", "adapted_models"):
                out[k].extend(part[k])
            out["adapted_total"] += part["adapted_total"]
        out["adapted_models"] = out["adapted_models"][:limit]
        return out


def outputs_to_prediction(task_type: TaskType, out: Tensor) -> dict[str, Any]:
    """Logits to probabilities + labels, or regression outputs to a list of values."""
    if task_type == "classification":
        probs = torch.softmax(out.float(), dim=-1)
        return {"task_type": task_type, "labels": probs.argmax(-1).tolist(),
                "probabilities": probs.tolist()}
    return {"task_type": task_type, "values": out.reshape(out.shape[0], -1)[:, 0].tolist()}


@torch.no_grad()
def predict_one(model: LoadedModel, x: Tensor) -> Tensor:
    """Raw outputs of one request, exactly as ``algorithm.predict`` gives them offline."""
    return model.algorithm.predict(model.params, x)


def passes(sizes: Sequence[int], max_images: int) -> list[slice]:
    """Consecutive runs of requests, each run holding at most ``max_images`` inputs (a
    request larger than that runs alone): the sizes of the forward passes ``predict_many``
    makes.

    Why a cap: one pass over many small requests beats a pass each, but past a few dozen
    inputs a pass gets slower per input (the activations outgrow the cache, we think). With
    the 64-filter Omniglot net on this CPU (``benchmarks/bench_group_forward.py --images N``),
    32 one-image requests took 4-6 ms in one pass against 20 ms one by one; 32 eight-image
    requests took 36 ms in one pass, 42 ms one by one, and 29 ms in passes of at most 32
    images (16 requests: 35, 22 and 17 ms).
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, not {max_images}")
    out: list[slice] = []
    start, images = 0, 0
    for i, n in enumerate(sizes):
        if i > start and images + n > max_images:
            out.append(slice(start, i))
            start, images = i, 0
        images += n
    if sizes:
        out.append(slice(start, len(sizes)))
    return out


@torch.no_grad()
def predict_many(items: Sequence[tuple[LoadedModel, Tensor]],
                 max_images: int = 32) -> list[Tensor]:
    """Outputs for many requests, with as few forward passes as leave every answer unchanged.

    * Batch-independent models (no BatchNorm): one forward over the concatenated inputs.
    * Batch-statistics models (MAML's nets): requests with the same input shape are stacked
      and run through ``algorithm.predict_groups``, which keeps one set of BatchNorm
      statistics per request while the convolutions run as one large call
      (:mod:`metalearn.group_forward`; ``vmap`` for other architectures). If that fails,
      requests run one by one.

    A pass holds at most ``max_images`` inputs (see :func:`passes`). Either way a batched
    answer equals the unbatched one (to float rounding, ~1e-6).
    """
    results: list[Tensor | None] = [None] * len(items)
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, (model, x) in enumerate(items):
        shape = () if model.batch_independent else tuple(x.shape)
        groups.setdefault((model.id, shape), []).append(i)
    for same in groups.values():
        model = items[same[0]][0]
        for run in passes([int(items[i][1].shape[0]) for i in same], max_images):
            idx = same[run]
            for i, out in zip(idx, _one_pass(model, [items[i][1] for i in idx]), strict=True):
                results[i] = out
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _one_pass(model: LoadedModel, xs: list[Tensor]) -> Sequence[Tensor]:
    """Outputs of one model for requests ``xs`` (same shape unless batch-independent)."""
    if len(xs) > 1 and model.batch_independent:
        return model.algorithm.predict(model.params, torch.cat(xs)).split(
            [x.shape[0] for x in xs])
    if len(xs) > 1 and model.groupable:
        try:
            return model.algorithm.predict_groups(model.params, torch.stack(xs)).unbind(0)
        except Exception:  # cannot be grouped (data-dependent control flow, ...): loop
            model.groupable = False
    return [model.algorithm.predict(model.params, x) for x in xs]
