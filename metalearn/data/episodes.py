"""N-way K-shot Omniglot episodes, sampled in a few tensor operations per batch.

A class is a character, or with ``rotations`` a (character, quarter turn) pair, as in Vinyals
et al. and MAML: 1200 meta-training characters make 4800 classes. Each task draws ``ways``
distinct classes and, for every class, ``shots + queries`` distinct drawers of its 20; the
first ``shots`` go to the support set. Labels ``0..ways-1`` follow the order in which the
classes were drawn, so the label of a character is random from task to task.

All randomness comes from one seeded ``torch.Generator``, whose state :meth:`state_dict`
captures, so an interrupted run resumes with exactly the episodes it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metalearn.data.omniglot import DRAWERS, IMAGE_SIZE, OmniglotData
from metalearn.data.seeded import SeededEpisodes, positive
from metalearn.tasks import TaskBatch


@dataclass(frozen=True)
class EpisodeInfo:
    """Where each image of a batch came from (for tests, debugging and evaluation reports).

    ``characters`` and ``rotations`` are ``[B, ways]`` (global character index, quarter turns
    counter-clockwise as ``np.rot90``); ``drawers`` is ``[B, ways, shots + queries]``.
    """

    characters: Tensor
    rotations: Tensor
    drawers: Tensor


def _check_characters(characters: np.ndarray | Tensor, total: int) -> np.ndarray:
    chars = np.asarray(characters)
    if chars.ndim != 1 or chars.size == 0:
        raise ValueError(f"characters must be a non-empty 1-D array, got shape {chars.shape}")
    if not np.issubdtype(chars.dtype, np.integer):
        raise ValueError(f"characters must be integer indices, got dtype {chars.dtype}")
    if chars.min() < 0 or chars.max() >= total:
        raise ValueError(f"character indices must lie in [0, {total}), got "
                         f"{int(chars.min())}..{int(chars.max())}")
    if np.unique(chars).size != chars.size:
        raise ValueError("characters must not repeat (classes of one task must be distinct)")
    return chars.astype(np.int64)


class OmniglotEpisodes(SeededEpisodes):
    """Seeded sampler of batches of ``ways``-way ``shots``-shot tasks over given characters.

    Args:
        data: the loaded Omniglot set (:func:`~metalearn.data.omniglot.load_omniglot`).
        characters: the character indices this sampler may use (e.g. a site's partition).
        ways, shots, queries: classes per task, support and query images per class.
        rotations: count each quarter turn of a character as its own class.
        seed: seed of the sampler's own generator.
    """

    def __init__(self, data: OmniglotData, characters: np.ndarray | Tensor, ways: int,
                 shots: int, queries: int, rotations: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        self.ways = positive("ways", ways)
        self.shots = positive("shots", shots)
        self.queries = positive("queries", queries)
        if self.shots + self.queries > DRAWERS:
            raise ValueError(f"shots + queries = {self.shots + self.queries} exceeds the "
                             f"{DRAWERS} drawings each Omniglot character has")
        self.data = data
        self.characters = _check_characters(characters, data.num_characters)
        self.rotations = bool(rotations)
        self._turns = 4 if self.rotations else 1
        if self.ways > self.num_classes:
            raise ValueError(f"ways = {self.ways} exceeds the {self.num_classes} classes of "
                             f"{self.characters.size} characters"
                             f"{' with rotations' if self.rotations else ''}")
        self._chars = torch.from_numpy(self.characters)

    @property
    def num_classes(self) -> int:
        return int(self.characters.size) * self._turns

    def __repr__(self) -> str:
        return (f"OmniglotEpisodes({self.ways}-way {self.shots}-shot, {self.queries} queries, "
                f"{self.num_classes} classes, seed={self.seed})")

    def sample(self, batch: int) -> TaskBatch:
        """``batch`` tasks: support ``[B, ways*shots, 1, 28, 28]``, query ``[B, ways*queries,
        1, 28, 28]`` (float32), labels int64 in ``0..ways-1``, grouped by class."""
        return self.sample_with_info(batch)[0]

    def sample_with_info(self, batch: int) -> tuple[TaskBatch, EpisodeInfo]:
        """Like :meth:`sample`, also saying which character, rotation and drawers each class got."""
        batch = positive("batch", batch)
        g, ways, shots, queries = self._generator, self.ways, self.shots, self.queries
        # Distinct classes per task (top-k of uniform noise is a uniformly random ordered
        # subset) and distinct drawers per class (the start of a random permutation of 20).
        classes = torch.rand(batch, self.num_classes, generator=g).topk(ways, dim=1).indices
        drawers = torch.rand(batch, ways, DRAWERS, generator=g).argsort(dim=-1)
        drawers = drawers[..., :shots + queries]
        chars = self._chars[classes // self._turns]
        turns = classes % self._turns
        rows = chars.unsqueeze(-1) * DRAWERS + drawers  # rows of the [chars * 20] image table
        self.episodes_sampled += batch
        labels = torch.arange(ways)
        tasks = TaskBatch(
            support_x=self._gather(rows[..., :shots], turns),
            support_y=labels.repeat_interleave(shots).repeat(batch, 1),
            query_x=self._gather(rows[..., shots:], turns),
            query_y=labels.repeat_interleave(queries).repeat(batch, 1),
        )
        return tasks, EpisodeInfo(chars, turns, drawers)

    def _gather(self, rows: Tensor, turns: Tensor) -> Tensor:
        """Images of ``rows`` ``[B, ways, n]``, class ``[b, w]`` turned ``turns[b, w]`` times,
        as ``[B, ways * n, 1, 28, 28]``: one index_select, then one rot90 per quarter turn."""
        batch, ways, n = rows.shape
        images = self.data.drawings(rows)
        if self._turns > 1:
            row_turns = turns.repeat_interleave(n)
            for k in (1, 2, 3):
                idx = (row_turns == k).nonzero().squeeze(1)
                rotated = torch.rot90(images.index_select(0, idx), k, dims=(-2, -1))
                images.index_copy_(0, idx, rotated.contiguous())
        return images.view(batch, ways * n, 1, IMAGE_SIZE, IMAGE_SIZE)

