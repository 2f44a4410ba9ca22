"""MAML (Finn et al., 2017) and its first-order approximation, FOMAML.

Two implementations of one meta-gradient:

* ``impl="higher"`` — the reference: the model's own parameters hold the meta-parameters and
  `higher` unrolls differentiable SGD steps over them, one task at a time, as higher's own MAML
  example does. The design card names `higher` as the inner-loop library, so it stays available
  and the tests hold every other path to it.
* ``impl="func"`` — :mod:`metalearn.algorithms.maml_func`: the same numbers with
  ``torch.func``, tasks looped, vmapped or folded into grouped convolutions (``strategy``).

Subclasses change only *which* parameters adapt (:meth:`MAML.adapted_keys`, ANIL) and *how*
(:meth:`MAML.inner_update`, Meta-SGD); both implementations follow those two hooks.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import higher
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, accuracy
from metalearn.algorithms.maml_func import FuncMetaGradient, Strategy
from metalearn.folded import Unsupported, forward_groups
from metalearn.params import Params, load_into
from metalearn.tasks import TaskBatch

Impl = Literal["higher", "func"]


class GradientLearner(MetaAlgorithm):
    """What the learners that adapt by SGD share: which parameters adapt, the inner step,
    ``adapt`` / ``predict``, and the fast-path engine (:class:`FuncMetaGradient`)."""

    first_order: bool = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        self.metrics_before = metrics_before
        self._own = [k for k, _ in model.named_parameters()]
        self.fast = FuncMetaGradient(self, strategy, metrics_before)
        self._folds_groups = True  # until forward_groups says the architecture is Unsupported

    # ---- the inner-loop rule (the hooks that ANIL and Meta-SGD override) -------------------

    def model_keys(self, params: Params) -> list[str]:
        """Names of the model's own parameters (meta-parameters may hold more, e.g. lrs)."""
        return self._own

    def adapted_keys(self, params: Params) -> list[str]:
        """Parameters the inner loop updates: all of the model's."""
        return self._own

    def inner_update(self, fast: Params, grads: Params, params: Params) -> Params:
        """One inner SGD step on the adapted parameters ``fast``."""
        return {k: fast[k] - self.inner_lr * grads[k] for k in fast}

    # ---- adaptation ------------------------------------------------------------------------

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        """Plain SGD on the support set, without a graph to the meta-parameters."""
        steps = self.test_steps if steps is None else int(steps)
        keys = self.adapted_keys(params)
        fast = {k: params[k].detach() for k in self.model_keys(params)}
        with torch.enable_grad():
            for _ in range(steps):
                sub = {k: fast[k].detach().requires_grad_(True) for k in keys}
                out = functional_call(self.model, {**fast, **sub}, (support_x,))
                grads = torch.autograd.grad(self.loss(out, support_y), list(sub.values()))
                new = self.inner_update(sub, dict(zip(keys, grads, strict=True)), params)
                fast = {**fast, **{k: v.detach() for k, v in new.items()}}
        return fast

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, {k: adapted[k] for k in self._own}, (x,))

    def predict_groups(self, adapted: Params, x: Tensor) -> Tensor:
        """One forward pass over all groups (:func:`metalearn.folded.forward_groups`)
        where the architecture is covered: 1.6-1.8x faster than ``vmap`` here. Unsupported is
        a property of the architecture, so it is not tried again (a server calls this per
        batch of requests)."""
        if self._folds_groups:
            try:
                return forward_groups(self.model, {k: adapted[k] for k in self._own}, x)
            except Unsupported:
                self._folds_groups = False
        return super().predict_groups(adapted, x)

    def adapt_predict_batch(self, params: Params, tasks: TaskBatch,
                            steps: int | None = None) -> Tensor:
        """Query outputs [B, Q, ...] of every task adapted on its support set, computed for all
        tasks at once (what :func:`metalearn.evaluation.evaluate` uses when it is there)."""
        steps = self.test_steps if steps is None else int(steps)
        fast = self.fast.adapt_batch(params, tasks.support_x, tasks.support_y, steps)
        with torch.no_grad():
            return self.fast.forward_batch(fast, tasks.query_x)


