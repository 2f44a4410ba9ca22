"""N-way K-shot episodes over classes of unequal sizes, from images held in memory as uint8.

The common form of a class-based data set (:class:`ClassImages`): every example in one
``uint8 [N, C, H, W]`` tensor, rows grouped by class, and ``offsets`` saying where each class
starts (class ``c`` is rows ``offsets[c]:offsets[c + 1]``). An image folder, a site's store or a
data set plugged in through :mod:`metalearn.data.source` all become one, and
:class:`ClassEpisodes` samples tasks from any of them.

A class with fewer than ``shots + queries`` examples cannot give a task its support and query
sets without repeating an example: the sampler leaves it out with a warning that names it,
and refuses to start if fewer than ``ways`` classes remain. As in
:mod:`metalearn.data.episodes`, all randomness comes from one seeded ``torch.Generator``, whose
state :meth:`ClassEpisodes.state_dict` captures, so a resumed run sees exactly the episodes an
uninterrupted one would.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metalearn.data.errors import DataSetError
from metalearn.data.seeded import SeededEpisodes, positive
from metalearn.tasks import TaskBatch


class SmallClassWarning(UserWarning):
    """Classes left out of a sampler because they hold too few examples for one task."""


@dataclass(frozen=True, eq=False)
class ClassImages:
    """Images grouped by class: ``pixels`` ``uint8 [N, C, H, W]`` (0 = black, 255 = full
    intensity), class ``c`` in rows ``offsets[c]:offsets[c + 1]``, named ``names[c]``.

    Kept as uint8 because every process that samples holds its own copy; samplers convert only
    the rows they pick (:meth:`rows`).
    """

    pixels: Tensor
    offsets: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.dim() != 4:
            raise ValueError(f"pixels must be uint8 [N, C, H, W], got "
                             f"{self.pixels.dtype}{list(self.pixels.shape)}")
        offsets = np.asarray(self.offsets, dtype=np.int64)
        if (offsets.ndim != 1 or offsets.size != len(self.names) + 1 or offsets[0] != 0
                or offsets[-1] != self.pixels.shape[0] or (np.diff(offsets) < 0).any()):
            raise ValueError(f"offsets must rise from 0 to {self.pixels.shape[0]} with one "
                             f"entry per class plus one ({len(self.names) + 1})")
        object.__setattr__(self, "offsets", offsets)

    @staticmethod
    def from_labels(pixels: Tensor, labels: np.ndarray,
                    names: Sequence[str] | None = None) -> ClassImages:
        """Group ``pixels`` ``[N, C, H, W]`` by integer ``labels`` ``[N]`` (0..k-1), keeping the
        order of examples within a class."""
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        k = int(labels.max()) + 1 if labels.size else 0
        offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
        named = tuple(names) if names is not None else tuple(str(c) for c in range(k))
        return ClassImages(pixels[torch.from_numpy(order)], offsets, named)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def counts(self) -> np.ndarray:
        """Examples per class, ``int64 [classes]``."""
        return np.diff(self.offsets)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one example."""
        return tuple(int(s) for s in self.pixels.shape[1:])  # type: ignore[return-value]

    def rows(self, rows: Tensor) -> Tensor:
        """Examples by row as float32 in [0, 1], ``[n, C, H, W]``."""
        return self.pixels.index_select(0, rows.reshape(-1)).float().div_(255.0)


@dataclass(frozen=True)
class ClassEpisodeInfo:
    """Where each image of a batch came from: ``classes`` ``[B, ways]`` (class indices of the
    :class:`ClassImages`) and ``examples`` ``[B, ways, shots + queries]`` (index within the
    class; the first ``shots`` are the support set)."""

    classes: Tensor
    examples: Tensor


