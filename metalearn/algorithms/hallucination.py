"""Support-set hallucination (Wang et al., 2018, "Low-Shot Learning from Imaginary Data"):
a generator that makes extra training examples for a new task, trained end to end with a
prototypical-network classifier.

The generator ``G`` takes a support example's embedding and a noise vector and returns an
embedding of an imagined example of the same class; here residually,
``h = e + G([e, z])``, so that an untrained generator (its last layer starts at zero, see
:class:`~metalearn.models.HallucinatorNet`) copies its seed and the method starts as ProtoNet.
Each support example seeds ``generated`` hallucinations; prototypes are the class means over the
real and the generated embeddings, and the query loss of ProtoNet trains the embedding and the
generator together (the paper's meta-learning objective; its extra classification loss on the
hallucinations is left out).

The noise comes from a generator seeded by the support set's content
(:func:`~metalearn.algorithms.seeding.task_generator`): a task gets the same hallucinations on
every site and on every replica. The adapted state is the network's parameters, the prototypes,
and the generated embeddings themselves (``generated_embeddings``, ``generated_labels``),
which is the data the method produced for the task.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms.base import MetaAlgorithm, TaskType, leaf_grads
from metalearn.algorithms.protonet import PROTOTYPES, neg_sq_distance, prototypes
from metalearn.algorithms.seeding import task_generator
from metalearn.params import Params
from metalearn.tasks import TaskBatch

GENERATED_EMBEDDINGS = "generated_embeddings"
GENERATED_LABELS = "generated_labels"  # one-hot, float: the adapted state is all tensors


def hallucination_noise(support_x: Tensor, generated: int, noise_dim: int, seed: int = 0
                        ) -> Tensor:
    """The noise ``[S * generated, noise_dim]`` a support set's hallucinations are made from."""
    g = task_generator(support_x, seed)
    z = torch.randn(support_x.shape[0] * generated, noise_dim, generator=g)
    return z.to(device=support_x.device, dtype=support_x.dtype)


class SupportHallucination(MetaAlgorithm):
    """ProtoNet over the support set augmented by a learned generator.

    The model (e.g. :class:`~metalearn.models.HallucinatorNet`) embeds with ``forward(x)``,
    holds the generator as the submodule named ``generator`` (input ``[e, z]``, output of the
    embedding's width) and says its noise width as ``noise_dim``.

    Args:
        generated: hallucinations per support example (the paper augments each class to a
            fixed size; per example is the same for balanced episodes).
        noise_seed: mixed into the content seed of the noise.
        ``inner_lr``, ``inner_steps`` and ``test_steps`` are accepted for a uniform interface
        and ignored: adaptation embeds and generates, it takes no gradient step.
    """

    name: ClassVar[str] = "hallucination"
    embedding_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, task_type: TaskType = "classification",
                 inner_lr: float = 0.4, inner_steps: int = 0, test_steps: int | None = None,
                 generated: int = 2, noise_seed: int = 0) -> None:
        super().__init__(model, task_type, inner_lr, inner_steps, test_steps)
        if task_type != "classification":
            raise ValueError("support hallucination is a classifier; task_type must be "
                             "'classification'")
        if generated < 0:
            raise ValueError(f"generated must be >= 0, got {generated}")
        noise_dim = getattr(model, "noise_dim", None)
        if not isinstance(getattr(model, "generator", None), nn.Module) \
                or not isinstance(noise_dim, int):
            raise ValueError("support hallucination needs a model with a 'generator' submodule "
                             "and an int 'noise_dim', e.g. model 'hallucinator_net'")
        self.generated, self.noise_seed, self.noise_dim = int(generated), int(noise_seed), noise_dim
        self._own = [k for k, _ in model.named_parameters()]
        self._gen = [k for k in self._own if k.startswith("generator.")]

    def _embed(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, {k: params[k] for k in self._own}, (x,))

    def _hallucinate(self, params: Params, emb: Tensor, noise: Tensor) -> Tensor:
        """``e + G([e, z])`` for every support embedding repeated ``generated`` times."""
        seeds = emb.repeat_interleave(self.generated, dim=0)
        gen = {k.removeprefix("generator."): params[k] for k in self._gen}
        return seeds + functional_call(self.model.generator, gen,
                                       (torch.cat([seeds, noise], dim=-1),))

    def _augmented_prototypes(self, params: Params, sx: Tensor, sy: Tensor, noise: Tensor,
                              ways: int) -> tuple[Tensor, Tensor]:
        """Prototypes over real and generated embeddings, and the generated embeddings."""
        emb = self._embed(params, sx)
        fake = self._hallucinate(params, emb, noise)
        labels = torch.cat([sy, sy.repeat_interleave(self.generated)])
        return prototypes(torch.cat([emb, fake]), labels, ways), fake

    def _noise(self, support_x: Tensor) -> Tensor:
        return hallucination_noise(support_x, self.generated, self.noise_dim, self.noise_seed)

    def _batch_noise(self, tasks: TaskBatch) -> Tensor:
        return torch.stack([self._noise(sx) for sx in tasks.support_x])

    def _task(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
              noise: Tensor, ways: int) -> tuple[Tensor, Tensor]:
        protos, _ = self._augmented_prototypes(params, sx, sy, noise, ways)
        logits = neg_sq_distance(self._embed(params, qx), protos)
        return F.cross_entropy(logits, qy), (logits.detach().argmax(-1) == qy).float().mean()

    def meta_gradient(self, params: Params, tasks: TaskBatch) -> tuple[Params, dict[str, float]]:
        leaves = {k: params[k].detach().requires_grad_(True) for k in self._own}
        ways = int(tasks.support_y.max()) + 1
        losses, accs = torch.func.vmap(self._task, in_dims=(None, 0, 0, 0, 0, 0, None))(
            leaves, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y,
            self._batch_noise(tasks), ways)
        losses.mean().backward()
        return leaf_grads(leaves), {"loss_after": float(losses.detach().mean()),
                                    "acc_after": float(accs.mean())}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        ways = int(support_y.max()) + 1
        with torch.no_grad():
            protos, fake = self._augmented_prototypes(params, support_x, support_y,
                                                      self._noise(support_x), ways)
        fake_y = F.one_hot(support_y.repeat_interleave(self.generated), ways).to(fake.dtype)
        return {**{k: params[k].detach() for k in self._own}, PROTOTYPES: protos,
                GENERATED_EMBEDDINGS: fake, GENERATED_LABELS: fake_y}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        return neg_sq_distance(self._embed(adapted, x), adapted[PROTOTYPES])

    def adapt_predict_batch(self, params: Params, tasks: TaskBatch,
                            steps: int | None = None) -> Tensor:
        """Query logits [B, Q, ways] of a whole batch of tasks in one vmapped call."""
        ways = int(tasks.support_y.max()) + 1

        def one(sx: Tensor, sy: Tensor, qx: Tensor, noise: Tensor) -> Tensor:
            protos, _ = self._augmented_prototypes(params, sx, sy, noise, ways)
            return neg_sq_distance(self._embed(params, qx), protos)

        with torch.no_grad():
            return torch.func.vmap(one)(tasks.support_x, tasks.support_y, tasks.query_x,
                                        self._batch_noise(tasks))
