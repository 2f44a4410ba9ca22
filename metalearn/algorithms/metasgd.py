"""Meta-SGD (Li et al., 2017): learn a learning rate for every parameter element.

The meta-parameters are the model's parameters plus ``lr.<name>`` tensors of the same shapes;
the inner step is ``θ − α ⊙ ∇θ L``, and the meta-gradient flows to ``θ`` and ``α`` alike. The
learning rates are plain entries of the ``Params`` dict, so they travel, aggregate and
checkpoint with the weights without any special case.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from metalearn.algorithms.base import TaskType
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.maml_func import Strategy
from metalearn.params import Params

LR_PREFIX = "lr."


class MetaSGD(MAML):
    """MAML with per-element learning rates as meta-parameters (second order, ``torch.func``).

    Args:
        inner_lr: the initial value of every learned learning rate.
        Others: as :class:`~metalearn.algorithms.maml.MAML`, without ``impl`` (no `higher`
            path: its optimizers take one learning rate per parameter group, not per element).
    """

    name: ClassVar[str] = "metasgd"
    supports_higher: ClassVar[bool] = False

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps, first_order=False,
                         impl="func", strategy=strategy, metrics_before=metrics_before)

    def init_params(self) -> Params:
        params = super().init_params()
        lrs = {LR_PREFIX + k: torch.full_like(v, self.inner_lr) for k, v in params.items()}
        return {**params, **lrs}

    def inner_update(self, fast: Params, grads: Params, params: Params) -> Params:
        missing = [LR_PREFIX + k for k in fast if LR_PREFIX + k not in params]
        if missing:
            raise KeyError(f"Meta-SGD parameters lack learning rates {missing}; "
                           "start from init_params()")
        return {k: fast[k] - params[LR_PREFIX + k] * grads[k] for k in fast}
