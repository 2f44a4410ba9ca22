"""MAML's meta-gradient: the `higher` reference, an independent torch.func computation written
here, and every fast-path strategy agree (float64, 1 and 5 inner steps, BatchNorm included)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms import build_algorithm
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.maml_func import STRATEGY_CHOICES
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.evaluation import evaluate_by_steps
from metalearn.models import OmniglotConvNet, SinusoidMLP
from metalearn.outer import OuterOptimizer
from metalearn.params import Params, max_abs_diff, module_params
from metalearn.tasks import TaskBatch

ATOL = 1e-8  # float64; the brief's bar is 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def omniglot_batch(tasks: int = 3, ways: int = 5, shots: int = 1, queries: int = 2,
                   seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return TaskBatch(
        torch.randn(tasks, ways * shots, 1, 28, 28, generator=g, dtype=torch.float64),
        labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.randn(tasks, ways * queries, 1, 28, 28, generator=g, dtype=torch.float64),
        labels.repeat_interleave(queries).expand(tasks, -1).contiguous())


def sinusoid_batch(tasks: int = 4, seed: int = 0) -> TaskBatch:
    b = SinusoidTasks(shots=5, queries=6).sample(tasks, seed=seed)
    return TaskBatch(*(t.double() for t in (b.support_x, b.support_y, b.query_x, b.query_y)))


def reference_meta_gradient(model: nn.Module, params: Params, tasks: TaskBatch, loss_fn,
                            lr: float, steps: int) -> Params:
    """Second-order MAML by hand: functional_call + autograd.grad(create_graph=True)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for t in tasks:
        fast = dict(leaves)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (t.support_x,)), t.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
        total = total + loss_fn(functional_call(model, fast, (t.query_x,)), t.query_y)
    grads = torch.autograd.grad(total / len(tasks), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


CASES = {
    "omniglot-bn": (lambda: OmniglotConvNet(ways=5, channels=8).double(), omniglot_batch,
                    "classification", F.cross_entropy, 0.4),
    "omniglot-maxpool": (lambda: OmniglotConvNet(ways=5, channels=8, pooling="max").double(),
                         omniglot_batch, "classification", F.cross_entropy, 0.4),
    "sinusoid": (lambda: SinusoidMLP().double(), sinusoid_batch, "regression", F.mse_loss, 0.01),
}


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_meta_gradient_agrees_everywhere(case: str, steps: int) -> None:
    make_model, make_batch, task_type, loss_fn, lr = CASES[case]
    torch.manual_seed(0)
    model, tasks = make_model(), make_batch()
    params = module_params(model)
    expected = reference_meta_gradient(model, params, tasks, loss_fn, lr, steps)
    got, metrics = MAML(model, task_type, lr, steps, impl="higher").meta_gradient(params, tasks)
    assert max_abs_diff(got, expected) < ATOL
    assert max(float(v.abs().max()) for v in expected.values()) > 1e-3  # not trivially zero
    for strategy in ("loop", "vmap", "grouped"):
        alg = MAML(model, task_type, lr, steps, strategy=strategy)
        fast, fast_metrics = alg.meta_gradient(params, tasks)
        assert max_abs_diff(fast, expected) < ATOL, strategy
        for k, v in metrics.items():
            assert fast_metrics[k] == pytest.approx(v, abs=1e-6), (strategy, k)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_vmap_second_order_through_affine_norms(norm: str) -> None:
    """vmap's fused-norm backward rule is wrong at second order (torch 2.13); the fast path
    must route around it."""
    torch.manual_seed(1)
    layer = (nn.BatchNorm1d(6, track_running_stats=False) if norm == "batchnorm"
             else nn.LayerNorm(6))
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.Tanh(), nn.Linear(6, 3)).double()
    tasks = TaskBatch(torch.randn(3, 6, 4, dtype=torch.float64), torch.randint(0, 3, (3, 6)),
                      torch.randn(3, 8, 4, dtype=torch.float64), torch.randint(0, 3, (3, 8)))
    params = module_params(model)
    expected = reference_meta_gradient(model, params, tasks, F.cross_entropy, 0.5, 2)
    got, _ = MAML(model, "classification", 0.5, 2, strategy="vmap").meta_gradient(params, tasks)
    assert max_abs_diff(got, expected) < ATOL


