"""ANIL (Raghu et al., 2020): MAML whose inner loop adapts only the head.

The body's parameters still get a meta-gradient (through the head's adaptation and the query
loss), but the inner loop leaves them untouched — "almost no inner loop", which is both cheaper
and, the paper finds, as accurate as MAML: feature reuse, not rapid learning.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from metalearn.algorithms.base import TaskType
from metalearn.algorithms.maml import MAML, Impl
from metalearn.algorithms.maml_func import Strategy
from metalearn.params import Params


class ANIL(MAML):
    """MAML with the inner loop restricted to the parameters named ``<head>.*``.

    Args:
        head: name of the submodule adapted in the inner loop (the models name it ``head``).
        Others: as :class:`~metalearn.algorithms.maml.MAML` (second order by default; the
            ``higher`` reference runs with an inner optimizer that holds the head alone).
    """

    name: ClassVar[str] = "anil"

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 first_order: bool = False, impl: Impl = "func", strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support",
                 head: str = "head") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps, first_order, impl,
                         strategy, metrics_before)
        self._head = [k for k in self._own if k.startswith(head + ".")]
        if not self._head:
            raise ValueError(f"ANIL needs parameters named '{head}.*'; the model has "
                             f"{self._own}")

    def adapted_keys(self, params: Params) -> list[str]:
        return self._head
