"""Support-set hallucination and MANN against cases solved by hand.

The expected numbers (prototypes over real and generated embeddings, the meta-gradient into the
generator, the least-recently-used memory's reads and writes) are written out here from the
papers' formulas, independently of the code under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.hallucination import (
    GENERATED_EMBEDDINGS,
    GENERATED_LABELS,
    hallucination_noise,
)
from metalearn.algorithms.protonet import PROTOTYPES
from metalearn.models import HallucinatorNet
from metalearn.tasks import TaskBatch

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ------------------------------------------------------------------- support hallucination

class LinearHallucinator(nn.Module):
    """Identity embedding of 2-D inputs and a linear generator over [e, z] (z of width 1)."""

    noise_dim = 1

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2, bias=False)
        self.generator = nn.Linear(3, 2)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.eye(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


def test_hallucinated_prototypes_and_generator_gradient() -> None:
    """G([e, z]) = A e + B z + b with B = 0: each class (one shot, one hallucination) has
    h_c = s_c + A s_c + b and prototype p_c = (s_c + h_c) / 2. With logits −‖q − p_c‖² and
    ∂L/∂logit_c = σ_c − y_c: ∂L/∂p_c = 2(σ_c − y_c)(q − p_c), so ∂L/∂b = Σ_c (σ_c − y_c)(q − p_c)
    and ∂L/∂A = Σ_c (σ_c − y_c)(q − p_c) s_cᵀ."""
    model = LinearHallucinator().double()
    A = torch.tensor([[0.5, 0.0], [0.0, -0.5]], dtype=D)
    b = torch.tensor([0.2, -0.4], dtype=D)
    with torch.no_grad():
        model.generator.weight.copy_(torch.cat([A, torch.zeros(2, 1, dtype=D)], dim=1))
        model.generator.bias.copy_(b)
    params = params_of(model)
    sx = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D)
    sy = torch.tensor([0, 1])
    q = torch.tensor([0.5, 1.0], dtype=D)
    alg = build_algorithm("hallucination", model, "classification", generated=1)

    h = sx + sx @ A.T + b  # (1.7, -0.4) and (0.2, 0.6)
    p = (sx + h) / 2
    adapted = alg.adapt(params, sx, sy)
    assert torch.allclose(adapted[GENERATED_EMBEDDINGS], h, atol=1e-12)
    assert torch.equal(adapted[GENERATED_LABELS], torch.eye(2, dtype=D))
    assert torch.allclose(adapted[PROTOTYPES], p, atol=1e-12)
    logits = -((q - p) ** 2).sum(dim=1)
    assert torch.allclose(alg.predict(adapted, q[None])[0], logits, atol=1e-12)

    sigma, y = torch.softmax(logits, 0), torch.tensor([0.0, 1.0], dtype=D)
    coef = (sigma - y)[:, None] * (q - p)  # [c, 2]
    tasks = TaskBatch(sx[None], sy[None], q[None, None], torch.tensor([[1]]))
    grads, metrics = alg.meta_gradient(params, tasks)
    assert torch.allclose(grads["generator.bias"], coef.sum(0), atol=1e-12)
    assert torch.allclose(grads["generator.weight"][:, :2], coef.T @ sx, atol=1e-12)
    assert metrics["loss_after"] == pytest.approx(float(-torch.log_softmax(logits, 0)[1]))


def test_hallucination_noise_is_the_support_sets_own() -> None:
    """The same support set gets the same hallucinations (a replica's adapt equals an offline
    one, a site's step equals the centralized one); another support set gets other noise, and
    the noise does move the generated examples."""
    torch.manual_seed(0)
    model = HallucinatorNet(channels=4, noise_dim=3, hidden=8).double()
    params = params_of(model)
    params["generator.4.weight"] = torch.randn_like(params["generator.4.weight"])
    sx, sy = torch.rand(6, 1, 28, 28, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    alg = build_algorithm("hallucination", model, "classification", generated=2)
    a, b = alg.adapt(params, sx, sy), alg.adapt(params, sx.clone(), sy)
    assert torch.equal(a[GENERATED_EMBEDDINGS], b[GENERATED_EMBEDDINGS])
    z = hallucination_noise(sx, 2, 3)
    assert z.shape == (12, 3) and not torch.equal(z, hallucination_noise(sx + 1e-3, 2, 3))
    assert not torch.equal(z, hallucination_noise(sx, 2, 3, seed=1))
    fake = a[GENERATED_EMBEDDINGS]
    assert fake.shape == (12, model.embedding_dim)
    assert not torch.allclose(fake[0], fake[1])  # two draws from one seed example differ
    # An untrained generator (last layer zero) copies its seeds: prototypes are ProtoNet's.
    fresh = params_of(model)
    protonet = build_algorithm("protonet", model.encoder, "classification")
    enc = {k.removeprefix("encoder."): v for k, v in fresh.items() if k.startswith("encoder.")}
    assert torch.allclose(alg.adapt(fresh, sx, sy)[PROTOTYPES],
                          protonet.adapt(enc, sx, sy)[PROTOTYPES], atol=1e-12)


def test_hallucination_batch_equals_per_task_and_refuses_a_plain_net() -> None:
    torch.manual_seed(1)
    model = HallucinatorNet(channels=4, noise_dim=2, hidden=8).double()
    params = params_of(model)
    params["generator.4.bias"] = torch.randn_like(params["generator.4.bias"])
    tasks = TaskBatch(torch.rand(2, 3, 1, 28, 28, dtype=D), torch.tensor([[0, 1, 2]] * 2),
                      torch.rand(2, 4, 1, 28, 28, dtype=D), torch.tensor([[0, 1, 2, 0]] * 2))
    alg = build_algorithm("hallucination", model, "classification")
    batch = alg.adapt_predict_batch(params, tasks)
    for i, t in enumerate(tasks):
        one = alg.predict(alg.adapt(params, t.support_x, t.support_y), t.query_x)
        assert torch.allclose(batch[i], one, atol=1e-10)
    grads, _ = alg.meta_gradient(params, tasks)
    assert set(grads) == set(params) and float(grads["generator.4.weight"].abs().sum()) > 0
    with pytest.raises(ValueError, match="'generator' submodule"):
        build_algorithm("hallucination", nn.Sequential(nn.Linear(2, 2)), "classification")
    with pytest.raises(ValueError, match="classifier"):
        build_algorithm("hallucination", model, "regression")
