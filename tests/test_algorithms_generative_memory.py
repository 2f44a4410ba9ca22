"""Support-set hallucination, MANN and VERSA against cases solved by hand.

The expected numbers (prototypes over real and generated embeddings, the meta-gradient into the
generator, the least-recently-used memory's reads and writes, VERSA's posterior and Monte Carlo
predictive) are written out here from the papers' formulas, independently of the code under
test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.hallucination import (
    GENERATED_EMBEDDINGS,
    GENERATED_LABELS,
    hallucination_noise,
)
from metalearn.algorithms.mann import STATE, content_read, delayed_labels, lru_write
from metalearn.algorithms.protonet import PROTOTYPES
from metalearn.algorithms.versa import versa_noise
from metalearn.models import HallucinatorNet, MANNNet, VersaNet
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


# ------------------------------------------------------------------- MANN

def test_lru_write_and_content_read_by_hand() -> None:
    """Three slots of width 2. Usage (0.5, 0.2, 0.9): slot 1 is least used, so it is erased and
    w_lu = (0, 1, 0). Gate α = 0: σ = ½, w_w = ½ (0.7, 0.2, 0.1) + ½ (0, 1, 0) = (0.35, 0.6, 0.05).
    Adding a = (2, −1): M = ((1.7, −0.35), (1.2, −0.6), (1.1, 0.95))."""
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=D)
    usage = torch.tensor([[0.5, 0.2, 0.9]], dtype=D)
    read_prev = torch.tensor([[0.7, 0.2, 0.1]], dtype=D)
    new, write = lru_write(memory, usage, read_prev, torch.tensor([[2.0, -1.0]], dtype=D),
                           torch.zeros(1, dtype=D))
    assert torch.allclose(write, torch.tensor([[0.35, 0.6, 0.05]], dtype=D), atol=1e-12)
    expected = torch.tensor([[[1.7, -0.35], [1.2, -0.6], [1.1, 0.95]]], dtype=D)
    assert torch.allclose(new, expected, atol=1e-12)
    # Read with key (1, 0): cos with each row is its first entry over its norm.
    cos = torch.tensor([1.7 / math.hypot(1.7, 0.35), 1.2 / math.hypot(1.2, 0.6),
                        1.1 / math.hypot(1.1, 0.95)], dtype=D)
    weights, read = content_read(new, torch.tensor([[1.0, 0.0]], dtype=D))
    w = cos.exp() / cos.exp().sum()
    assert torch.allclose(weights[0], w, atol=1e-12)
    assert torch.allclose(read[0], w @ expected[0], atol=1e-12)
    # On a tie of usage the first slot is the least used (a fresh memory fills slot 0 first).
    _, write0 = lru_write(memory, torch.zeros(1, 3, dtype=D), torch.zeros(1, 3, dtype=D),
                          torch.ones(1, 2, dtype=D), torch.full((1,), -1e9, dtype=D))
    assert torch.equal(write0, torch.tensor([[1.0, 0.0, 0.0]], dtype=D))


def test_labels_are_shown_one_step_late() -> None:
    shown, pending = delayed_labels(torch.tensor([[2, 0, 1]]), 3, D)
    assert torch.equal(shown[0], torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=D))
    assert torch.equal(pending[0], torch.tensor([0, 1, 0], dtype=D))


def mann(seed: int = 0, ways: int = 3) -> tuple[object, dict[str, Tensor]]:
    torch.manual_seed(seed)
    model = MANNNet(ways=ways, channels=4, controller=6, slots=5, width=3).double()
    return build_algorithm("mann", model, "classification"), params_of(model)


def test_mann_step_equals_the_formulas_by_hand() -> None:
    """One step from an empty memory, written out with torch's own LSTMCell and the paper's
    formulas: the first write goes wholly to slot 0 blended with the (zero) last read."""
    alg, p = mann()
    emb, label = torch.rand(1, alg.model.encoder.embedding_dim, dtype=D), torch.zeros(1, 3, dtype=D)
    state = alg.initial_state(1, emb)
    new, logits = alg.step(p, state, emb, label)
    cell = nn.LSTMCell(emb.shape[1] + 3 + 3, 6).double()
    cell.load_state_dict({k.removeprefix("controller."): v for k, v in p.items()
                          if k.startswith("controller.")})
    with torch.no_grad():
        h, c = cell(torch.cat([emb, label, torch.zeros(1, 3, dtype=D)], 1))
    assert torch.allclose(new.hidden, h, atol=1e-12) and torch.allclose(new.cell, c, atol=1e-12)
    add = torch.tanh(h @ p["add.weight"].T + p["add.bias"])
    s = torch.sigmoid(h @ p["gate.weight"].T + p["gate.bias"])  # w_w = (1 − s) at slot 0
    memory = torch.full((5, 3), 1e-6, dtype=D)
    memory[0] = (1 - s[0]) * add[0]
    assert torch.allclose(new.memory[0], memory, atol=1e-12)
    key = torch.tanh(h @ p["key.weight"].T + p["key.bias"])
    w = torch.softmax(F.cosine_similarity(memory, key, dim=-1), 0)
    assert torch.allclose(new.usage[0], w + torch.tensor([1 - s[0, 0], 0, 0, 0, 0], dtype=D),
                          atol=1e-12)
    out = torch.cat([h[0], w @ memory]) @ p["head.weight"].T + p["head.bias"]
    assert torch.allclose(logits[0], out, atol=1e-12)


def test_mann_adapts_by_reading_the_support_sequence() -> None:
    alg, p = mann(1)
    sx, sy = torch.rand(6, 1, 28, 28, dtype=D), torch.tensor([0, 0, 1, 1, 2, 2])
    qx = torch.rand(4, 1, 28, 28, dtype=D)
    adapted = alg.adapt(p, sx, sy)
    assert set(adapted) - set(p) == set(STATE)
    assert float((adapted["memory"] - 1e-6).abs().max()) > 1e-3  # it wrote
    order = alg.order(sx)
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert torch.equal(adapted["pending_label"], F.one_hot(sy[order[-1]], 3).to(D))
    both = alg.predict(adapted, qx)
    # the labels matter: relabelled support, other predictions
    assert not torch.allclose(alg.predict(alg.adapt(p, sx, sy.flip(0)), qx), both)
    tasks = TaskBatch(torch.stack([sx, sx.flip(0)]), torch.stack([sy, sy.flip(0)]),
                      torch.stack([qx, qx]), torch.tensor([[0, 1, 2, 0]] * 2))
    batch = alg.adapt_predict_batch(p, tasks)
    for i, t in enumerate(tasks):
        assert torch.allclose(batch[i], alg.predict(alg.adapt(p, t.support_x, t.support_y),
                                                    t.query_x), atol=1e-10)
    # A meta-model predicts from an empty memory.
    assert alg.predict(p, qx).shape == (4, 3)
    with pytest.raises(ValueError, match="3 ways"):
        alg.adapt(p, sx, torch.tensor([0, 1, 2, 3, 0, 1]))


def test_mann_meta_gradient_matches_finite_differences() -> None:
    """The backward pass through the recurrence (the argmin of the usage is piecewise constant)
    against central differences on a few coordinates of every parameter group."""
    alg, p = mann(2, ways=2)
    tasks = TaskBatch(torch.rand(1, 4, 1, 28, 28, dtype=D), torch.tensor([[0, 1, 0, 1]]),
                      torch.rand(1, 3, 1, 28, 28, dtype=D), torch.tensor([[1, 0, 1]]))
    grads, metrics = alg.meta_gradient(p, tasks)
    assert set(grads) == set(p)

    def loss(q: dict[str, Tensor]) -> float:
        logits = alg.adapt_predict_batch(q, tasks)
        return float(F.cross_entropy(logits[0], tasks.query_y[0]))

    assert metrics["loss_after"] == pytest.approx(loss(p), abs=1e-12)
    eps = 1e-6
    for name in ("controller.weight_ih", "key.weight", "add.bias", "gate.weight", "head.weight",
                 "encoder.features.0.0.weight"):
        for idx in [(0,) * p[name].dim(), tuple(s - 1 for s in p[name].shape)]:
            up, down = dict(p), dict(p)
            up[name], down[name] = p[name].clone(), p[name].clone()
            up[name][idx] += eps
            down[name][idx] -= eps
            numeric = (loss(up) - loss(down)) / (2 * eps)
            assert float(grads[name][idx]) == pytest.approx(numeric, abs=1e-6), (name, idx)


# ------------------------------------------------------------------- VERSA

class LinearVersa(nn.Module):
    """Identity embedding, no amortizer layers, heads set by hand."""

    def __init__(self, w_logvar: float, b_logvar: float) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2, bias=False, dtype=D)
        self.amortizer = nn.Identity()
        self.weight_mean, self.weight_logvar = nn.Linear(2, 2, dtype=D), nn.Linear(2, 2, dtype=D)
        self.bias_mean, self.bias_logvar = nn.Linear(2, 1, dtype=D), nn.Linear(2, 1, dtype=D)
        with torch.no_grad():
            for layer in (self.weight_mean, self.weight_logvar, self.bias_mean, self.bias_logvar):
                layer.weight.zero_()
                layer.bias.zero_()
            self.encoder.weight.copy_(torch.eye(2))
            self.weight_mean.weight.copy_(torch.eye(2))  # μ_c = the class's mean embedding
            self.weight_logvar.bias.fill_(w_logvar)
            self.bias_mean.bias.fill_(0.1)
            self.bias_logvar.bias.fill_(b_logvar)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


SX = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]], dtype=D)
SY = torch.tensor([0, 1, 0])


def test_versa_posterior_and_monte_carlo_predictive_by_hand() -> None:
    """μ_0 = mean((1, 0), (2, 0)) = (1.5, 0), μ_1 = (0, 2); σ_w = e^{log 0.25 / 2} = 0.5,
    σ_b = 0.2, bias mean 0.1. Draw l: w_lc = μ_c + 0.5 ε, b_lc = 0.1 + 0.2 ε'; the predictive is
    the mean over draws of softmax(q·w_l + b_l)."""
    model = LinearVersa(math.log(0.25), math.log(0.04))
    params = params_of(model)
    alg = build_algorithm("versa", model, "classification", samples=3)
    adapted = alg.adapt(params, SX, SY)
    mu = torch.tensor([[1.5, 0.0], [0.0, 2.0]], dtype=D)
    assert torch.allclose(adapted["weight_mean"], mu, atol=1e-12)
    assert torch.allclose(adapted["weight_logvar"], torch.full((2, 2), math.log(0.25), dtype=D))
    assert torch.allclose(adapted["bias_mean"], torch.full((2,), 0.1, dtype=D))
    eps_w, eps_b = versa_noise(SX, 3, 2, 2)
    w, b = mu + 0.5 * eps_w, 0.1 + 0.2 * eps_b
    assert torch.allclose(adapted["weight_samples"], w, atol=1e-12)
    q = torch.tensor([1.0, 1.0], dtype=D)
    p = torch.stack([torch.softmax(w[k] @ q + b[k], 0) for k in range(3)]).mean(0)
    out = alg.predict(adapted, q[None])[0]
    assert torch.allclose(torch.softmax(out, 0), p, atol=1e-12)
    assert torch.allclose(out, p.log(), atol=1e-12)
    tasks = TaskBatch(SX[None], SY[None], q[None, None], torch.tensor([[0]]))
    grads, metrics = alg.meta_gradient(params, tasks)
    assert metrics["loss_after"] == pytest.approx(float(-p[0].log()), abs=1e-12)
    # One bias mean shared by both classes shifts every logit alike: no gradient reaches it.
    assert abs(float(grads["bias_mean.bias"])) < 1e-12
    assert float(grads["weight_mean.weight"].abs().sum()) > 0


def test_versa_without_variance_is_the_mean_classifier() -> None:
    """σ → 0 (log-variance −60): every draw is the mean, so the predictive is
    softmax(q·μ_c + 0.1) = softmax(1.5 + 0.1, 2 + 0.1) for q = (1, 1)."""
    model = LinearVersa(-60.0, -60.0)
    alg = build_algorithm("versa", model, "classification", samples=5)
    adapted = alg.adapt(params_of(model), SX, SY)
    out = alg.predict(adapted, torch.tensor([[1.0, 1.0]], dtype=D))[0]
    assert torch.allclose(torch.softmax(out, 0),
                          torch.softmax(torch.tensor([1.6, 2.1], dtype=D), 0), atol=1e-12)


def test_versa_meta_gradient_matches_finite_differences() -> None:
    torch.manual_seed(3)
    model = VersaNet(channels=4, hidden=5).double()
    p = params_of(model)
    alg = build_algorithm("versa", model, "classification", samples=4)
    tasks = TaskBatch(torch.rand(2, 3, 1, 28, 28, dtype=D), torch.tensor([[0, 1, 2]] * 2),
                      torch.rand(2, 4, 1, 28, 28, dtype=D), torch.tensor([[2, 0, 1, 0]] * 2))
    grads, metrics = alg.meta_gradient(p, tasks)
    assert set(grads) == set(p)

    def loss(q: dict[str, Tensor]) -> float:
        logp = alg.adapt_predict_batch(q, tasks)
        return float(F.nll_loss(logp.flatten(0, 1), tasks.query_y.flatten()))

    assert metrics["loss_after"] == pytest.approx(loss(p), abs=1e-12)
    for i, t in enumerate(tasks):  # the batch path is adapt + predict, task by task
        one = alg.predict(alg.adapt(p, t.support_x, t.support_y), t.query_x)
        assert torch.allclose(alg.adapt_predict_batch(p, tasks)[i], one, atol=1e-12)
    eps = 1e-6
    for name in ("amortizer.0.weight", "weight_mean.bias", "weight_logvar.bias",
                 "bias_logvar.weight", "encoder.features.0.0.weight"):
        for idx in [(0,) * p[name].dim(), tuple(s - 1 for s in p[name].shape)]:
            up, down = dict(p), dict(p)
            up[name], down[name] = p[name].clone(), p[name].clone()
            up[name][idx] += eps
            down[name][idx] -= eps
            numeric = (loss(up) - loss(down)) / (2 * eps)
            assert float(grads[name][idx]) == pytest.approx(numeric, abs=1e-6), (name, idx)
    with pytest.raises(ValueError, match="'amortizer'"):
        build_algorithm("versa", nn.Sequential(nn.Linear(2, 2)), "classification")
