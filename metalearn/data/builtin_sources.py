"""The project's own data sets behind :class:`~metalearn.data.source.FewShotSource`: Omniglot
(a class source with a standard split, alphabets per site and rotations) and the sinusoid
regression of the MAML paper (no classes: sites hold amplitude ranges)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metalearn.data.source import ClassSource, FewShotSource, Split, TaskSampler


class OmniglotSource(ClassSource):
    """Omniglot from the project's npz (``data.path``, else searched): 28×28 grey, 20
    drawings a character, the Vinyals split, a quarter turn of a character is its own class
    with ``rotations``."""

    name = "omniglot"

    def check(self, data: Mapping[str, Any]) -> None:
        if data["shots"] + data["queries"] > 20:
            raise ValueError(f"shots + queries = {data['shots'] + data['queries']} exceeds the "
                             "20 drawings of an Omniglot character")
        for key, fixed in (("image_size", 28), ("channels", 1)):
            if data.get(key) not in (None, fixed):
                raise ValueError(f"data.{key}: Omniglot images are {fixed} (1 channel of "
                                 f"28x28), not {data[key]}; leave it out")
        if data.get("split") is not None:
            raise ValueError("data.split: Omniglot uses the standard Vinyals split "
                             "(1200 meta-training, 423 meta-test characters); leave it out")

    def input_shape(self, data: Mapping[str, Any]) -> tuple[int, ...]:
        return (1, 28, 28)

    def _data(self, data: Mapping[str, Any]) -> Any:
        from metalearn.data.omniglot import load_omniglot

        return load_omniglot(data.get("path"))

    def images(self, data: Mapping[str, Any]) -> Any:
        """Every drawing as :class:`ClassImages` (a view of the loaded npz: no copy)."""
        from metalearn.data.class_episodes import ClassImages
        from metalearn.data.omniglot import DRAWERS

        omni = self._data(data)
        chars = omni.num_characters
        names = tuple(f"{omni.alphabet_names[a]}/{c}"
                      for a, c in zip(omni.char_alphabet, omni.character_names, strict=True))
        return ClassImages(omni.pixels.reshape(chars * DRAWERS, 1, 28, 28),
                           np.arange(chars + 1, dtype=np.int64) * DRAWERS, names)

    def prepare(self, data: Mapping[str, Any]) -> None:
        self._data(data)

    def split_classes(self, data: Mapping[str, Any], split: Split) -> np.ndarray:
        from metalearn.data.omniglot import standard_split

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        train, test = standard_split(self._data(data))
        return train if split == "train" else test

    def sampler(self, data: Mapping[str, Any], split: Split = "train", seed: int = 0,
                part: Any = None) -> TaskSampler:
        from metalearn.data.episodes import OmniglotEpisodes

        characters = self.split_classes(data, split) if part is None else part
        return OmniglotEpisodes(self._data(data), characters, ways=data["ways"],
                                shots=data["shots"], queries=data["queries"],
                                rotations=data.get("rotations", True), seed=seed)

    def partition(self, data: Mapping[str, Any], classes: np.ndarray, sites: int,
                  seed: int) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Whole alphabets per site (non-IID scripts), each plan naming its alphabets."""
        from metalearn.data.partition import partition_by_alphabet

        omni = self._data(data)
        parts = partition_by_alphabet(classes, omni.char_alphabet, sites, seed)
        return [(part, {"alphabets": sorted({str(omni.alphabet_names[a])
                                             for a in omni.char_alphabet[part]})})
                for part in parts]


class SinusoidSource(FewShotSource):
    """``y = A sin(x - phase)`` regression; sites hold contiguous amplitude sub-ranges."""

    name = "sinusoid"
    task_type = "regression"
    model = "sinusoid_mlp"
    class_based = False
    reads_files = False

    def input_shape(self, data: Mapping[str, Any]) -> tuple[int, ...]:
        return (1,)

    def sampler(self, data: Mapping[str, Any], split: Split = "train", seed: int = 0,
                part: Any = None) -> TaskSampler:
        """``part`` is an amplitude ``(low, high)``; meta-test tasks come from the same
        ranges on another seed (there are no held-out classes in regression)."""
        from metalearn.data.sinusoid import SinusoidTasks

        return SinusoidTasks(amplitude=tuple(part or data["amplitude"]),
                             phase=tuple(data["phase"]), x_range=tuple(data["x_range"]),
                             shots=data["shots"], queries=data["queries"], seed=seed)

    def partition_sites(self, data: Mapping[str, Any], sites: Sequence[str],
                        seed: int) -> dict[str, dict[str, Any]]:
        from metalearn.data.partition import sinusoid_site_ranges

        ranges = sinusoid_site_ranges(len(sites), tuple(data["amplitude"]), tuple(data["phase"]))
        return {s: {"site": s, "amplitude": list(r["amplitude"])}
                for s, r in zip(sites, ranges, strict=True)}

