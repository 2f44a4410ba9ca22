"""Reptile (Nichol et al., 2018): move the initialisation toward each task's adapted weights.

The inner loop trains on the whole task (support and query together) with plain SGD; the
"meta-gradient" reported is ``θ − mean_b θ_b'``, so an outer SGD step with learning rate ε is
exactly the Reptile update ``θ ← θ + ε (mean_b θ_b' − θ)`` (and Adam on it is the usual variant).
No second-order terms, no graph: the inner loops of a batch run together (grouped or vmapped).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from metalearn.algorithms.base import TaskType
from metalearn.algorithms.maml import GradientLearner
from metalearn.algorithms.maml_func import Strategy
from metalearn.params import Params
from metalearn.tasks import TaskBatch


class Reptile(GradientLearner):
    """Reptile; ``inner_steps`` full-batch SGD steps at ``inner_lr`` on support ∪ query.

    Metrics are on the task's training data (support ∪ query): ``loss_before`` from the first
    inner step, ``loss_after`` from one extra forward after the last (Reptile has no held-out
    query loss in its update).
    """

    name: ClassVar[str] = "reptile"

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 strategy: Strategy = "auto") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps, strategy)

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1)
        y = torch.cat([tasks.support_y, tasks.query_y], dim=1)
        fast, first = self.fast.adapt_batch(params, x, y, self.inner_steps, with_first=True)
        grads = {k: params[k].detach() - fast[k].mean(dim=0) for k in self.model_keys(params)}
        with torch.no_grad():
            out = self.fast.forward_batch(fast, x)
            after = self.loss(out.flatten(0, 1), y.flatten(0, 1))
            if first is None:  # no inner step: before == after
                first = (after, out)
        metrics = {"loss_before": float(first[0].mean()), "loss_after": float(after)}
        if self.task_type == "classification":
            metrics["acc_before"] = float((first[1].argmax(-1) == y).float().mean())
            metrics["acc_after"] = float((out.argmax(-1) == y).float().mean())
        return grads, metrics
