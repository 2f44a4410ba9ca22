"""The fast path of the MAML family: the same meta-gradient as `higher`, without its per-task
module patching, and with the tasks of a batch computed together where that pays.

Strategies (all give the same numbers; which is fastest depends on the model and the CPU):

* ``loop`` — one task at a time, ``functional_call`` + ``autograd.grad(create_graph=True)``.
  Little Python overhead per task; the reference when nothing else is supported.
* ``vmap`` — ``torch.func.vmap`` over the tasks, ``torch.func.grad`` for the inner steps. Wins
  by far for small models (a 1-40-40-1 MLP spends its time in Python, not in kernels).
* ``grouped`` — tasks folded into the channel axis: a batch of per-task convolutions becomes one
  grouped convolution and per-task linears a ``bmm``; BatchNorm over the folded channels is
  BatchNorm with per-task statistics. Only for the nets :mod:`metalearn.folded` covers (its
  :func:`~metalearn.folded.forward_tasks`; serving's per-request forward is the same walk).
* ``auto`` — times the candidates on the first batch of each shape (:data:`STRATEGY_CHOICES`
  keeps the choice and the timings so that a run can report them) and keeps the fastest. The
  candidates are ``loop`` and ``grouped``, or ``loop`` and ``vmap`` for a model that ``grouped``
  does not cover: both batch the tasks, ``grouped`` was faster on every model measured
  (docs/BENCHMARKS.md: 1.9× vmap on the MLP, 2.8× on the conv net), and the first
  ``torch.func.grad`` imports ``torch._dynamo`` (sympy, inductor): about 100 MB more resident
  memory in every process that only tries it, which on an edge site is pure waste.

Gradients of the meta-objective flow to the meta-parameters with ordinary autograd in every
strategy, so one update rule (a MAML step, a Meta-SGD step, an ANIL head-only step) serves all.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import TaskType
from metalearn.folded import forward_tasks, supports_tasks
from metalearn.params import Params
from metalearn.tasks import TaskBatch

Strategy = Literal["auto", "vmap", "loop", "grouped"]
STRATEGIES: tuple[str, ...] = ("auto", "vmap", "loop", "grouped")


class InnerLoop(Protocol):
    """What the engine needs from an algorithm: its model, loss and inner update rule."""

    model: nn.Module
    task_type: TaskType
    inner_steps: int
    first_order: bool

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor: ...

    def model_keys(self, params: Params) -> list[str]: ...

    def adapted_keys(self, params: Params) -> list[str]: ...

    def inner_update(self, fast: Params, grads: Params, params: Params) -> Params: ...


# --------------------------------------------------------------------------------------------
# vmap and normalisation layers.


def _batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    if running_mean is not None or running_var is not None or not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _layer_norm(x: Tensor, normalized_shape: list[int], weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class DecomposedNorms(torch.overrides.TorchFunctionMode):
    """Run batch norm (batch statistics) and layer norm as elementary ops.

    Why: under ``vmap`` of ``torch.func.grad``, the batching rule of the fused norm backward
    gives wrong *second-order* gradients for the layer before an affine BatchNorm or LayerNorm
    (seen on torch 2.13: 1e-2 off in float64; first order is right; pytorch/functorch#534).
    Elementary ops have correct batching rules, so the ``vmap`` strategy runs under this mode.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# The engine.


@dataclass
class StrategyChoice:
    """What ``auto`` decided for one key, and the seconds per meta-gradient it measured."""

    strategy: str
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


STRATEGY_CHOICES: dict[tuple, StrategyChoice] = {}
"""Process-wide: (what, algorithm, model type, parameter shapes, input shapes, ...) -> choice.
Process-wide so that every learner of one architecture in a process (an edge actor's virtual
clients, say) pays the timing once."""


def _mean_metrics(before_loss: Tensor, after_loss: Tensor, before_acc: Tensor | None,
                  after_acc: Tensor | None) -> dict[str, float]:
    metrics = {"loss_before": float(before_loss.mean()), "loss_after": float(after_loss.mean())}
    if before_acc is not None and after_acc is not None:
        metrics["acc_before"] = float(before_acc.float().mean())
        metrics["acc_after"] = float(after_acc.float().mean())
    return metrics


def _acc(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(dim=-1) == y).float().mean()


class FuncMetaGradient:
    """Meta-gradients and batched adaptation for an :class:`InnerLoop`, in several strategies.

    Args:
        alg: the algorithm (model, loss, inner update rule, steps, first order or not).
        strategy: ``auto``, ``vmap``, ``loop`` or ``grouped``.
        metrics_before: ``"support"`` reports ``loss_before``/``acc_before`` from the first
            inner step's support forward (free; the meta-parameters have seen neither set, so
            it estimates the same thing as the query, with fewer examples); ``"query"`` spends
            one extra forward of the query set, without graph, to report them on the query set.
        auto_repeats: timed runs per candidate when ``strategy == "auto"``.
    """

    def __init__(self, alg: InnerLoop, strategy: Strategy = "auto",
                 metrics_before: Literal["support", "query"] = "support",
                 auto_repeats: int = 2) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        if metrics_before not in ("support", "query"):
            raise ValueError(f"metrics_before must be 'support' or 'query', not {metrics_before!r}")
        self.alg, self.strategy, self.metrics_before = alg, strategy, metrics_before
        self.auto_repeats = int(auto_repeats)
        self.last_strategy: str | None = None
        self._grouped: bool | None = None  # whether the model has a grouped forward
        self._norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm)
                          for m in alg.model.modules())

    # ---- shared pieces ---------------------------------------------------------------------

    def _vmap_context(self) -> contextlib.AbstractContextManager:
        """:class:`DecomposedNorms` where the model has norm layers (it costs a Python call
        per op, so models without them skip it)."""
        return DecomposedNorms() if self._norms else contextlib.nullcontext()

    @property
    def classification(self) -> bool:
        return self.alg.task_type == "classification"

    def _support_loss(self, sub: Params, fast: Params, x: Tensor, y: Tensor
                      ) -> tuple[Tensor, Tensor]:
        out = functional_call(self.alg.model, {**fast, **sub}, (x,))
        return self.alg.loss(out, y), out

    def inner_loop(self, params: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool,
                   func_grad: bool) -> tuple[Params, tuple[Tensor, Tensor] | None]:
        """``steps`` inner steps on one task; returns the fast weights and (loss, outputs) of
        the first step. ``func_grad`` uses ``torch.func.grad`` (required under ``vmap``)."""
        alg = self.alg
        fast = {k: params[k] for k in alg.model_keys(params)}
        keys = alg.adapted_keys(params)
        first = None
        for step in range(steps):
            sub = {k: fast[k] for k in keys}
            if func_grad:
                grads, (loss, out) = torch.func.grad_and_value(
                    self._support_loss, has_aux=True)(sub, fast, x, y)
                if not create_graph:
                    grads = {k: g.detach() for k, g in grads.items()}
            else:
                loss, out = self._support_loss(sub, fast, x, y)
                grads = dict(zip(keys, torch.autograd.grad(loss, list(sub.values()),
                                                           create_graph=create_graph),
                                 strict=True))
            if step == 0:
                first = (loss.detach(), out.detach())
            fast = {**fast, **alg.inner_update(sub, grads, params)}
        return fast, first

    def _task_objective(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                        func_grad: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Query loss after adaptation of one task, and (before/after loss and accuracy)."""
        fast, first = self.inner_loop(params, sx, sy, self.alg.inner_steps,
                                      not self.alg.first_order, func_grad)
        out = functional_call(self.alg.model, fast, (qx,))
        loss = self.alg.loss(out, qy)
        after = (loss.detach(), _acc(out.detach(), qy) if self.classification else loss.detach())
        if self.metrics_before == "query" or first is None:
            with torch.no_grad():
                q0 = functional_call(self.alg.model,
                                     {k: params[k] for k in self.alg.model_keys(params)}, (qx,))
            first = (self.alg.loss(q0, qy), q0)
            before = (first[0], _acc(q0, qy) if self.classification else first[0])
        else:
            before = (first[0], _acc(first[1], sy) if self.classification else first[0])
        return loss, (*before, *after)

    def _leaves(self, params: Params) -> Params:
        return {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def _collect(self, leaves: Params) -> Params:
        return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in
                leaves.items()}

    def _metrics(self, stats: tuple[Tensor, ...]) -> dict[str, float]:
        lb, ab, la, aa = stats
        if self.classification:
            return _mean_metrics(lb, la, ab, aa)
        return _mean_metrics(lb, la, None, None)

    # ---- meta-gradient strategies ----------------------------------------------------------

    def _mg_loop(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves, n, rows = self._leaves(params), len(tasks), []
        for t in tasks:
            loss, stats = self._task_objective(leaves, t.support_x, t.support_y, t.query_x,
                                               t.query_y, func_grad=False)
            (loss / n).backward()
            rows.append(torch.stack([s.double() for s in stats]))
        return self._collect(leaves), self._metrics(tuple(torch.stack(rows).T))

    def _mg_vmap(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = self._leaves(params)

        def objective(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
                      ) -> tuple[Tensor, tuple[Tensor, ...]]:
            return self._task_objective(p, sx, sy, qx, qy, func_grad=True)

        with self._vmap_context():
            losses, stats = torch.func.vmap(objective, in_dims=(None, 0, 0, 0, 0))(
                leaves, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
        losses.mean().backward()
        return self._collect(leaves), self._metrics(stats)

    def _grouped_inner(self, params: Params, x: Tensor, y: Tensor, steps: int,
                       create_graph: bool) -> tuple[Params, tuple[Tensor, Tensor] | None]:
        alg, n = self.alg, x.shape[0]
        fast = {k: params[k].expand(n, *params[k].shape) for k in alg.model_keys(params)}
        keys = alg.adapted_keys(params)
        first = None
        for step in range(steps):
            out = forward_tasks(alg.model, fast, x)
            # Tasks have equal sizes, so n × (the loss over all rows) = the sum of task losses,
            # whose gradient w.r.t. the per-task weights is each task's own gradient.
            loss = alg.loss(out.flatten(0, 1), y.flatten(0, 1)) * n
            grads = dict(zip(keys, torch.autograd.grad(loss, [fast[k] for k in keys],
                                                       create_graph=create_graph), strict=True))
            if step == 0:
                first = (loss.detach() / n, out.detach())
            sub = {k: fast[k] for k in keys}
            fast = {**fast, **alg.inner_update(sub, grads, params)}
        return fast, first

    def _mg_grouped(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        alg, leaves = self.alg, self._leaves(params)
        fast, first = self._grouped_inner(leaves, tasks.support_x, tasks.support_y,
                                          alg.inner_steps, not alg.first_order)
        out = forward_tasks(alg.model, fast, tasks.query_x)
        qy = tasks.query_y
        loss = alg.loss(out.flatten(0, 1), qy.flatten(0, 1))
        loss.backward()
        if self.metrics_before == "query" or first is None:
            with torch.no_grad():
                mk = alg.model_keys(params)
                q0 = forward_tasks(alg.model, {k: params[k].unsqueeze(0).expand(
                    len(tasks), *params[k].shape) for k in mk}, tasks.query_x)
            first, y0 = (alg.loss(q0.flatten(0, 1), qy.flatten(0, 1)), q0), qy
        else:
            y0 = tasks.support_y
        metrics = {"loss_before": float(first[0]), "loss_after": float(loss.detach())}
        if self.classification:
            metrics["acc_before"] = float(_acc(first[1], y0))
            metrics["acc_after"] = float(_acc(out.detach(), qy))
        return self._collect(leaves), metrics

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        """Gradient of the mean post-adaptation query loss, and mean metrics over the tasks."""
        run = {"loop": self._mg_loop, "vmap": self._mg_vmap, "grouped": self._mg_grouped}
        strategy = self.strategy
        if strategy == "auto":
            key = self._key("meta_gradient", params, tasks.support_x, tasks.query_x)
            choice = STRATEGY_CHOICES.get(key)
            if choice is None:
                choice, result = self._time_candidates(run, params, tasks, tasks.support_x)
                STRATEGY_CHOICES[key] = choice
                self.last_strategy = choice.strategy
                return result
            strategy = choice.strategy
        self.last_strategy = strategy
        return run[strategy](params, tasks)

    # ---- batched adaptation (Reptile's inner loop, evaluation) -----------------------------

    def _batched_strategy(self, params: Params, x: Tensor) -> str:
        if self.strategy in ("auto", "grouped"):
            return "grouped" if self._grouped_ok(params, x) else "vmap"
        return self.strategy

    def adapt_batch(self, params: Params, x: Tensor, y: Tensor, steps: int,
                    with_first: bool = False) -> Any:
        """Adapted model parameters of B tasks at once ([B, ...] each), without graph.

        ``auto`` prefers the grouped forward where the model has one, else ``vmap``: without
        a second-order graph both are far cheaper than a loop of small per-task calls. With
        ``with_first``, also returns (loss, outputs [B, N, ...]) of the first inner step, or
        None when ``steps == 0``.
        """
        base = {k: v.detach() for k, v in params.items()}
        mk = self.alg.model_keys(params)
        if steps == 0:
            fast = {k: base[k].expand(x.shape[0], *base[k].shape) for k in mk}
            return (fast, None) if with_first else fast
        strategy = self._batched_strategy(params, x)
        with torch.enable_grad():
            if strategy == "grouped":
                fast, first = self._grouped_inner(self._leaves(base), x, y, steps, False)
            elif strategy == "vmap":
                def one(xi: Tensor, yi: Tensor) -> tuple[Params, Any]:
                    return self.inner_loop(base, xi, yi, steps, False, func_grad=True)

                with self._vmap_context():
                    fast, first = torch.func.vmap(one)(x, y)
            else:
                rows = [self.inner_loop(self._leaves(base), xi, yi, steps, False, False)
                        for xi, yi in zip(x, y, strict=True)]
                fast = {k: torch.stack([r[0][k].detach() for r in rows]) for k in rows[0][0]}
                first = tuple(torch.stack([r[1][i] for r in rows]) for i in range(2))
        fast = {k: v.detach() for k, v in fast.items()}
        return (fast, first) if with_first else fast

    def forward_batch(self, fast: Params, x: Tensor) -> Tensor:
        """Outputs [B, N, ...] of B tasks' adapted parameters on their inputs x [B, N, ...]."""
        strategy = self._batched_strategy({k: v[0] for k, v in fast.items()}, x)
        if strategy == "grouped":
            return forward_tasks(self.alg.model, fast, x)
        if strategy == "vmap":
            return torch.func.vmap(self._forward_one)(fast, x)
        return torch.stack([self._forward_one({k: v[i] for k, v in fast.items()}, x[i])
                            for i in range(x.shape[0])])

    def _forward_one(self, p: Params, x: Tensor) -> Tensor:
        return functional_call(self.alg.model, p, (x,))

    # ---- auto ------------------------------------------------------------------------------

    def _grouped_ok(self, params: Params, x: Tensor) -> bool:
        if self._grouped is None:
            self._grouped = supports_tasks(
                self.alg.model, {k: params[k] for k in self.alg.model_keys(params)}, x)
        return self._grouped

    def _key(self, what: str, params: Params, *inputs: Tensor) -> tuple:
        alg = self.alg
        return (what, type(alg).__name__, type(alg.model).__name__,
                tuple((k, tuple(v.shape), v.dtype) for k, v in params.items()),
                tuple(tuple(t.shape) for t in inputs), alg.inner_steps, alg.first_order,
                self.metrics_before)

    def _time_candidates(self, run: dict[str, Callable], params: Params, tasks: TaskBatch,
                         x: Tensor) -> tuple[StrategyChoice, tuple[Params, dict[str, float]]]:
        names = ["loop", "grouped" if self._grouped_ok(params, x) else "vmap"]
        seconds, failed, results = {}, {}, {}
        for name in names:
            best = float("inf")
            try:
                for _ in range(self.auto_repeats):
                    t0 = time.perf_counter()
                    results[name] = run[name](params, tasks)
                    best = min(best, time.perf_counter() - t0)
            except Exception as err:  # a model vmap cannot batch: drop the candidate
                failed[name] = f"{type(err).__name__}: {err}"
                continue
            seconds[name] = best
        if not seconds:
            raise RuntimeError(f"no fast-path strategy worked: {failed}")
        if "loop" in results:  # a strategy that disagrees with the plain loop is a bug: drop it
            ref = results["loop"][0]
            scale = max(float(v.abs().max()) for v in ref.values())
            tol = (1e-7 if next(iter(ref.values())).dtype == torch.float64 else 1e-3) * (1 + scale)
            for name in list(seconds):
                diff = max(float((results[name][0][k] - ref[k]).abs().max()) for k in ref)
                if diff > tol:
                    failed[name] = f"gradient differs from the loop by {diff:.3g} (> {tol:.3g})"
                    del seconds[name]
        best_name = min(seconds, key=seconds.__getitem__)
        return StrategyChoice(best_name, seconds, failed), results[best_name]


def strategy_report() -> list[dict[str, object]]:
    """The choices ``auto`` made in this process, as rows for a results table."""
    return [{"key": k[:3] + k[4:], "strategy": c.strategy, "seconds": dict(c.seconds),
             "failed": dict(c.failed)} for k, c in STRATEGY_CHOICES.items()]