@pytest.mark.parametrize("strategy", ["vmap", "grouped"])
def test_batchnorm_statistics_are_per_task(strategy: str) -> None:
    """The batch's meta-gradient is the mean of the tasks' own: no statistic leaks across."""
    model = OmniglotConvNet(ways=5, channels=8).double()
    params, tasks = module_params(model), omniglot_batch(tasks=3, seed=2)
    alg = MAML(model, "classification", 0.4, 1, strategy=strategy)
    whole, _ = alg.meta_gradient(params, tasks)
    singles = [alg.meta_gradient(params, TaskBatch.stack([t]))[0] for t in tasks]
    mean = {k: sum(s[k] for s in singles) / len(singles) for k in whole}
    assert max_abs_diff(whole, mean) < ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_first_order_higher_matches_fast_path(case: str) -> None:
    make_model, make_batch, task_type, _, lr = CASES[case]
    model, tasks = make_model(), make_batch()
    params = module_params(model)
    ref, _ = build_algorithm("fomaml", model, task_type, inner_lr=lr, inner_steps=2,
                             impl="higher").meta_gradient(params, tasks)
    second, _ = MAML(model, task_type, lr, 2, impl="higher").meta_gradient(params, tasks)
    assert max_abs_diff(ref, second) > 1e-6  # first order really drops something
    for strategy in ("loop", "vmap", "grouped"):
        got, _ = build_algorithm("fomaml", model, task_type, inner_lr=lr, inner_steps=2,
                                 strategy=strategy).meta_gradient(params, tasks)
        assert max_abs_diff(got, ref) < ATOL, strategy


def test_metrics_match_adapt_and_predict() -> None:
    """loss_after is the query loss of adapt+predict; with metrics_before="query",
    loss_before is the query loss of the meta-parameters themselves."""
    model, tasks = SinusoidMLP().double(), sinusoid_batch(seed=3)
    params = module_params(model)
    alg = MAML(model, "regression", 0.05, 2, metrics_before="query", strategy="loop")
    _, m = alg.meta_gradient(params, tasks)
    after = [F.mse_loss(alg.predict(alg.adapt(params, t.support_x, t.support_y, 2), t.query_x),
                        t.query_y) for t in tasks]
    before = [F.mse_loss(alg.predict(params, t.query_x), t.query_y) for t in tasks]
    assert m["loss_after"] == pytest.approx(float(sum(after) / len(after)), rel=1e-9)
    assert m["loss_before"] == pytest.approx(float(sum(before) / len(before)), rel=1e-9)
    # default: before is measured on the support set, from the first inner step (no extra pass)
    _, m2 = MAML(model, "regression", 0.05, 2).meta_gradient(params, tasks)
    support = [F.mse_loss(alg.predict(params, t.support_x), t.support_y) for t in tasks]
    assert m2["loss_before"] == pytest.approx(float(sum(support) / len(support)), rel=1e-9)


def test_classification_metrics_and_batched_adaptation() -> None:
    model, tasks = OmniglotConvNet(ways=5, channels=8).double(), omniglot_batch(seed=4)
    params = module_params(model)
    alg = MAML(model, "classification", 0.4, 1, test_steps=3)
    _, m = alg.meta_gradient(params, tasks)
    assert set(m) == {"loss_before", "loss_after", "acc_before", "acc_after"}
    assert 0.0 <= m["acc_after"] <= 1.0
    per_task = torch.stack([alg.predict(alg.adapt(params, t.support_x, t.support_y), t.query_x)
                            for t in tasks])
    assert torch.allclose(alg.adapt_predict_batch(params, tasks), per_task, atol=ATOL)


