"""Few-shot tasks: the unit of work that every sampler yields and every algorithm consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Task:
    """One few-shot task: a support set to adapt on and a query set to score the adaptation.

    Classification labels are in ``0..ways-1`` (int64); regression targets are float tensors.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@dataclass(frozen=True)
class TaskBatch:
    """Tasks of identical shapes stacked along a leading task axis.

    Stacking lets a fast path ``vmap`` over tasks, while ``iter()`` gives the per-task view that
    a plain loop (and `higher`) uses. Shapes: ``support_x`` is ``[B, S, *input]``, ``support_y``
    is ``[B, S, *target]``, and likewise for the query set with ``Q`` rows.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return int(self.support_x.shape[0])

    def __getitem__(self, i: int) -> Task:
        return Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(t.to(device) for t in (self.support_x, self.support_y,
                                                   self.query_x, self.query_y)))

    @staticmethod
    def stack(tasks: list[Task]) -> TaskBatch:
        """Stack same-shaped tasks (e.g. tasks of several samplers) into one batch."""
        if not tasks:
            raise ValueError("cannot stack an empty list of tasks")
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
        )

    @staticmethod
    def cat(batches: list[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task axis (the union of several sites' task batches)."""
        if not batches:
            raise ValueError("cannot concatenate an empty list of task batches")
        return TaskBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                           ("support_x", "support_y", "query_x", "query_y")))
