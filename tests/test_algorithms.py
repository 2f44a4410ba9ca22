"""FOMAML, Reptile, ANIL, Meta-SGD and ProtoNet against cases solved by hand, and the registry.

The gradient-based cases use a linear model with squared loss: L(w) = mean((Xw − y)²) has
gradient H w − b with H = 2XᵀX/n, b = 2Xᵀy/n, and Hessian H — so an inner step, its Jacobian
and the meta-gradients all have closed forms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.algorithms import ALGORITHMS, build_algorithm, embedding_only, hyperparameters
from metalearn.algorithms.protonet import PROTOTYPES
from metalearn.models import CaviaMLP, HallucinatorNet, MANNNet, SiameseNet, VersaNet
from metalearn.params import max_abs_diff
from metalearn.tasks import TaskBatch

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """f(x) = x · w, the weight living in a ``head`` as the algorithms expect."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class TwoLayer(nn.Module):
    """A linear body then a linear head (no activation: closed forms stay linear)."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.body = nn.Linear(d, h, bias=False)
        self.head = nn.Linear(h, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def regression_tasks(tasks: int = 3, d: int = 3, n_s: int = 4, n_q: int = 5,
                     seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=D)

    return TaskBatch(r(tasks, n_s, d), r(tasks, n_s, 1), r(tasks, n_q, d), r(tasks, n_q, 1))


def quad(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(H, b) of L(w) = mean((xw − y)²): ∇L = H w − b."""
    n = x.shape[0]
    return 2 * x.T @ x / n, (2 * x.T @ y / n).squeeze(1)


W0 = torch.tensor([0.3, -0.2, 0.5], dtype=D)


def w_params(w: Tensor = W0, key: str = "head.weight") -> dict[str, Tensor]:
    return {key: w.clone().unsqueeze(0)}


def seq_linear() -> nn.Module:
    """The same linear model as an ``nn.Sequential`` (which the grouped strategy runs)."""
    return nn.Sequential(nn.Linear(3, 1, bias=False)).double()


@pytest.mark.parametrize("impl", ["higher", "func"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_and_fomaml_closed_form(impl: str, steps: int) -> None:
    tasks, lr = regression_tasks(), 0.1
    second, first = torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    for t in tasks:
        hs, bs = quad(t.support_x, t.support_y)
        hq, bq = quad(t.query_x, t.query_y)
        w = W0.clone()
        for _ in range(steps):
            w = w - lr * (hs @ w - bs)
        gq = hq @ w - bq
        jac = torch.linalg.matrix_power(torch.eye(3, dtype=D) - lr * hs, steps)
        second += jac.T @ gq / len(tasks)
        first += gq / len(tasks)
    for name, expected in (("maml", second), ("fomaml", first)):
        alg = build_algorithm(name, Linear(3).double(), "regression", inner_lr=lr,
                              inner_steps=steps, impl=impl)
        grads, _ = alg.meta_gradient(w_params(), tasks)
        assert torch.allclose(grads["head.weight"].squeeze(0), expected, atol=1e-12), name


def test_reptile_closed_form_and_update() -> None:
    tasks, lr, steps = regression_tasks(seed=1), 0.05, 3
    adapted = []
    for t in tasks:
        h, b = quad(torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y]))
        w = W0.clone()
        for _ in range(steps):
            w = w - lr * (h @ w - b)
        adapted.append(w)
    expected = W0 - torch.stack(adapted).mean(0)
    for strategy in ("loop", "vmap", "grouped"):
        alg = build_algorithm("reptile", seq_linear(), "regression", inner_lr=lr,
                              inner_steps=steps, strategy=strategy)
        grads, metrics = alg.meta_gradient(w_params(key="0.weight"), tasks)
        assert torch.allclose(grads["0.weight"].squeeze(0), expected, atol=1e-12), strategy
        assert metrics["loss_after"] < metrics["loss_before"]
    # an outer SGD step with lr ε is the Reptile update θ + ε (mean θ' − θ)
    eps = 0.5
    stepped = W0 - eps * grads["0.weight"].squeeze(0)
    assert torch.allclose(stepped, W0 + eps * (torch.stack(adapted).mean(0) - W0))


