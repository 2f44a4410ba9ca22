"""Matching Networks, Siamese networks and CAVIA against cases solved by hand.

Each case is small enough that the expected numbers (attention weights, pair losses, an inner
step of the context and the second-order meta-gradient through it) are written out here from
the papers' formulas, independently of the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.matching import SUPPORT_EMBEDDINGS, SUPPORT_LABELS
from metalearn.algorithms.siamese import SUPPORT_FEATURES
from metalearn.models import CaviaConvNet, CaviaMLP, MatchingNet
from metalearn.params import max_abs_diff
from metalearn.tasks import TaskBatch

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def identity(d: int = 2) -> nn.Module:
    model = nn.Sequential(nn.Linear(d, d, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(d, dtype=D))
    return model


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ------------------------------------------------------------------- Matching Networks

def cosine_grads(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """∂cos(u, v)/∂u and ∂cos(u, v)/∂v."""
    nu, nv = u.norm(), v.norm()
    c = u @ v / (nu * nv)
    return v / (nu * nv) - c * u / nu**2, u / (nu * nv) - c * v / nv**2


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_matching_attention_logits_and_gradient(scale: float) -> None:
    model = identity()
    params = params_of(model)
    sx = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=D)
    sy = torch.tensor([0, 1, 1])
    q = torch.tensor([2.0, 1.0], dtype=D)
    alg = build_algorithm("matching", model, "classification", scale=scale)

    adapted = alg.adapt(params, sx, sy)
    assert torch.equal(adapted[SUPPORT_EMBEDDINGS], sx)
    assert torch.equal(adapted[SUPPORT_LABELS], F.one_hot(sy, 2).to(D))
    # cosines of q = (2, 1) with (1, 0), (0, 2), (1, 1): 2/√5, 1/√5, 3/√10
    cos = torch.tensor([2 / math.sqrt(5), 1 / math.sqrt(5), 3 / math.sqrt(10)], dtype=D)
    a = torch.exp(scale * cos) / torch.exp(scale * cos).sum()
    p = torch.stack([a[0], a[1] + a[2]])  # label-weighted sum of the attention
    logits = alg.predict(adapted, q[None])
    assert torch.allclose(logits[0], p.log(), atol=1e-12)
    assert torch.allclose(torch.softmax(logits[0], 0), p, atol=1e-12)  # what serving reports

    # Loss −log P(y=1) = −log(a₁ + a₂); ∂/∂c_i = scale (a_i − [i ∈ y] a_i / P(y)).
    # At W = I: ∂c_i/∂W = ∂c/∂u qᵀ + ∂c/∂v s_iᵀ.
    in_y = torch.tensor([0.0, 1.0, 1.0], dtype=D)
    dc = scale * (a - in_y * a / p[1])
    expected = torch.zeros(2, 2, dtype=D)
    for i in range(3):
        du, dv = cosine_grads(q, sx[i])
        expected += dc[i] * (torch.outer(du, q) + torch.outer(dv, sx[i]))
    tasks = TaskBatch(sx[None], sy[None], q[None, None], torch.tensor([[1]]))
    grads, metrics = alg.meta_gradient(params, tasks)
    assert torch.allclose(grads["0.weight"], expected, atol=1e-12)
    assert metrics["loss_after"] == pytest.approx(float(-p[1].log()))
    assert metrics["acc_after"] == float(p[1] > p[0])


def test_matching_fce_with_zero_lstms_is_the_plain_embedding() -> None:
    """With every LSTM weight zero, h = c = 0 in both LSTMs, so g(x, S) = g'(x) and
    f(x, S) = f'(x): the full context embeddings reduce to the encoder (a case by hand)."""
    torch.manual_seed(0)
    model = MatchingNet(channels=4, fce=True, fce_steps=3).double()
    params = params_of(model)
    for k in params:
        if "lstm" in k:
            params[k] = torch.zeros_like(params[k])
    enc = {k.removeprefix("encoder."): v for k, v in params.items() if k.startswith("encoder.")}
    sx, qx = torch.rand(4, 1, 28, 28, dtype=D), torch.rand(3, 1, 28, 28, dtype=D)
    sy = torch.tensor([0, 1, 2, 0])
    alg = build_algorithm("matching", model, "classification")
    adapted = alg.adapt(params, sx, sy)
    plain = torch.func.functional_call(model.encoder, enc, (sx,))
    assert torch.allclose(adapted[SUPPORT_EMBEDDINGS], plain, atol=1e-12)
    cos = F.normalize(torch.func.functional_call(model.encoder, enc, (qx,)), dim=-1) @ \
        F.normalize(plain, dim=-1).T
    p = torch.softmax(cos, -1) @ F.one_hot(sy, 3).to(D)
    assert torch.allclose(alg.predict(adapted, qx), p.log(), atol=1e-12)


