"""A site store: one site's examples on its own node, and a manifest that says what they are.

A store is a folder holding exactly two files:

* ``examples.npy`` — every example of the site as ``uint8 [rows, H, W]`` (ink 255), the rows of
  one class contiguous, classes in manifest order;
* ``manifest.json`` — format and version, the source data set, the image shape, the classes
  (name, group, example count, first row), the sha256 of the examples' bytes, and how the
  store was made (the partition spec, so that re-sharding can say "up to date").

The manifest is what a site reports to the cloud (counts and names, never examples); the cloud
plans from it. Classes are whole: every drawing of a character is in the one store that holds
it. ``offset`` and ``count`` per class let a store hold classes with different example counts;
:func:`load_store` needs equal counts today (the episode sampler takes ``[classes, n, H, W]``),
and refuses other stores with the reason.

Written atomically: a new store is built in a temporary sibling folder and renamed into place,
so a reader sees the old store or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "edgemeta-site-store"
VERSION = 1
MANIFEST = "manifest.json"
EXAMPLES = "examples.npy"


class StoreError(ValueError):
    """A store that is missing, malformed, or does not hold what its manifest says."""


@dataclass(frozen=True)
class StoreClass:
    """One class of a store: its name, group (Omniglot: the alphabet), example count and first
    row in ``examples.npy``."""

    name: str
    group: str
    count: int
    offset: int


@dataclass(frozen=True)
class StoreManifest:
    """What a store holds, without its examples: safe to send to the cloud."""

    version: int
    source: Mapping[str, Any]
    image_shape: tuple[int, int]
    classes: tuple[StoreClass, ...]
    rows: int
    sha256: str
    partition: Mapping[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> list[int]:
        return [c.count for c in self.classes]

    @property
    def groups(self) -> list[str]:
        """The distinct groups, sorted."""
        return sorted({c.group for c in self.classes})

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "source": dict(self.source),
                "image_shape": list(self.image_shape),
                "classes": [asdict(c) for c in self.classes],
                "examples": {"file": EXAMPLES, "rows": self.rows, "dtype": "uint8",
                             "sha256": self.sha256},
                "partition": dict(self.partition)}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> StoreManifest:
        try:
            if raw["format"] != FORMAT:
                raise StoreError(f"{where}: format {raw['format']!r} is not {FORMAT!r}")
            if raw["version"] != VERSION:
                raise StoreError(f"{where}: store format version {raw['version']} is not the "
                                 f"{VERSION} this code reads; re-shard it (edgemeta data shard)")
            classes = tuple(StoreClass(str(c["name"]), str(c["group"]), int(c["count"]),
                                       int(c["offset"])) for c in raw["classes"])
            examples = raw["examples"]
            manifest = cls(version=int(raw["version"]), source=dict(raw["source"]),
                           image_shape=tuple(int(s) for s in raw["image_shape"]),  # type: ignore[arg-type]
                           classes=classes, rows=int(examples["rows"]),
                           sha256=str(examples["sha256"]), partition=dict(raw["partition"]))
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        """The manifest agrees with itself: classes tile the rows in order, counts positive."""
        if len(self.image_shape) != 2 or min(self.image_shape) < 1:
            raise StoreError(f"{where}: image_shape {list(self.image_shape)} is not [H, W]")
        row = 0
        for c in self.classes:
            if c.count < 1 or c.offset != row:
                raise StoreError(f"{where}: class {c.name!r} has count {c.count} at offset "
                                 f"{c.offset}; expected a positive count at offset {row}")
            row += c.count
        if row != self.rows:
            raise StoreError(f"{where}: the classes cover {row} rows, the manifest says "
                             f"{self.rows}")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise StoreError(f"{where}: class names repeat")


def content_hash(examples: np.ndarray) -> str:
    """sha256 of the examples' C-contiguous bytes (the same for any file encoding)."""
    return hashlib.sha256(np.ascontiguousarray(examples).tobytes()).hexdigest()