@pytest.mark.parametrize("impl", ["higher", "func"])
def test_anil_adapts_the_head_only(impl: str) -> None:
    torch.manual_seed(0)
    model = TwoLayer(3, 2).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks, lr = regression_tasks(seed=2), 0.1
    alg = build_algorithm("anil", model, "regression", inner_lr=lr, inner_steps=1, impl=impl)
    B, h0 = params["body.weight"], params["head.weight"].squeeze(0)

    # adapt: the body is left as it is, the head takes one SGD step on features φ = xBᵀ
    t = tasks[0]
    adapted = alg.adapt(params, t.support_x, t.support_y, steps=1)
    hs, bs = quad(t.support_x @ B.T, t.support_y)
    assert torch.equal(adapted["body.weight"], B)
    assert torch.allclose(adapted["head.weight"].squeeze(0), h0 - lr * (hs @ h0 - bs))

    # meta-gradient w.r.t. the head: (I − αH_φ) ∇L_q(h'), as MAML on fixed features
    grads, _ = alg.meta_gradient(params, tasks)
    expected_head = torch.zeros(2, dtype=D)
    for t in tasks:
        hs, bs = quad(t.support_x @ B.T, t.support_y)
        hq, bq = quad(t.query_x @ B.T, t.query_y)
        h1 = h0 - lr * (hs @ h0 - bs)
        expected_head += (torch.eye(2, dtype=D) - lr * hs) @ (hq @ h1 - bq) / len(tasks)
    assert torch.allclose(grads["head.weight"].squeeze(0), expected_head, atol=1e-12)

    # and the body gets the full second-order gradient through the head's adaptation
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for t in tasks:
        loss = F.mse_loss(functional_call(model, leaves, (t.support_x,)), t.support_y)
        (g,) = torch.autograd.grad(loss, [leaves["head.weight"]], create_graph=True)
        fast = {**leaves, "head.weight": leaves["head.weight"] - lr * g}
        total = total + F.mse_loss(functional_call(model, fast, (t.query_x,)), t.query_y)
    (body_grad,) = torch.autograd.grad(total / len(tasks), [leaves["body.weight"]])
    assert torch.allclose(grads["body.weight"], body_grad, atol=1e-12)
    assert float(body_grad.abs().max()) > 1e-3


def test_grouped_strategy_names_what_it_cannot_batch() -> None:
    alg = build_algorithm("maml", Linear(3).double(), "regression", strategy="grouped")
    with pytest.raises(TypeError, match="no grouped forward for Linear"):
        alg.meta_gradient(w_params(), regression_tasks())


def test_anil_needs_a_head() -> None:
    with pytest.raises(ValueError, match="head"):
        build_algorithm("anil", nn.Sequential(nn.Linear(2, 1)), "regression")


def test_metasgd_closed_form() -> None:
    tasks = regression_tasks(seed=3)
    alg = build_algorithm("metasgd", seq_linear(), "regression", inner_lr=0.1)
    init = alg.init_params()
    assert set(init) == {"0.weight", "lr.0.weight"}
    assert torch.equal(init["lr.0.weight"], torch.full((1, 3), 0.1, dtype=D))
    alpha = torch.tensor([0.05, 0.2, 0.1], dtype=D)
    params = {**w_params(key="0.weight"), "lr.0.weight": alpha.unsqueeze(0)}
    grads, _ = alg.meta_gradient(params, tasks)
    g_w, g_a = torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    for t in tasks:
        hs, bs = quad(t.support_x, t.support_y)
        hq, bq = quad(t.query_x, t.query_y)
        gs = hs @ W0 - bs
        gq = hq @ (W0 - alpha * gs) - bq
        g_w += (gq - hs @ (alpha * gq)) / len(tasks)  # (I − H_s diag α) gq
        g_a += -gs * gq / len(tasks)                  # ∂L/∂α = −∇L_s(w) ⊙ ∇L_q(w')
    assert torch.allclose(grads["0.weight"].squeeze(0), g_w, atol=1e-12)
    assert torch.allclose(grads["lr.0.weight"].squeeze(0), g_a, atol=1e-12)
    for strategy in ("loop", "vmap", "grouped"):
        other = build_algorithm("metasgd", seq_linear(), "regression", inner_lr=0.1,
                                strategy=strategy)
        assert max_abs_diff(other.meta_gradient(params, tasks)[0], grads) < 1e-12
    adapted = alg.adapt(params, tasks[0].support_x, tasks[0].support_y, steps=1)
    hs, bs = quad(tasks[0].support_x, tasks[0].support_y)
    assert set(adapted) == {"0.weight"}
    assert torch.allclose(adapted["0.weight"].squeeze(0), W0 - alpha * (hs @ W0 - bs))


