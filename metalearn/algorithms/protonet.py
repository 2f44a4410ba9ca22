"""Prototypical networks (Snell et al., 2017): classify by distance to class means.

Adaptation needs no gradient step: the prototypes (mean support embeddings per class) *are*
the adapted state, which is why ``adapt`` returns the embedding parameters plus a
``prototypes`` entry. Logits are negative squared Euclidean distances.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, leaf_grads
from metalearn.params import Params
from metalearn.tasks import TaskBatch

PROTOTYPES = "prototypes"


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean embedding per class: [ways, D] from embeddings [S, D] and labels in 0..ways-1."""
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)  # [S, ways]
    return (onehot.T @ embeddings) / onehot.sum(dim=0).unsqueeze(1)


def neg_sq_distance(queries: Tensor, protos: Tensor) -> Tensor:
    """Logits [Q, ways] = −‖q − p‖² (computed as a difference: exact, no cancellation)."""
    return -(queries.unsqueeze(-2) - protos).square().sum(dim=-1)


class ProtoNet(MetaAlgorithm):
    """ProtoNet over an embedding network (e.g. ``OmniglotConvNet(ways=0)``).

    ``inner_lr``, ``inner_steps`` and ``test_steps`` are accepted for a uniform interface and
    ignored. ``strategy``: ``vmap`` (tasks of a batch in one call, per-task BatchNorm
    statistics) or ``loop``.
    """

    name: ClassVar[str] = "protonet"
    embedding_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 strategy: Literal["vmap", "loop"] = "vmap") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        if task_type != "classification":
            raise ValueError("ProtoNet is a classifier; task_type must be 'classification'")
        if strategy not in ("vmap", "loop"):
            raise ValueError(f"strategy must be 'vmap' or 'loop', not {strategy!r}")
        self.strategy = strategy
        self._own = [k for k, _ in model.named_parameters()]

    def _embed(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, {k: params[k] for k in self._own}, (x,))

    def _task(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, ways: int
              ) -> tuple[Tensor, Tensor]:
        # Support and query are embedded separately, as adapt() and predict() will do at test
        # time: with batch-statistics BatchNorm the batch a sample sits in changes its embedding.
        logits = neg_sq_distance(self._embed(params, qx),
                                 prototypes(self._embed(params, sx), sy, ways))
        loss = F.cross_entropy(logits, qy)
        return loss, (logits.detach().argmax(-1) == qy).float().mean()

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = {k: params[k].detach().requires_grad_(True) for k in self._own}
        ways = int(tasks.support_y.max()) + 1
        if self.strategy == "vmap":
            losses, accs = torch.func.vmap(self._task, in_dims=(None, 0, 0, 0, 0, None))(
                leaves, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, ways)
        else:
            rows = [self._task(leaves, t.support_x, t.support_y, t.query_x, t.query_y, ways)
                    for t in tasks]
            losses, accs = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        losses.mean().backward()
        grads = leaf_grads(leaves)
        return grads, {"loss_after": float(losses.detach().mean()),
                       "acc_after": float(accs.mean())}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        with torch.no_grad():
            emb = self._embed(params, support_x)
            protos = prototypes(emb, support_y, int(support_y.max()) + 1)
        return {**{k: params[k].detach() for k in self._own}, PROTOTYPES: protos}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        return neg_sq_distance(self._embed(adapted, x), adapted[PROTOTYPES])

    def adapt_predict_batch(self, params: Params, tasks: TaskBatch,
                            steps: int | None = None) -> Tensor:
        """Query logits [B, Q, ways] of a whole batch of tasks in one vmapped call."""
        ways = int(tasks.support_y.max()) + 1

        def one(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            return neg_sq_distance(self._embed(params, qx),
                                   prototypes(self._embed(params, sx), sy, ways))

        with torch.no_grad():
            return torch.func.vmap(one)(tasks.support_x, tasks.support_y, tasks.query_x)