def test_auto_times_the_candidates_once_and_records_the_choice() -> None:
    model, tasks = SinusoidMLP().double(), sinusoid_batch(tasks=5, seed=5)
    params = module_params(model)
    alg = MAML(model, "regression", 0.01, 1, strategy="auto")
    key_count = len(STRATEGY_CHOICES)
    grads, _ = alg.meta_gradient(params, tasks)
    assert len(STRATEGY_CHOICES) == key_count + 1
    choice = list(STRATEGY_CHOICES.values())[-1]
    assert choice.strategy == alg.fast.last_strategy
    assert set(choice.seconds) == {"loop", "grouped"}
    assert choice.strategy == min(choice.seconds, key=choice.seconds.__getitem__)
    again, _ = alg.meta_gradient(params, tasks)  # cached: no new timing
    assert len(STRATEGY_CHOICES) == key_count + 1
    assert max_abs_diff(again, grads) < ATOL


class _TanhMLP(nn.Module):
    """A model with no grouped forward (not a net that metalearn.folded covers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_auto_tries_vmap_only_for_a_model_that_grouped_does_not_cover() -> None:
    model = _TanhMLP().double()
    tasks = sinusoid_batch(tasks=3, seed=6)
    alg = MAML(model, "regression", 0.01, 1, strategy="auto")
    reference, _ = MAML(model, "regression", 0.01, 1, strategy="loop").meta_gradient(
        module_params(model), tasks)
    grads, _ = alg.meta_gradient(module_params(model), tasks)
    choice = list(STRATEGY_CHOICES.values())[-1]
    assert set(choice.seconds) == {"loop", "vmap"}
    assert max_abs_diff(grads, reference) < ATOL


def test_auto_on_the_conv_net_never_imports_dynamo() -> None:
    """torch.func.grad pulls in torch._dynamo (~100 MB resident); an edge site that only times
    strategies must not pay it when the grouped path covers its model."""
    code = (
        "import sys, torch\n"
        "from metalearn.algorithms.maml import MAML\n"
        "from metalearn.models import OmniglotConvNet\n"
        "from metalearn.params import module_params\n"
        "from metalearn.tasks import TaskBatch\n"
        "model = OmniglotConvNet(ways=5, channels=8)\n"
        "x, y = torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1)\n"
        "alg = MAML(model, 'classification', 0.4, 1, strategy='auto')\n"
        "alg.meta_gradient(module_params(model), TaskBatch(x, y, x, y))\n"
        "print(alg.fast.last_strategy, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out[0] in ("loop", "grouped")
    assert out[1] == "False"


def test_adapt_does_plain_sgd_without_graph() -> None:
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    params = {"0.weight": torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64,
                                       requires_grad=True)}
    x = torch.eye(3, dtype=torch.float64)
    y = torch.zeros(3, 1, dtype=torch.float64)
    alg = MAML(model, "regression", inner_lr=0.3, inner_steps=1, test_steps=2)
    adapted = alg.adapt(params, x, y)
    # loss = mean((w_i)^2) over 3 rows: grad = 2w/3, so each step scales w by (1 - 0.2)
    assert torch.allclose(adapted["0.weight"], params["0.weight"].detach() * 0.8**2)
    assert not adapted["0.weight"].requires_grad


def test_sinusoid_maml_learns_to_adapt() -> None:
    """A short meta-training run: one inner step then cuts the query MSE by more than half."""
    torch.manual_seed(0)
    start = time.perf_counter()
    alg = build_algorithm("maml", SinusoidMLP(), "regression", inner_lr=0.05, inner_steps=1,
                          strategy="grouped")
    sampler = SinusoidTasks(shots=10, queries=10, seed=0)
    outer = OuterOptimizer(alg.init_params(), lr=3e-3)
    for _ in range(500):
        grads, _ = alg.meta_gradient(outer.params, sampler.sample(25))
        outer.step(grads, "gradient")
    held_out = SinusoidTasks(shots=10, queries=10, seed=123)
    result = evaluate_by_steps(alg, outer.params, lambda k: held_out.sample(k), episodes=200,
                               steps_list=[0, 1], batch=100)
    pre, post = result[0]["mse"], result[1]["mse"]
    assert post < 0.5 * pre, result
    print(f"sinusoid MAML: MSE {pre:.2f} -> {post:.2f} in {time.perf_counter() - start:.1f} s")
