"""VERSA (Gordon et al., 2019, "Meta-Learning Probabilistic Inference for Prediction"):
amortized variational inference of a task's classifier.

An amortization network maps each class's support embeddings, mean-pooled, to a Gaussian over
that class's weight vector and bias: ``q(w_c, b_c | S) = N(μ(h̄_c), diag σ²(h̄_c))``. No gradient
step adapts to a task; one forward pass infers its classifier. The predictive is a Monte Carlo
average over ``samples`` draws by reparameterisation,
``p(y | x, S) ≈ 1/L Σ_l softmax(W_l e(x) + b_l)``, and meta-training maximises its log on the
query set (the paper's objective, ``log 1/L Σ_l p(y | x, w_l)``, computed stably with
``logsumexp``). :meth:`VERSA.predict` returns the log of that average, so a softmax of it
(what serving reports) gives the predictive back.

The draws come from a generator seeded by the support set's content
(:func:`~metalearn.algorithms.seeding.task_generator`), and the adapted state stores them with
the distribution (``weight_mean``, ``weight_logvar``, ``bias_mean``, ``bias_logvar``,
``weight_samples``, ``bias_samples``): an adapted model predicts deterministically, on a replica
as offline.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, leaf_grads
from metalearn.algorithms.protonet import prototypes
from metalearn.algorithms.seeding import task_generator
from metalearn.params import Params
from metalearn.tasks import TaskBatch

HEADS = ("weight_mean", "weight_logvar", "bias_mean", "bias_logvar")
SAMPLES = ("weight_samples", "bias_samples")


def versa_noise(support_x: Tensor, samples: int, ways: int, dim: int, seed: int = 0
                ) -> tuple[Tensor, Tensor]:
    """Standard normal draws ``[L, ways, dim]`` and ``[L, ways]`` for a support set's
    classifier samples."""
    g = task_generator(support_x, seed)
    eps = torch.randn(samples, ways, dim + 1, generator=g)
    eps = eps.to(device=support_x.device, dtype=support_x.dtype)
    return eps[..., :dim], eps[..., dim]


def predictive_log_probs(emb: Tensor, weights: Tensor, biases: Tensor) -> Tensor:
    """``log 1/L Σ_l softmax(W_l e + b_l)``: [Q, ways] from embeddings [Q, D], weight samples
    [L, ways, D] and bias samples [L, ways]."""
    logits = torch.einsum("qd,lcd->lqc", emb, weights) + biases.unsqueeze(1)
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(weights.shape[0])


class VERSA(MetaAlgorithm):
    """VERSA over a :class:`~metalearn.models.VersaNet` (``forward(x)`` embeds; submodules
    ``amortizer`` and the four linear heads :data:`HEADS`).

    Args:
        samples: Monte Carlo draws of the classifier (the paper trains with 10).
        noise_seed: mixed into the content seed of the draws.
        ``inner_lr``, ``inner_steps`` and ``test_steps`` are accepted for a uniform interface
        and ignored: adaptation is amortized inference.
    """

    name: ClassVar[str] = "versa"
    embedding_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 0, test_steps: int | None = None,
                 samples: int = 10, noise_seed: int = 0) -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        if task_type != "classification":
            raise ValueError("VERSA is a classifier here; task_type must be 'classification'")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if any(not isinstance(getattr(model, n, None), nn.Module)
               for n in ("encoder", "amortizer", *HEADS)):
            raise ValueError(f"VERSA needs a model with submodules 'encoder', 'amortizer' and "
                             f"{list(HEADS)}, e.g. model 'versa_net'")
        self.samples, self.noise_seed = int(samples), int(noise_seed)
        self._own = [k for k, _ in model.named_parameters()]

    def _call(self, params: Params, module: str, x: Tensor) -> Tensor:
        sub = {k.removeprefix(module + "."): v for k, v in params.items()
               if k.startswith(module + ".")}
        return functional_call(getattr(self.model, module), sub, (x,))

    def _embed(self, params: Params, x: Tensor) -> Tensor:
        return self._call(params, "encoder", x)

    def posterior(self, params: Params, sx: Tensor, sy: Tensor, ways: int) -> dict[str, Tensor]:
        """The classifier's Gaussian per class: weight mean and log-variance [ways, D], bias
        mean and log-variance [ways], from the class means of the support embeddings."""
        h = self._call(params, "amortizer", prototypes(self._embed(params, sx), sy, ways))
        out = {k: self._call(params, k, h) for k in HEADS}
        return {**out, "bias_mean": out["bias_mean"].squeeze(-1),
                "bias_logvar": out["bias_logvar"].squeeze(-1)}

    def _draw(self, post: dict[str, Tensor], eps_w: Tensor, eps_b: Tensor
              ) -> tuple[Tensor, Tensor]:
        w = post["weight_mean"] + (0.5 * post["weight_logvar"]).exp() * eps_w
        b = post["bias_mean"] + (0.5 * post["bias_logvar"]).exp() * eps_b
        return w, b

    def _noise(self, support_x: Tensor, ways: int) -> tuple[Tensor, Tensor]:
        dim = int(self.model.weight_mean.out_features)
        return versa_noise(support_x, self.samples, ways, dim, self.noise_seed)

    def _task(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, ways: int) -> Tensor:
        w, b = self._draw(self.posterior(params, sx, sy, ways), *self._noise(sx, ways))
        return predictive_log_probs(self._embed(params, qx), w, b)

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = {k: params[k].detach().requires_grad_(True) for k in self._own}
        ways = int(tasks.support_y.max()) + 1
        logp = torch.stack([self._task(leaves, t.support_x, t.support_y, t.query_x, ways)
                            for t in tasks])  # a loop: the draws are seeded per task
        loss = F.nll_loss(logp.flatten(0, 1), tasks.query_y.flatten())
        loss.backward()
        acc = (logp.detach().argmax(-1) == tasks.query_y).float().mean()
        return leaf_grads(leaves), {"loss_after": float(loss.detach()), "acc_after": float(acc)}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        ways = int(support_y.max()) + 1
        with torch.no_grad():
            post = self.posterior(params, support_x, support_y, ways)
            w, b = self._draw(post, *self._noise(support_x, ways))
        return {**{k: params[k].detach() for k in self._own}, **post,
                SAMPLES[0]: w, SAMPLES[1]: b}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        return predictive_log_probs(self._embed(adapted, x), adapted[SAMPLES[0]],
                                    adapted[SAMPLES[1]])

    def adapt_predict_batch(self, params: Params, tasks: TaskBatch,
                            steps: int | None = None) -> Tensor:
        """Query log-probabilities [B, Q, ways] of a batch of tasks."""
        ways = int(tasks.support_y.max()) + 1
        with torch.no_grad():
            return torch.stack([self._task(params, t.support_x, t.support_y, t.query_x, ways)
                                for t in tasks])