def write_store(path: str | Path, examples: np.ndarray,
                classes: Sequence[tuple[str, str, int]], source: Mapping[str, Any],
                partition: Mapping[str, Any]) -> StoreManifest:
    """Write a store at ``path`` (replacing any there, atomically): ``examples`` is
    ``uint8 [rows, H, W]`` with each class's rows contiguous, ``classes`` its
    ``(name, group, count)`` in row order."""
    path = Path(path)
    examples = np.ascontiguousarray(examples)
    if examples.ndim != 3 or examples.dtype != np.uint8:
        raise StoreError(f"examples must be uint8 [rows, H, W], got {examples.dtype}"
                         f"{list(examples.shape)}")
    offsets = np.concatenate([[0], np.cumsum([int(c[2]) for c in classes])]).astype(int)
    manifest = StoreManifest(
        version=VERSION, source=dict(source), image_shape=(examples.shape[1], examples.shape[2]),
        classes=tuple(StoreClass(str(n), str(g), int(k), int(o))
                      for (n, g, k), o in zip(classes, offsets[:-1], strict=True)),
        rows=int(examples.shape[0]), sha256=content_hash(examples), partition=dict(partition))
    manifest.check(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        np.save(tmp / EXAMPLES, examples, allow_pickle=False)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        for f in (EXAMPLES, MANIFEST):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | Path) -> StoreManifest:
    """The manifest of the store at ``path`` (checked for consistency, not against the
    examples: :func:`load_store` and :func:`verify_store` read those)."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise StoreError(f"no site store at {path} (no {MANIFEST}); make one with "
                         "`edgemeta data shard CONFIG`")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StoreError(f"{file}: cannot read the manifest ({err})") from None
    return StoreManifest.from_json(raw, str(file))


def _read_examples(path: Path, manifest: StoreManifest) -> np.ndarray:
    try:
        examples = np.load(path / EXAMPLES, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path / EXAMPLES}: cannot read the examples ({err})") from None
    want = (manifest.rows, *manifest.image_shape)
    if examples.dtype != np.uint8 or examples.shape != want:
        raise StoreError(f"{path / EXAMPLES}: {examples.dtype}{list(examples.shape)}, the "
                         f"manifest says uint8{list(want)}")
    if content_hash(examples) != manifest.sha256:
        raise StoreError(f"{path / EXAMPLES}: content hash differs from the manifest's (the "
                         "examples changed); re-shard the store")
    return examples


def verify_store(path: str | Path) -> StoreManifest:
    """The manifest, once the examples are checked against its shape and hash."""
    manifest = read_manifest(path)
    _read_examples(Path(path), manifest)
    return manifest


@dataclass(frozen=True, eq=False)
class SiteStore:
    """A loaded store: its manifest and its examples as ``uint8 [classes, n, H, W]`` (the
    layout of :class:`~metalearn.data.omniglot.OmniglotData`, with site-local class ids)."""

    path: Path
    manifest: StoreManifest
    pixels: Any  # torch.Tensor [classes, n, H, W] uint8

    def as_omniglot(self) -> Any:
        """The store as :class:`~metalearn.data.omniglot.OmniglotData`, what the episode
        sampler takes: class ``i`` of the manifest is character ``i``; groups are alphabets.
        The standard split is unknown (-1): a store is one site's share, not Omniglot."""
        from metalearn.data.omniglot import OmniglotData

        groups = self.manifest.groups
        index = {g: i for i, g in enumerate(groups)}
        unknown = np.full(self.manifest.num_classes, -1, dtype=np.int64)
        return OmniglotData(
            pixels=self.pixels,
            char_alphabet=np.array([index[c.group] for c in self.manifest.classes],
                                   dtype=np.int64),
            char_split=unknown, char_vinyals_split=unknown.copy(),
            alphabet_names=np.array(groups), character_names=np.array(
                [c.name for c in self.manifest.classes]), path=self.path)


_cache: dict[tuple[Path, int, int], SiteStore] = {}
_cache_lock = threading.Lock()


def load_store(path: str | Path) -> SiteStore:
    """Load (once per process and file version) the store at ``path``, checked against its
    manifest's hash. Needs every class to have the same number of examples (today's sampler)."""
    import torch

    path = Path(path).absolute()
    file = path / EXAMPLES
    try:
        stat = file.stat()
    except OSError:
        read_manifest(path)  # says what is missing
        raise StoreError(f"no {EXAMPLES} in the site store {path}") from None
    key = (path, stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        if key not in _cache:
            manifest = read_manifest(path)
            counts = set(manifest.counts)
            if len(counts) > 1:
                raise StoreError(f"{path}: classes hold {sorted(counts)} examples; the episode "
                                 "sampler needs the same number in every class")
            n = counts.pop() if counts else 0
            examples = _read_examples(path, manifest)
            pixels = torch.from_numpy(examples).reshape(manifest.num_classes, n,
                                                        *manifest.image_shape)
            _cache[key] = SiteStore(path, manifest, pixels)
        return _cache[key]
