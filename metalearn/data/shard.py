"""Site stores made from a source data set: the work of ``edgemeta data shard``.

The source is Omniglot's meta-training split (the 1200 Vinyals train + val characters); a
partitioner (:func:`metalearn.data.partition.partition_classes`) says which characters go to
which site, and each site's store (:mod:`metalearn.data.store`) receives only its own
characters, every drawing of each. A spec (:class:`ShardSpec`) is a pure description: the same
spec gives the same stores on any machine, so each site's node can make its own store alone
(:func:`shard_site`) without any other site's data leaving the source.

Idempotent: a store whose manifest records the same spec, the same source file hash and whose
examples still match their hash is "up to date" and left alone; otherwise it is rewritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from metalearn.data.store import StoreError, StoreManifest, read_manifest, verify_store, write_store

Status = Literal["up to date", "written"]
SOURCE_SPLIT = "trainval"


@dataclass(frozen=True)
class ShardSpec:
    """How to make every site's store: the source (``data.path``; None searches as
    :func:`~metalearn.data.omniglot.find_omniglot` does), the partitioner with its settings,
    the seed and the sites in topology order."""

    sites: tuple[str, ...]
    partitioner: Mapping[str, Any] = field(default_factory=lambda: {"name": "alphabet"})
    seed: int = 0
    min_classes: int = 1
    source: str | None = None
    dataset: str = "omniglot"

    def record(self, site: str, source_sha256: str) -> dict[str, Any]:
        """What a store's manifest keeps of the spec (compared when re-sharding)."""
        return {"partitioner": dict(self.partitioner), "seed": int(self.seed),
                "min_classes": int(self.min_classes), "sites": list(self.sites), "site": site,
                "source_sha256": source_sha256}


_hashes: dict[tuple[Path, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, once per process and file version."""
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def site_parts(spec: ShardSpec) -> tuple[Any, dict[str, np.ndarray], str]:
    """The source, each site's characters (global ids, sorted) and the source file's hash."""
    from metalearn.data.omniglot import find_omniglot, load_omniglot, split_characters
    from metalearn.data.partition import partition_classes

    if spec.dataset != "omniglot":
        raise ValueError(f"site stores are made from omniglot, not {spec.dataset!r}")
    omni = load_omniglot(find_omniglot(spec.source))
    train = split_characters(omni, SOURCE_SPLIT)
    settings = {k: v for k, v in spec.partitioner.items() if k != "name"}
    parts = partition_classes(str(spec.partitioner["name"]), train, omni.char_alphabet,
                              len(spec.sites), spec.seed, min_classes=spec.min_classes,
                              **settings)
    return omni, dict(zip(spec.sites, parts, strict=True)), file_sha256(omni.path)


def _current(store: Path, record: Mapping[str, Any]) -> StoreManifest | None:
    """The store's manifest if it was made from this very spec and source and is intact."""
    try:
        manifest = read_manifest(store)
        if dict(manifest.partition) != dict(record):
            return None
        return verify_store(store)
    except StoreError:
        return None


def shard_sites(spec: ShardSpec, stores: Mapping[str, str | Path],
                only: Sequence[str] | None = None) -> dict[str, tuple[Status, StoreManifest]]:
    """Make (or find up to date) the stores of ``only`` (default: every site of the spec) at
    ``stores[site]``; returns each one's status and manifest."""
    names = list(spec.sites if only is None else only)
    unknown = sorted(set(names) - set(spec.sites))
    if unknown:
        raise ValueError(f"sites {unknown} are not in the topology {list(spec.sites)}")
    omni, parts, source_hash = site_parts(spec)
    out: dict[str, tuple[Status, StoreManifest]] = {}
    for site in names:
        store = Path(stores[site])
        record = spec.record(site, source_hash)
        manifest = _current(store, record)
        if manifest is not None:
            out[site] = ("up to date", manifest)
            continue
        chars = parts[site]
        pixels = omni.pixels[chars]  # [classes, 20, H, W] uint8
        examples = pixels.reshape(-1, *pixels.shape[2:]).numpy()
        classes = [(str(omni.character_names[c]), str(omni.alphabet_names[omni.char_alphabet[c]]),
                    int(pixels.shape[1])) for c in chars]
        source = {"dataset": spec.dataset, "split": SOURCE_SPLIT, "sha256": source_hash}
        out[site] = ("written", write_store(store, examples, classes, source, record))
    return out


def shard_split(path: str | Path, split: str = "test", source: str | None = None,
                dataset: str = "omniglot") -> tuple[Status, StoreManifest]:
    """A store of one whole standard split (default: the 423 meta-test characters), e.g. the
    cloud's meta-test store; idempotent like :func:`shard_sites`."""
    from metalearn.data.omniglot import find_omniglot, load_omniglot, split_characters

    if dataset != "omniglot":
        raise ValueError(f"stores are made from omniglot, not {dataset!r}")
    omni = load_omniglot(find_omniglot(source))
    source_hash = file_sha256(omni.path)
    record = {"split": split, "source_sha256": source_hash}
    manifest = _current(Path(path), record)
    if manifest is not None:
        return "up to date", manifest
    chars = split_characters(omni, split)  # type: ignore[arg-type]
    pixels = omni.pixels[chars]
    classes = [(str(omni.character_names[c]), str(omni.alphabet_names[omni.char_alphabet[c]]),
                int(pixels.shape[1])) for c in chars]
    return "written", write_store(path, pixels.reshape(-1, *pixels.shape[2:]).numpy(), classes,
                                  {"dataset": dataset, "split": split, "sha256": source_hash},
                                  record)