def test_matching_fce_reads_the_whole_support_set_and_learns_its_lstms() -> None:
    torch.manual_seed(1)
    model = MatchingNet(channels=4, fce=True, fce_steps=2).double()
    params = params_of(model)
    alg = build_algorithm("matching", model, "classification")
    sx, sy = torch.rand(4, 1, 28, 28, dtype=D), torch.tensor([0, 1, 2, 0])
    qx = torch.rand(3, 1, 28, 28, dtype=D)
    a = alg.adapt(params, sx, sy)
    b = alg.adapt(params, sx.flip(0), sy.flip(0))  # the bidirectional LSTM reads in order
    assert not torch.allclose(a[SUPPORT_EMBEDDINGS].flip(0), b[SUPPORT_EMBEDDINGS])
    # a query's embedding depends on the support set it attends over
    other = alg.adapt(params, torch.rand(4, 1, 28, 28, dtype=D), sy)
    assert not torch.allclose(alg.predict(a, qx), alg.predict(other, qx))
    tasks = TaskBatch(sx[None], sy[None], qx[None], torch.tensor([[0, 1, 2]]))
    grads, _ = alg.meta_gradient(params, tasks)
    assert set(grads) == set(params)
    for k in ("support_lstm.weight_hh_l0", "support_lstm.weight_hh_l0_reverse",
              "query_lstm.weight_ih", "encoder.features.0.0.weight"):
        assert float(grads[k].abs().max()) > 0, k


# ------------------------------------------------------------------- Siamese networks

