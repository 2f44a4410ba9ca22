"""CAVIA (Zintgraf et al., 2019): fast context adaptation via meta-learning.

The inner loop adapts only a few *context parameters*, a vector fed into the network (for the
sinusoid concatenated to the input, for the conv net through FiLM layers; see
:class:`~metalearn.models.CaviaMLP`, :class:`~metalearn.models.CaviaConvNet`); they start at
zero for every task. The outer loop meta-learns the rest of the network through the adapted
context, second order by default, exactly as MAML's meta-gradient with a restricted inner loop.

So CAVIA is :class:`~metalearn.algorithms.maml.MAML` with two changes: the inner loop updates
the parameter named ``context`` alone (both the ``higher`` reference and the ``torch.func``
fast path follow :meth:`CAVIA.adapted_keys`), and the context's starting point is not learnt:
it is set to zero before every inner loop and its meta-gradient is zero. The context stays a
(zero) entry of the meta-parameters, so that a model is a function of its parameters like every
other model here and the wire carries the same parameter-shaped vectors.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from metalearn.algorithms.base import TaskType
from metalearn.algorithms.maml import MAML, Impl
from metalearn.algorithms.maml_func import Strategy
from metalearn.params import Params
from metalearn.tasks import TaskBatch


class CAVIA(MAML):
    """MAML whose inner loop adapts only the model's context parameters, from zero.

    Args:
        context: name of the context parameter (the models name it ``context``).
        Others: as :class:`~metalearn.algorithms.maml.MAML`; the paper's inner learning rate
            is large (1.0) because the context starts at zero and its scale is learnt by the
            layers it feeds.
    """

    name: ClassVar[str] = "cavia"

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 1.0, inner_steps: int = 1, test_steps: int | None = None,
                 first_order: bool = False, impl: Impl = "func", strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support",
                 context: str = "context") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps, first_order, impl,
                         strategy, metrics_before)
        if context not in self._own:
            raise ValueError(f"CAVIA needs a context parameter named {context!r} (models "
                             f"'cavia_mlp', 'cavia_conv'); the model has {self._own}")
        self.context = context

    def adapted_keys(self, params: Params) -> list[str]:
        return [self.context]

    def init_params(self) -> Params:
        return self._reset(super().init_params())

    def _reset(self, params: Params) -> Params:
        """The parameters with a zero context: where every task's inner loop starts."""
        return {**params, self.context: torch.zeros_like(params[self.context])}

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        grads, metrics = super().meta_gradient(self._reset(params), tasks)
        return self._reset(grads), metrics  # the context's start is fixed: no gradient

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        return super().adapt(self._reset(params), support_x, support_y, steps)

    def adapt_predict_batch(self, params: Params, tasks: TaskBatch,
                            steps: int | None = None) -> Tensor:
        return super().adapt_predict_batch(self._reset(params), tasks, steps)
