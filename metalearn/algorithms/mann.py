"""Memory-augmented neural networks (Santoro et al., 2016): an LSTM controller that writes to and
reads from an external memory with least-recently-used access (LRUA).

An episode is a *sequence*: at step ``t`` the controller sees the input ``x_t`` together with
the label of the step before, ``y_{t-1}`` (labels presented one step late), so that to predict
``y_t`` it must have bound an earlier example of the class to its label in memory. Each step:

* controller: ``(h, c) = LSTM([e(x_t), y_{t-1}, r_{t-1}], (h, c))``, ``e`` a conv embedding;
* a read key ``k = tanh(W_k h)``, an add vector ``a = tanh(W_a h)`` and a gate ``α = W_α h``;
* write (LRUA): ``w_w = σ(α) w_r_{t-1} + (1 − σ(α)) w_lu_{t-1}`` (the last read location or the
  least-used one); the least-used slot is erased, then ``M ← M + w_w aᵀ``;
* read: ``w_r = softmax_i cos(k, M_i)``, ``r = w_r M``; usage ``u = γ u + w_r + w_w``;
* output: ``W_o [h, r]``, logits over the episode's ``ways`` labels.

Meta-training feeds the support set as a sequence (in an order drawn from the task's own content,
:func:`~metalearn.algorithms.seeding.task_generator`, since episodes arrive class by class), then
scores each query as the next step from the state the support sequence left (the pending label
is the last support example's), the branches independent of each other; the loss is the
queries' cross-entropy. Adaptation is that reading of the support sequence: the adapted state is
the network's parameters plus the filled memory, its usage, the controller's state and the
pending label (:data:`STATE`). A meta-model without them is a MANN with an empty memory.

One read head (the paper uses four on Omniglot) and a conv embedding in front of the controller
(the paper feeds raw pixels); the ways are fixed by the model, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, leaf_grads
from metalearn.algorithms.seeding import task_generator
from metalearn.params import Params
from metalearn.tasks import TaskBatch

#: A fresh memory's every cell (the paper's small constant: a cosine with a zero row is undefined).
MEMORY_INIT = 1e-6


@dataclass
class MemoryState:
    """The recurrent state of a batch ``[B, ...]`` of MANN sequences."""

    memory: Tensor  # [B, N, W]
    usage: Tensor  # [B, N]
    read_weights: Tensor  # [B, N]
    read: Tensor  # [B, W]
    hidden: Tensor  # [B, H]
    cell: Tensor  # [B, H]
    pending_label: Tensor  # [B, ways]: the label the next step is shown (one step late)

    def expand(self, n: int) -> MemoryState:
        """Each sequence's state repeated for ``n`` independent branches: ``[B * n, ...]``."""
        return MemoryState(*(t.repeat_interleave(n, dim=0) for t in self.tensors()))

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


#: The adapted state's entries (besides the parameters): one sequence's state, unbatched.
STATE = [f.name for f in fields(MemoryState)]


def lru_write(memory: Tensor, usage: Tensor, read_weights: Tensor, add: Tensor,
              gate: Tensor) -> tuple[Tensor, Tensor]:
    """LRUA write: the new memory ``[B, N, W]`` and the write weights ``[B, N]``.

    ``gate`` ``[B]`` is the logit α; the least-used slot (smallest usage, first on a tie) is
    erased before ``w_w = σ(α) w_r + (1 − σ(α)) w_lu`` adds ``add`` ``[B, W]``."""
    least = (torch.arange(usage.shape[-1], device=usage.device)
             == usage.argmin(dim=-1, keepdim=True)).to(memory.dtype)
    s = torch.sigmoid(gate).unsqueeze(-1)
    write = s * read_weights + (1 - s) * least
    memory = memory * (1 - least).unsqueeze(-1) + write.unsqueeze(-1) * add.unsqueeze(-2)
    return memory, write


