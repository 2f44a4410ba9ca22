"""One interface for every meta-learning algorithm, so the driver, edge actors and serving
replicas can call any of them without knowing which one it is.

An algorithm holds an architecture (an ``nn.Module`` used as a function) and hyperparameters;
parameters flow in and out as ``dict[str, Tensor]`` (see :mod:`metalearn.params`).

* :meth:`MetaAlgorithm.meta_gradient` — the gradient of the mean post-adaptation query loss over
  a batch of tasks with respect to the meta-parameters (the outer optimizer applies it).
* :meth:`MetaAlgorithm.adapt` — adapted state for one support set (fast weights, prototypes, ...).
* :meth:`MetaAlgorithm.predict` — outputs (logits or regression values) of an adapted state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.params import Params, module_params
from metalearn.tasks import TaskBatch

TaskType = Literal["classification", "regression"]


@dataclass
class MetaUpdate:
    """What an edge returns to the cloud: an update, how many tasks it stands for, and metrics.

    ``kind == "gradient"``: a meta-gradient, to be applied by the cloud's outer optimizer.
    ``kind == "delta"``: ``new_params - old_params`` after several local meta-steps.
    ``local_steps``: how many (1 for a gradient); what normalised aggregation (FedNova)
    divides by when sites did unequal work.
    """

    kind: Literal["gradient", "delta"]
    tensors: Params
    num_tasks: int
    metrics: dict[str, float] = field(default_factory=dict)
    local_steps: int = 1


def task_loss(task_type: TaskType, outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    if task_type == "classification":
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets)


def leaf_grads(leaves: Params) -> Params:
    """The gradients that ``backward`` left on ``leaves`` (zeros where none reached)."""
    return {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs.argmax(dim=-1) == targets).float().mean()


class MetaAlgorithm(ABC):
    """Base class: hyperparameters shared by the gradient-based learners, and the defaults.

    Args:
        model: the architecture; its own parameters are scratch space, never the source of truth.
        task_type: ``"classification"`` or ``"regression"`` (chooses the loss).
        inner_lr: step size of the inner (adaptation) SGD steps.
        inner_steps: inner steps during meta-training.
        test_steps: inner steps at adaptation / test time (the paper uses more than in training).
    """

    name: ClassVar[str] = "base"
    #: True for metric learners (ProtoNet, Matching Networks, Siamese): the meta-model is an
    #: embedding with no classes; only an adapted state predicts.
    embedding_only: ClassVar[bool] = False
    #: True for an algorithm that only classifies although its model has classes (MANN: its
    #: labels are inputs of the controller).
    classifier_only: ClassVar[bool] = False

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1,
                 test_steps: int | None = None) -> None:
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.model = model
        self.task_type: TaskType = task_type
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.test_steps = int(test_steps if test_steps is not None else inner_steps)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return task_loss(self.task_type, outputs, targets)

    def init_params(self) -> Params:
        """Initial meta-parameters (the model's initialisation; subclasses may add more)."""
        return module_params(self.model)

    @abstractmethod
    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        """Meta-gradient of the mean query loss over ``tasks``, and mean metrics over them.

        Metrics use these keys where they apply: ``loss_before``, ``loss_after`` (query loss
        before and after adaptation), ``acc_before``, ``acc_after`` (classification only).
        """

    @abstractmethod
    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        """Adapted state for one support set; ``steps`` defaults to ``test_steps``."""

    @abstractmethod
    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        """Outputs of the adapted state on inputs ``x`` (logits, or regression values)."""

    def predict_groups(self, adapted: Params, x: Tensor) -> Tensor:
        """Outputs ``[G, n, ...]`` for ``G`` independent input batches ``x`` ``[G, n, ...]``,
        each as :meth:`predict` gives it alone (a server groups concurrent requests this way).
        The default runs :meth:`predict` under ``torch.func.vmap``, which keeps every batch's
        own normalisation statistics; subclasses may offer a faster exact route."""
        return torch.func.vmap(partial(self.predict, adapted))(x)

    def meta_update(self, params: Params, tasks: TaskBatch) -> MetaUpdate:
        """One local meta-step's update: the meta-gradient, its task count and metrics."""
        grads, metrics = self.meta_gradient(params, tasks)
        return MetaUpdate("gradient", grads, len(tasks), metrics)

    @torch.no_grad()
    def score(self, adapted: Params, x: Tensor, y: Tensor) -> dict[str, float]:
        """Loss (and accuracy for classification) of an adapted state on labelled inputs."""
        out = self.predict(adapted, x)
        metrics = {"loss": float(self.loss(out, y))}
        if self.task_type == "classification":
            metrics["accuracy"] = float(accuracy(out, y))
        return metrics
