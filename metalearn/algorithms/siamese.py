"""Siamese networks (Koch et al., 2015): a twin learns whether two inputs share a class.

Meta-training turns each episode into pairs: every two of its examples (support and query
together) with the target "same class". The twin embeds both, the weighted L1 distance of the
two embeddings and a sigmoid give the probability that they match, and the loss is the binary
cross-entropy, by default balanced so that same-class and different-class pairs weigh half each
(an N-way episode has about N times more different pairs). One-shot classification puts a query
in the class of its most similar support example.

The adapted state is the twin's parameters plus the support set's embeddings and one-hot
labels; :meth:`SiameseNetworks.predict` gives, per class, the highest same-class logit over that
class's support examples (its argmax is the most similar example's class).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, leaf_grads
from metalearn.models import weighted_l1
from metalearn.params import Params
from metalearn.tasks import TaskBatch

SUPPORT_FEATURES = "support_features"
SUPPORT_LABELS = "support_labels"  # one-hot, float


def pair_loss(logits: Tensor, same: Tensor, balanced: bool = True) -> Tensor:
    """BCE of same-class logits ``[N, N]`` against ``same`` ``[N, N]`` over the pairs i < j;
    ``balanced``: same-class and different-class pairs weigh half each (when both occur)."""
    upper = torch.triu(torch.ones_like(same, dtype=torch.bool), diagonal=1)
    target = same.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pos, neg = upper & same, upper & ~same
    if not balanced or not bool(pos.any()) or not bool(neg.any()):
        return bce[upper].mean()
    return 0.5 * bce[pos].mean() + 0.5 * bce[neg].mean()


def class_scores(logits: Tensor, onehot: Tensor) -> Tensor:
    """Per class, the highest same-class logit among its support examples: [Q, ways] from
    query-support logits [Q, S] and one-hot support labels [S, ways]."""
    masked = logits.unsqueeze(-1).masked_fill(onehot.unsqueeze(0) == 0,
                                              torch.finfo(logits.dtype).min)
    return masked.amax(dim=1)


class SiameseNetworks(MetaAlgorithm):
    """Siamese networks over a twin whose ``forward(x)`` embeds and whose layer ``head`` (a
    ``Linear(H, 1)``) holds the weights α and bias of the weighted L1 distance, e.g.
    :class:`~metalearn.models.SiameseNet`.

    Args:
        balanced: weigh same-class and different-class pairs half each in the loss.
        head: the name of the distance layer.
        ``inner_lr``, ``inner_steps`` and ``test_steps`` are accepted for a uniform interface
        and ignored: adaptation embeds the support set.
    """

    name: ClassVar[str] = "siamese"
    embedding_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 0, test_steps: int | None = None,
                 balanced: bool = True, head: str = "distance_head") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        if task_type != "classification":
            raise ValueError("Siamese networks are a classifier; task_type must be "
                             "'classification'")
        self.balanced = bool(balanced)
        self.head = head
        self._own = [k for k, _ in model.named_parameters()]
        if f"{head}.weight" not in self._own or f"{head}.bias" not in self._own:
            raise ValueError(f"Siamese networks need the weighted L1 distance's layer "
                             f"'{head}' (a Linear(H, 1)) in the model, e.g. model "
                             f"'siamese_net'; the model has {self._own}")

    def _embed(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, {k: params[k] for k in self._own}, (x,))

    def _distance(self, params: Params, h1: Tensor, h2: Tensor) -> Tensor:
        return weighted_l1(h1, h2, params[f"{self.head}.weight"], params[f"{self.head}.bias"])

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = {k: params[k].detach().requires_grad_(True) for k in self._own}
        losses, accs = [], []
        ways = int(tasks.support_y.max()) + 1
        for t in tasks:
            # Support and query are embedded separately, as adapt() and predict() do.
            h = torch.cat([self._embed(leaves, t.support_x), self._embed(leaves, t.query_x)])
            y = torch.cat([t.support_y, t.query_y])
            logits = self._distance(leaves, h, h)
            losses.append(pair_loss(logits, y.unsqueeze(0) == y.unsqueeze(1), self.balanced))
            n_s = t.support_y.shape[0]
            scores = class_scores(logits[n_s:, :n_s].detach(),
                                  F.one_hot(t.support_y, ways))
            accs.append((scores.argmax(-1) == t.query_y).float().mean())
        loss = torch.stack(losses).mean()
        loss.backward()
        grads = leaf_grads(leaves)
        return grads, {"loss_after": float(loss.detach()),
                       "acc_after": float(torch.stack(accs).mean())}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        with torch.no_grad():
            h = self._embed(params, support_x)
        onehot = F.one_hot(support_y, int(support_y.max()) + 1).to(h.dtype)
        return {**{k: params[k].detach() for k in self._own}, SUPPORT_FEATURES: h,
                SUPPORT_LABELS: onehot}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        logits = self._distance(adapted, self._embed(adapted, x), adapted[SUPPORT_FEATURES])
        return class_scores(logits, adapted[SUPPORT_LABELS])