def content_read(memory: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Read weights ``softmax_i cos(key, M_i)`` ``[B, N]`` and the read vector ``[B, W]``."""
    weights = torch.softmax(F.cosine_similarity(memory, key.unsqueeze(-2), dim=-1), dim=-1)
    return weights, (weights.unsqueeze(-1) * memory).sum(dim=-2)


def delayed_labels(labels: Tensor, ways: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One-hot labels shown one step late: for a sequence ``[B, S]`` the labels each step sees
    ``[B, S, ways]`` (zeros first, then ``y_0 .. y_{S-2}``) and the one still pending
    (``y_{S-1}``)."""
    onehot = F.one_hot(labels, ways).to(dtype)
    shown = torch.cat([torch.zeros_like(onehot[:, :1]), onehot[:, :-1]], dim=1)
    return shown, onehot[:, -1]


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              b_hh: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.nn.LSTMCell``'s step written on explicit parameters (gates i, f, g, o)."""
    i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class MANN(MetaAlgorithm):
    """MANN over a :class:`~metalearn.models.MANNNet` (an ``encoder``, an LSTMCell
    ``controller``, linear ``key``, ``add``, ``gate`` and ``head``, and ``ways``, ``slots``,
    ``width``).

    Args:
        usage_decay: γ, how fast usage fades (the paper's 0.95 is typical).
        order_seed: mixed into the content seed of the support sequence's order.
        ``inner_lr``, ``inner_steps`` and ``test_steps`` are accepted for a uniform interface
        and ignored: adaptation is a forward pass over the support sequence.
    """

    name: ClassVar[str] = "mann"
    classifier_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 0, test_steps: int | None = None,
                 usage_decay: float = 0.95, order_seed: int = 0) -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        if task_type != "classification":
            raise ValueError("MANN is a classifier here; task_type must be 'classification'")
        if not 0 <= usage_decay <= 1:
            raise ValueError(f"usage_decay must be in [0, 1], got {usage_decay}")
        needed = ("encoder", "controller", "key", "add", "gate", "head")
        if any(not isinstance(getattr(model, n, None), nn.Module) for n in needed) \
                or not all(isinstance(getattr(model, n, None), int)
                           for n in ("ways", "slots", "width")):
            raise ValueError(f"MANN needs a model with submodules {list(needed)} and int "
                             "'ways', 'slots', 'width', e.g. model 'mann_net'")
        self.usage_decay, self.order_seed = float(usage_decay), int(order_seed)
        self.ways, self.slots, self.width = int(model.ways), int(model.slots), int(model.width)
        self.hidden_units = int(model.controller.hidden_size)
        self._own = [k for k, _ in model.named_parameters()]
        self._enc = [k for k in self._own if k.startswith("encoder.")]

    # ----------------------------------------------------------------- the recurrence

    def _embed(self, params: Params, x: Tensor) -> Tensor:
        enc = {k.removeprefix("encoder."): params[k] for k in self._enc}
        return functional_call(self.model.encoder, enc, (x,))

    def initial_state(self, batch: int, like: Tensor) -> MemoryState:
        """An empty memory (every cell ``MEMORY_INIT``), zero usage, controller state and
        labels."""
        def zeros(*shape: int) -> Tensor:
            return like.new_zeros(batch, *shape)
        return MemoryState(like.new_full((batch, self.slots, self.width), MEMORY_INIT),
                           zeros(self.slots), zeros(self.slots), zeros(self.width),
                           zeros(self.hidden_units), zeros(self.hidden_units), zeros(self.ways))

    def step(self, p: Params, state: MemoryState, emb: Tensor, label: Tensor
             ) -> tuple[MemoryState, Tensor]:
        """One step for a batch: embeddings ``[B, D]`` shown with labels ``[B, ways]``; the new
        state (its pending label unchanged) and the logits ``[B, ways]``."""
        h, c = lstm_cell(torch.cat([emb, label, state.read], dim=-1), state.hidden, state.cell,
                         p["controller.weight_ih"], p["controller.weight_hh"],
                         p["controller.bias_ih"], p["controller.bias_hh"])
        key = torch.tanh(F.linear(h, p["key.weight"], p["key.bias"]))
        add = torch.tanh(F.linear(h, p["add.weight"], p["add.bias"]))
        gate = F.linear(h, p["gate.weight"], p["gate.bias"]).squeeze(-1)
        memory, write = lru_write(state.memory, state.usage, state.read_weights, add, gate)
        read_weights, read = content_read(memory, key)
        usage = self.usage_decay * state.usage + read_weights + write
        logits = F.linear(torch.cat([h, read], dim=-1), p["head.weight"], p["head.bias"])
        return MemoryState(memory, usage, read_weights, read, h, c, state.pending_label), logits

    def read_support(self, p: Params, emb: Tensor, labels: Tensor) -> MemoryState:
        """The state after a batch of support sequences ``[B, S, D]`` with labels ``[B, S]``
        (already in sequence order), the last label pending."""
        shown, pending = delayed_labels(labels, self.ways, emb.dtype)
        state = self.initial_state(emb.shape[0], emb)
        for t in range(emb.shape[1]):
            state, _ = self.step(p, state, emb[:, t], shown[:, t])
        state.pending_label = pending
        return state

    def query(self, p: Params, state: MemoryState, emb: Tensor) -> Tensor:
        """Logits ``[B, Q, ways]``: each query ``[B, Q, D]`` one step from its sequence's state,
        shown the pending label; the branches do not see each other's writes."""
        b, q = emb.shape[:2]
        branches = state.expand(q)
        _, logits = self.step(p, branches, emb.reshape(b * q, -1), branches.pending_label)
        return logits.reshape(b, q, -1)

    def order(self, support_x: Tensor) -> Tensor:
        """The support sequence's order: a permutation drawn from the support set's content."""
        n = support_x.shape[0]
        return torch.randperm(n, generator=task_generator(support_x, self.order_seed)) \
            .to(support_x.device)

    def _logits(self, p: Params, tasks: TaskBatch) -> Tensor:
        if int(tasks.support_y.max()) >= self.ways:
            raise ValueError(f"this MANN has {self.ways} ways; the support set has labels up to "
                             f"{int(tasks.support_y.max())}")
        perms = torch.stack([self.order(sx) for sx in tasks.support_x])
        es = torch.func.vmap(self._embed, in_dims=(None, 0))(p, tasks.support_x)
        eq = torch.func.vmap(self._embed, in_dims=(None, 0))(p, tasks.query_x)
        es = es.gather(1, perms.unsqueeze(-1).expand_as(es))
        state = self.read_support(p, es, tasks.support_y.gather(1, perms))
        return self.query(p, state, eq)

    # ----------------------------------------------------------------- the interface

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = {k: params[k].detach().requires_grad_(True) for k in self._own}
        logits = self._logits(leaves, tasks)
        loss = F.cross_entropy(logits.flatten(0, 1), tasks.query_y.flatten())
        loss.backward()
        acc = (logits.detach().argmax(-1) == tasks.query_y).float().mean()
        return leaf_grads(leaves), {"loss_after": float(loss.detach()), "acc_after": float(acc)}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        if int(support_y.max()) >= self.ways:
            raise ValueError(f"this MANN has {self.ways} ways; the support set has labels up to "
                             f"{int(support_y.max())}")
        perm = self.order(support_x)
        with torch.no_grad():
            emb = self._embed(params, support_x)[perm]
            state = self.read_support(params, emb[None], support_y[perm][None])
        base = {k: params[k].detach() for k in self._own}
        return {**base, **{k: v[0] for k, v in zip(STATE, state.tensors(), strict=True)}}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        emb = self._embed(adapted, x)
        if STATE[0] in adapted:
            state = MemoryState(*(adapted[k][None] for k in STATE))
        else:  # a meta-model: an empty memory
            state = self.initial_state(1, emb)
        return self.query(adapted, state, emb[None])[0]

    def adapt_predict_batch(self, params: Params, tasks: TaskBatch,
                            steps: int | None = None) -> Tensor:
        """Query logits [B, Q, ways] of a whole batch of tasks in one batched recurrence."""
        with torch.no_grad():
            return self._logits(params, tasks)