class Twin(nn.Module):
    """An identity twin with the weighted L1 distance layer Siamese networks expect."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 2, bias=False)
        self.distance_head = nn.Linear(2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)


def twin_params() -> dict[str, Tensor]:
    # α = (−1, −0.5), b = 2: logit(same) = 2 − |Δ₁| − 0.5 |Δ₂|
    return {"embed.weight": torch.eye(2, dtype=D),
            "distance_head.weight": torch.tensor([[-1.0, -0.5]], dtype=D),
            "distance_head.bias": torch.tensor([2.0], dtype=D)}


def test_siamese_one_shot_by_the_most_similar_support_example() -> None:
    alg = build_algorithm("siamese", Twin().double(), "classification")
    sx = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=D)
    sy = torch.tensor([0, 1, 1])
    adapted = alg.adapt(twin_params(), sx, sy)
    assert torch.equal(adapted[SUPPORT_FEATURES], sx)
    # q = (1, 2): |Δ| to the three supports (1, 2), (2, 2), (1, 2) → logits 0, −1, 0;
    # class 1 takes the best of its two examples (0); q = (2.5, 0): 2 − 2.5 = −0.5, 2 − 0.5 =
    # 1.5, 2 − 2.5 − 2 = −2.5 → class 1 (1.5).
    q = torch.tensor([[1.0, 2.0], [2.5, 0.0]], dtype=D)
    expected = torch.tensor([[0.0, 0.0], [-0.5, 1.5]], dtype=D)
    assert torch.allclose(alg.predict(adapted, q), expected, atol=1e-12)


@pytest.mark.parametrize("balanced", [True, False])
def test_siamese_pair_loss_and_gradient(balanced: bool) -> None:
    alg = build_algorithm("siamese", Twin().double(), "classification", balanced=balanced)
    sx = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=D)
    sy = torch.tensor([0, 1])
    qx = torch.tensor([[1.0, 0.0]], dtype=D)
    qy = torch.tensor([0])
    # pairs of (s0, s1, q): (s0, s1) different, |Δ| = (3, 0), logit −1; (s0, q) same, |Δ| =
    # (1, 0), logit 1; (s1, q) different, |Δ| = (2, 0), logit 0.
    logit = torch.tensor([-1.0, 1.0, 0.0], dtype=D)
    target = torch.tensor([0.0, 1.0, 0.0], dtype=D)
    diff = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=D)
    weight = (torch.tensor([0.25, 0.5, 0.25], dtype=D) if balanced
              else torch.full((3,), 1 / 3, dtype=D))
    bce = torch.log1p(torch.exp(-logit)) * target + torch.log1p(torch.exp(logit)) * (1 - target)
    grads, metrics = alg.meta_gradient(twin_params(), TaskBatch(sx[None], sy[None], qx[None],
                                                                qy[None]))
    assert metrics["loss_after"] == pytest.approx(float(weight @ bce), abs=1e-12)
    assert metrics["acc_after"] == 1.0  # q is closest to s0, of its own class
    dl = weight * (torch.sigmoid(logit) - target)  # ∂BCE/∂logit = σ(l) − t
    assert torch.allclose(grads["distance_head.bias"], dl.sum()[None], atol=1e-12)
    assert torch.allclose(grads["distance_head.weight"], (dl @ diff)[None], atol=1e-12)
    # through the twin: ∂|Δ|/∂h = sign(Δ); only the first coordinate moves, α₁ = −1
    # d logit/d W = α ⊙ sign(h_a − h_b) (x_a − x_b)ᵀ for each pair (a, b)
    pairs = [(sx[0], sx[1]), (sx[0], qx[0]), (sx[1], qx[0])]
    alpha = twin_params()["distance_head.weight"][0]
    expected = sum(dl[i] * torch.outer(alpha * torch.sign(a - b), a - b)
                   for i, (a, b) in enumerate(pairs))
    assert torch.allclose(grads["embed.weight"], expected, atol=1e-12)


# ------------------------------------------------------------------- CAVIA

class ContextLinear(nn.Module):
    """f(x) = [x, φ] · [w, v]: a linear model whose input is concatenated with a context φ."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(d + 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([x, self.context.expand(x.shape[0], 1)], dim=1))


