"""Matching Networks (Vinyals et al., 2016): attention over the support set's embeddings.

A query's class distribution is a label-weighted sum over the support examples, weighted by a
softmax over cosine similarities: ``P(y | x̂, S) = Σ_i a(x̂, x_i) y_i``,
``a = softmax_i(cos(f(x̂, S), g(x_i, S)))``. Like ProtoNet, adaptation takes no gradient step:
the support embeddings and their one-hot labels *are* the adapted state. :meth:`predict` returns
``log P``, so that a softmax of it (what serving reports) gives ``P`` back and the
cross-entropy of it is the paper's negative log-likelihood.

The model is a :class:`~metalearn.models.MatchingNet`: ``model(x)`` embeds a support set,
``model(x, support=G)`` embeds queries against it (the two differ with full context
embeddings, ``fce``).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, leaf_grads
from metalearn.params import Params
from metalearn.tasks import TaskBatch

SUPPORT_EMBEDDINGS = "support_embeddings"
SUPPORT_LABELS = "support_labels"  # one-hot, float: the adapted state is all tensors


def attention_log_probs(queries: Tensor, support: Tensor, onehot: Tensor,
                        scale: float = 1.0) -> Tensor:
    """``log Σ_i softmax_i(scale · cos(q, s_i)) y_i``: [Q, ways] from queries [Q, D], support
    embeddings [S, D] and one-hot labels [S, ways]."""
    cos = F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).T  # [Q, S]
    attention = torch.softmax(scale * cos, dim=-1)
    return torch.log((attention @ onehot).clamp_min(torch.finfo(attention.dtype).tiny))


class MatchingNetworks(MetaAlgorithm):
    """Matching Networks over a :class:`~metalearn.models.MatchingNet` (or any module whose
    ``forward(x)`` embeds a support set and ``forward(x, support=G)`` queries; a plain
    embedding network that ignores ``support`` works too).

    Args:
        scale: multiplies the cosine similarities before the softmax (1 is the paper's
            attention; a larger value sharpens it).
        ``inner_lr``, ``inner_steps`` and ``test_steps`` are accepted for a uniform interface
        and ignored: adaptation is an embedding of the support set.
    """

    name: ClassVar[str] = "matching"
    embedding_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 0, test_steps: int | None = None,
                 scale: float = 1.0) -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        if task_type != "classification":
            raise ValueError("Matching Networks are a classifier; task_type must be "
                             "'classification'")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self._own = [k for k, _ in model.named_parameters()]
        self._takes_support = "support" in inspect.signature(model.forward).parameters

    def _embed(self, params: Params, x: Tensor, support: Tensor | None = None) -> Tensor:
        p = {k: params[k] for k in self._own}
        if support is None or not self._takes_support:
            return functional_call(self.model, p, (x,))
        return functional_call(self.model, p, (x,), {"support": support})

    def _log_probs(self, params: Params, sx: Tensor, onehot: Tensor, qx: Tensor) -> Tensor:
        g = self._embed(params, sx)
        return attention_log_probs(self._embed(params, qx, g), g, onehot, self.scale)

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = {k: params[k].detach().requires_grad_(True) for k in self._own}
        ways = int(tasks.support_y.max()) + 1
        losses, accs = [], []
        for t in tasks:  # a loop: the LSTMs of FCE have no vmap rule
            logp = self._log_probs(leaves, t.support_x, F.one_hot(t.support_y, ways)
                                   .to(t.support_x.dtype), t.query_x)
            losses.append(F.nll_loss(logp, t.query_y))
            accs.append((logp.detach().argmax(-1) == t.query_y).float().mean())
        loss = torch.stack(losses).mean()
        loss.backward()
        grads = leaf_grads(leaves)
        return grads, {"loss_after": float(loss.detach()),
                       "acc_after": float(torch.stack(accs).mean())}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        with torch.no_grad():
            g = self._embed(params, support_x)
        onehot = F.one_hot(support_y, int(support_y.max()) + 1).to(g.dtype)
        return {**{k: params[k].detach() for k in self._own}, SUPPORT_EMBEDDINGS: g,
                SUPPORT_LABELS: onehot}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        g = adapted[SUPPORT_EMBEDDINGS]
        return attention_log_probs(self._embed(adapted, x, g), g, adapted[SUPPORT_LABELS],
                                   self.scale)