def test_protonet_prototypes_logits_and_gradient() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    params = {"0.weight": torch.eye(2, dtype=D)}
    sx = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]], dtype=D)
    sy = torch.tensor([0, 0, 1, 1])
    qx = torch.tensor([[1.0, 1.0]], dtype=D)
    qy = torch.tensor([0])
    alg = build_algorithm("protonet", model, "classification")
    adapted = alg.adapt(params, sx, sy)
    protos = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=D)
    assert torch.equal(adapted[PROTOTYPES], protos)
    logits = alg.predict(adapted, qx)
    assert torch.allclose(logits, torch.tensor([[-1.0, -5.0]], dtype=D))

    # CE = −log softmax(l)_y, ∂CE/∂l_c = p_c − [c = y]; l_c = −‖W(q − s̄_c)‖², at W = I
    # ∂l_c/∂W = −2 d_c d_cᵀ with d_c = q − s̄_c
    p = torch.softmax(logits[0], 0)
    d = qx[0] - protos
    expected = sum((p[c] - float(c == 0)) * -2 * torch.outer(d[c], d[c]) for c in range(2))
    tasks = TaskBatch(sx[None], sy[None], qx[None], qy[None])
    for strategy in ("vmap", "loop"):
        a = build_algorithm("protonet", model, "classification", strategy=strategy)
        grads, metrics = a.meta_gradient(params, tasks)
        assert torch.allclose(grads["0.weight"], expected, atol=1e-12), strategy
        assert metrics["acc_after"] == 1.0
        assert metrics["loss_after"] == pytest.approx(float(-torch.log(p[0])))


def test_protonet_batch_equals_per_task() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tasks = TaskBatch(torch.randn(2, 6, 4, dtype=D), torch.tensor([0, 1, 2] * 2).expand(2, 6),
                      torch.randn(2, 5, 4, dtype=D), torch.randint(0, 3, (2, 5)))
    alg = build_algorithm("protonet", model, "classification")
    per_task = torch.stack([alg.predict(alg.adapt(params, t.support_x, t.support_y), t.query_x)
                            for t in tasks])
    assert torch.allclose(alg.adapt_predict_batch(params, tasks), per_task, atol=1e-12)


def test_registry_names_and_hyperparameters() -> None:
    assert set(ALGORITHMS) == {"maml", "fomaml", "reptile", "anil", "metasgd", "protonet",
                               "matching", "siamese", "cavia", "hallucination", "mann", "versa"}
    assert "first_order" in hyperparameters("maml")
    assert "first_order" not in hyperparameters("fomaml")
    assert "impl" not in hyperparameters("metasgd")
    models = {"protonet": nn.Sequential(nn.Linear(3, 2)),
              "matching": nn.Sequential(nn.Linear(3, 2)),
              "siamese": SiameseNet(channels=2, hidden=3), "cavia": CaviaMLP(context=2),
              "hallucination": HallucinatorNet(channels=2, noise_dim=2, hidden=3),
              "mann": MANNNet(channels=2, controller=3, slots=2, width=2),
              "versa": VersaNet(channels=2, hidden=3)}
    for name in ALGORITHMS:
        model = models.get(name, Linear(3))
        task_type = "classification" if embedding_only(name) or name == "mann" else "regression"
        alg = build_algorithm(name, model, task_type, inner_lr=0.1, inner_steps=1,
                              test_steps=None)
        assert alg.name == name


@pytest.mark.parametrize(("name", "hyper", "match"), [
    ("mamml", {}, "unknown algorithm 'mamml'"),
    ("maml", {"inner_lr_typo": 0.1}, "unknown hyperparameter"),
    ("fomaml", {"first_order": False}, "unknown hyperparameter"),
    ("metasgd", {"impl": "higher"}, "unknown hyperparameter"),
    ("maml", {"impl": "jax"}, "impl must be"),
    ("maml", {"strategy": "fastest"}, "strategy must be"),
    ("maml", {"inner_lr": -1.0}, "inner_lr must be > 0"),
])
def test_registry_rejects_bad_input(name: str, hyper: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_algorithm(name, Linear(3), "regression", **hyper)


def test_protonet_rejects_regression() -> None:
    with pytest.raises(ValueError, match="classification"):
        build_algorithm("protonet", Linear(3), "regression")
