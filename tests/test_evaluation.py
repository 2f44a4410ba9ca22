"""evaluate() / evaluate_by_steps(): means, 95 % intervals and batching on crafted episodes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from metalearn.algorithms.base import MetaAlgorithm
from metalearn.algorithms.maml import MAML
from metalearn.evaluation import evaluate, evaluate_by_steps, summarize
from metalearn.models import SinusoidMLP
from metalearn.params import Params
from metalearn.tasks import TaskBatch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and robust to oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class AlwaysZero(MetaAlgorithm):
    """Predicts class 0 (or the value 0) whatever it sees: scores are set by the labels alone."""

    name = "always_zero"

    def meta_gradient(self, params: Params, tasks: TaskBatch):  # pragma: no cover - unused
        raise NotImplementedError

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None) -> Params:
        return params

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        if self.task_type == "classification":
            return torch.tensor([1.0, 0.0]).expand(x.shape[0], 2)
        return torch.zeros(x.shape[0], 1)


class Sampler:
    """Hands out fixed episodes in order and records the batch sizes asked for."""

    def __init__(self, query_y: list[Tensor]) -> None:
        self.query_y, self.asked, self.next = query_y, [], 0

    def __call__(self, k: int) -> TaskBatch:
        self.asked.append(k)
        ys = self.query_y[self.next:self.next + k]
        self.next += k
        q = torch.stack(ys)
        return TaskBatch(torch.zeros(len(ys), 2, 1), torch.zeros(len(ys), 2, dtype=torch.long),
                         torch.zeros(len(ys), q.shape[1], 1), q)


def test_classification_accuracy_and_ci95() -> None:
    # accuracy per episode = share of label 0: 1, 1/2, 0, 1/2
    labels = [torch.tensor(v) for v in ([0, 0], [0, 1], [1, 1], [1, 0])]
    sampler = Sampler(labels)
    result = evaluate(AlwaysZero(torch.nn.Linear(1, 1)), {}, sampler, episodes=4, batch=3)
    std = math.sqrt((0.5**2 + 0 + 0.5**2 + 0) / 4)
    assert result == pytest.approx({"accuracy": 0.5, "ci95": 1.96 * std / 2, "episodes": 4})
    assert sampler.asked == [3, 1]


def test_regression_mse_and_ci95() -> None:
    ys = [torch.tensor([[1.0], [1.0]]), torch.tensor([[3.0], [1.0]])]  # MSE 1 and 5
    alg = AlwaysZero(torch.nn.Linear(1, 1), task_type="regression")
    result = evaluate(alg, {}, Sampler(ys), episodes=2)
    assert result == pytest.approx({"mse": 3.0, "ci95": 1.96 * 2.0 / math.sqrt(2), "episodes": 2})


def test_summarize_and_bad_arguments() -> None:
    assert summarize([0.25], "accuracy") == {"accuracy": 0.25, "ci95": 0.0, "episodes": 1}
    with pytest.raises(ValueError, match="episodes"):
        evaluate(AlwaysZero(torch.nn.Linear(1, 1)), {}, Sampler([]), episodes=0)


def sinusoid_sampler(seed: int):
    g = torch.Generator().manual_seed(seed)

    def sample(k: int) -> TaskBatch:
        amp = torch.rand(k, 1, 1, generator=g) * 4 + 1
        x = torch.rand(k, 20, 1, generator=g) * 10 - 5
        y = amp * torch.sin(x)
        return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])

    return sample


class PerTaskOnly(MAML):
    """MAML without its batched evaluation path: evaluate() falls back to adapt/predict."""

    adapt_predict_batch = None  # type: ignore[assignment]


def test_batched_and_per_task_evaluation_agree_and_steps_are_paired() -> None:
    torch.manual_seed(0)
    model = SinusoidMLP()
    batched = MAML(model, "regression", inner_lr=0.01, test_steps=3)
    plain = PerTaskOnly(model, "regression", inner_lr=0.01, test_steps=3)
    params = batched.init_params()
    a = evaluate(batched, params, sinusoid_sampler(1), episodes=10, batch=4)
    b = evaluate(plain, params, sinusoid_sampler(1), episodes=10, batch=4)
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-5)
    assert a["ci95"] == pytest.approx(b["ci95"], rel=1e-4)
    by_steps = evaluate_by_steps(batched, params, sinusoid_sampler(1), episodes=10,
                                 steps_list=[0, 3], batch=4)
    assert by_steps[3]["mse"] == pytest.approx(a["mse"], rel=1e-5)
    zero = evaluate(batched, params, sinusoid_sampler(1), episodes=10, batch=4, steps=0)
    assert by_steps[0] == pytest.approx(zero)