def eligible_classes(images: ClassImages, classes: np.ndarray | Sequence[int], ways: int,
                     need: int, what: str = "the data") -> np.ndarray:
    """``classes`` that hold at least ``need`` examples; warns naming those left out and
    raises :class:`DataSetError` if fewer than ``ways`` remain."""
    chosen = np.asarray(classes, dtype=np.int64)
    if chosen.ndim != 1 or chosen.size == 0:
        raise ValueError(f"classes must be a non-empty 1-D array, got shape {chosen.shape}")
    if chosen.min() < 0 or chosen.max() >= images.num_classes:
        raise ValueError(f"class indices must lie in [0, {images.num_classes})")
    if np.unique(chosen).size != chosen.size:
        raise ValueError("classes must not repeat (classes of one task must be distinct)")
    small = images.counts[chosen] < need
    if small.any():
        names = [f"{images.names[c]} ({images.counts[c]})" for c in chosen[small]]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"{what}: {len(names)} of {chosen.size} classes have fewer than shots + "
                      f"queries = {need} examples and are left out: {shown}",
                      SmallClassWarning, stacklevel=3)
    kept = chosen[~small]
    if kept.size < ways:
        raise DataSetError(f"{what}: only {kept.size} of {chosen.size} classes have at least "
                         f"shots + queries = {need} examples, but {ways}-way tasks need {ways} "
                         "(add examples or classes, or lower ways, shots or queries)")
    return kept


class ClassEpisodes(SeededEpisodes):
    """Seeded sampler of ``ways``-way ``shots``-shot tasks over classes of unequal sizes.

    Each task draws ``ways`` distinct classes uniformly among the eligible ones and, for each,
    ``shots + queries`` distinct examples uniformly among the class's own; the first ``shots``
    form the support set. Labels ``0..ways-1`` follow the order in which classes were drawn.

    Args:
        images: the examples (:class:`ClassImages`).
        classes: the class indices this sampler may use (a split, a site's partition).
        ways, shots, queries: classes per task, support and query examples per class.
        seed: seed of the sampler's own generator.
        what: how warnings and errors name the data (``data.root /x``, ``site a``).
    """

    def __init__(self, images: ClassImages, classes: np.ndarray | Sequence[int], ways: int,
                 shots: int, queries: int, seed: int = 0, what: str = "the data") -> None:
        super().__init__(seed)
        self.ways = positive("ways", ways)
        self.shots = positive("shots", shots)
        self.queries = positive("queries", queries)
        self.images = images
        self.classes = eligible_classes(images, classes, self.ways, self.shots + self.queries,
                                        what)
        self._classes = torch.from_numpy(self.classes)
        self._starts = torch.from_numpy(images.offsets[self.classes])
        self._counts = torch.from_numpy(images.counts[self.classes])
        self._widest = int(self._counts.max())

    @property
    def num_classes(self) -> int:
        return int(self.classes.size)

    def __repr__(self) -> str:
        return (f"ClassEpisodes({self.ways}-way {self.shots}-shot, {self.queries} queries, "
                f"{self.num_classes} classes, seed={self.seed})")

    def sample(self, batch: int) -> TaskBatch:
        """``batch`` tasks: support ``[B, ways*shots, C, H, W]``, query ``[B, ways*queries,
        C, H, W]`` (float32 in [0, 1]), labels int64 in ``0..ways-1``, grouped by class."""
        return self.sample_with_info(batch)[0]

    def sample_with_info(self, batch: int) -> tuple[TaskBatch, ClassEpisodeInfo]:
        """Like :meth:`sample`, also saying which class and examples each task got."""
        batch = positive("batch", batch)
        g, ways, shots, queries = self._generator, self.ways, self.shots, self.queries
        need = shots + queries
        # Distinct classes per task: top-k of uniform noise is a uniformly random ordered subset.
        picked = torch.rand(batch, self.num_classes, generator=g).topk(ways, dim=1).indices
        # Distinct examples per class: the k smallest of uniform keys, with the positions past
        # the class's own count keyed out of reach (2 > any key). One draw of [B, ways, widest]
        # whatever the classes picked, so the stream depends on the generator state alone.
        keys = torch.rand(batch, ways, self._widest, generator=g)
        counts = self._counts[picked]
        keys.masked_fill_(torch.arange(self._widest) >= counts.unsqueeze(-1), 2.0)
        examples = keys.topk(need, dim=-1, largest=False).indices
        rows = self._starts[picked].unsqueeze(-1) + examples  # [B, ways, need]
        self.episodes_sampled += batch
        labels = torch.arange(ways)
        tasks = TaskBatch(
            support_x=self._gather(rows[..., :shots]),
            support_y=labels.repeat_interleave(shots).repeat(batch, 1),
            query_x=self._gather(rows[..., shots:]),
            query_y=labels.repeat_interleave(queries).repeat(batch, 1),
        )
        return tasks, ClassEpisodeInfo(self._classes[picked], examples)

    def _gather(self, rows: Tensor) -> Tensor:
        batch, ways, n = rows.shape
        return self.images.rows(rows).view(batch, ways * n, *self.images.input_shape)