def regression_tasks(tasks: int = 3, d: int = 3, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(*(torch.randn(tasks, n, k, generator=g, dtype=D)
                       for n, k in ((4, d), (4, 1), (5, d), (5, 1))))


@pytest.mark.parametrize("impl", ["higher", "func"])
@pytest.mark.parametrize("first_order", [False, True])
def test_cavia_context_step_and_meta_gradient_closed_form(impl: str, first_order: bool) -> None:
    w, v, lr = torch.tensor([0.3, -0.2, 0.5], dtype=D), 0.7, 0.1
    params = {"context": torch.full((1,), 5.0, dtype=D),  # ignored: every task starts at 0
              "head.weight": torch.cat([w, torch.tensor([v], dtype=D)])[None]}
    tasks = regression_tasks()
    gw, gv = torch.zeros(3, dtype=D), torch.zeros((), dtype=D)
    for t in tasks:
        # L_s(φ) = mean((X_s w + v φ − y)²); at φ = 0: ∂L_s/∂φ = 2 v mean(r_s)
        r_s = t.support_x @ w - t.support_y[:, 0]
        phi = -lr * 2 * v * r_s.mean()
        e = t.query_x @ w + v * phi - t.query_y[:, 0]  # query residuals after the step
        dphi_dw = -lr * 2 * v * t.support_x.mean(0)
        dphi_dv = -lr * 2 * r_s.mean()
        if first_order:
            dphi_dw, dphi_dv = torch.zeros_like(dphi_dw), torch.zeros_like(dphi_dv)
        gw += (2 * e[:, None] * (t.query_x + v * dphi_dw)).mean(0) / len(tasks)
        gv += (2 * e * (phi + v * dphi_dv)).mean() / len(tasks)
    alg = build_algorithm("cavia", ContextLinear(3).double(), "regression", inner_lr=lr,
                          inner_steps=1, first_order=first_order, impl=impl)
    grads, _ = alg.meta_gradient(params, tasks)
    assert torch.allclose(grads["head.weight"][0], torch.cat([gw, gv[None]]), atol=1e-12)
    assert torch.equal(grads["context"], torch.zeros(1, dtype=D))  # the start is not learnt

    t = tasks[0]
    adapted = alg.adapt(params, t.support_x, t.support_y, steps=1)
    phi0 = -lr * 2 * v * (t.support_x @ w - t.support_y[:, 0]).mean()
    assert torch.allclose(adapted["context"], phi0[None], atol=1e-12)
    assert torch.equal(adapted["head.weight"], params["head.weight"])  # only φ adapts


def cavia_tasks(image: bool, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    if image:
        x = torch.rand(2, 6, 1, 28, 28, generator=g, dtype=D)
        y = torch.tensor([0, 1, 2] * 2).expand(2, 6)
        return TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    x = torch.rand(3, 8, 1, generator=g, dtype=D) * 10 - 5
    y = torch.sin(x) * 2
    return TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


@pytest.mark.parametrize("image", [False, True])
def test_cavia_func_strategies_equal_the_higher_reference(image: bool) -> None:
    torch.manual_seed(0)
    model = (CaviaConvNet(ways=3, channels=4, context=3) if image
             else CaviaMLP(hidden=8, context=2)).double()
    task_type = "classification" if image else "regression"
    params = params_of(model)
    tasks = cavia_tasks(image)
    ref = build_algorithm("cavia", model, task_type, inner_lr=0.5, inner_steps=2,
                          impl="higher")
    expected, m_ref = ref.meta_gradient(params, tasks)
    assert float(expected["context"].abs().max()) == 0.0
    assert min(float(v.abs().max()) for k, v in expected.items() if k != "context") > 0
    for strategy in ("loop", "vmap"):
        alg = build_algorithm("cavia", model, task_type, inner_lr=0.5, inner_steps=2,
                              strategy=strategy)
        grads, metrics = alg.meta_gradient(params, tasks)
        assert max_abs_diff(grads, expected) < 1e-10, strategy
        for k in ("loss_before", "loss_after"):
            assert metrics[k] == pytest.approx(m_ref[k], rel=1e-9), (strategy, k)


@pytest.mark.parametrize(("name", "model", "task_type", "match"), [
    ("matching", nn.Linear(2, 2), "regression", "classifier"),
    ("siamese", Twin(), "regression", "classifier"),
    ("siamese", nn.Linear(2, 2), "classification", "weighted L1 distance"),
    ("cavia", nn.Linear(2, 1), "regression", "context parameter named 'context'"),
    ("matching", nn.Linear(2, 2), "classification", "scale must be > 0"),
])
def test_new_algorithms_refuse_what_they_cannot_do(name: str, model: nn.Module, task_type: str,
                                                   match: str) -> None:
    hyper = {"scale": 0.0} if "scale" in match else {}
    with pytest.raises(ValueError, match=match):
        build_algorithm(name, model, task_type, **hyper)  # type: ignore[arg-type]