class MAML(GradientLearner):
    """Second-order MAML; ``first_order=True`` is FOMAML.

    Args:
        first_order: drop the second-order terms (the inner gradients are constants to the
            outer gradient). Cheaper, and the usual baseline; registered as ``fomaml``.
        impl: ``"func"`` (fast path, default) or ``"higher"`` (reference).
        strategy: fast-path strategy, ``auto`` | ``vmap`` | ``loop`` | ``grouped``.
        metrics_before: where ``loss_before``/``acc_before`` are measured: ``"support"``
            (free: the first inner step's forward) or ``"query"`` (one extra forward).
    """

    name: ClassVar[str] = "maml"
    supports_higher: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 first_order: bool = False, impl: Impl = "func", strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps, strategy,
                         metrics_before)
        if impl not in ("higher", "func"):
            raise ValueError(f"impl must be 'higher' or 'func', not {impl!r}")
        if impl == "higher" and not self.supports_higher:
            raise ValueError(f"{self.name} has no 'higher' implementation; use impl='func'")
        self.first_order = bool(first_order)
        self.impl: Impl = impl

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        if self.impl == "higher":
            return self._meta_gradient_higher(params, tasks)
        return self.fast.meta_gradient(params, tasks)

    # ---- the reference implementation ------------------------------------------------------

    def _load_model(self, params: Params) -> dict[str, nn.Parameter]:
        """Put the meta-parameters into the module's own (scratch) parameters."""
        first = params[self._own[0]]
        self.model.to(dtype=first.dtype, device=first.device)
        load_into(self.model, params)
        named = dict(self.model.named_parameters())
        for p in named.values():
            p.requires_grad_(True)
            p.grad = None
        return named

    def _meta_gradient_higher(self, params: Params, tasks: TaskBatch
                              ) -> tuple[Params, dict[str, float]]:
        named = self._load_model(params)
        model, n = self.model, len(tasks)
        inner_opt = torch.optim.SGD([named[k] for k in self.adapted_keys(params)],
                                    lr=self.inner_lr)
        rows = []
        for task in tasks:
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not self.first_order) as (fmodel, diffopt):
                before = None
                for step in range(self.inner_steps):
                    out = fmodel(task.support_x)
                    loss = self.loss(out, task.support_y)
                    if step == 0:
                        before = (loss.detach(), out.detach(), task.support_y)
                    diffopt.step(loss)
                out = fmodel(task.query_x)
                qloss = self.loss(out, task.query_y)
                if self.first_order:
                    # With track_higher_grads=False the fast weights are detached: the base
                    # parameters get no .grad from backward(), so the (first-order) gradient
                    # w.r.t. the fast weights is added to them by hand.
                    grads = torch.autograd.grad(qloss / n, list(fmodel.parameters()),
                                                allow_unused=True)
                    for p, g in zip(model.parameters(), grads, strict=True):
                        if g is not None:
                            p.grad = g.detach() if p.grad is None else p.grad + g.detach()
                else:
                    (qloss / n).backward()
            if before is None or self.metrics_before == "query":
                with torch.no_grad():
                    out0 = model(task.query_x)
                before = (self.loss(out0, task.query_y), out0, task.query_y)
            rows.append(self._metric_row(before, (qloss.detach(), out.detach(), task.query_y)))
        grads = {k: (named[k].grad.detach().clone() if named[k].grad is not None
                     else torch.zeros_like(named[k])) for k in self._own}
        for k in params:
            grads.setdefault(k, torch.zeros_like(params[k]))
        return grads, {k: sum(r[k] for r in rows) / n for k in rows[0]}

    def _metric_row(self, before: tuple[Tensor, Tensor, Tensor],
                    after: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
        row = {"loss_before": float(before[0]), "loss_after": float(after[0])}
        if self.task_type == "classification":
            row["acc_before"] = float(accuracy(before[1], before[2]))
            row["acc_after"] = float(accuracy(after[1], after[2]))
        return row


class FOMAML(MAML):
    """First-order MAML: MAML with ``first_order=True`` (a name of its own in the registry)."""

    name: ClassVar[str] = "fomaml"

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 1, test_steps: int | None = None,
                 impl: Impl = "func", strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support") -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps, first_order=True,
                         impl=impl, strategy=strategy, metrics_before=metrics_before)
