"""The folded forwards equal each run alone: per-request BatchNorm statistics (a server's
batched predictions, ``forward_groups``) and per-task weights (MAML's ``grouped`` strategy,
``forward_tasks``; its gradients are checked against the other strategies in test_maml.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms import build_algorithm
from metalearn.folded import Unsupported, forward_groups, forward_tasks, supports_tasks
from metalearn.models import OmniglotConvNet, SinusoidMLP
from metalearn.params import module_params


def _alone(model: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([functional_call(model, params, (xg,)) for xg in x])


@pytest.mark.parametrize("pooling", ["stride", "max"])
@pytest.mark.parametrize("ways", [5, 0])
@pytest.mark.parametrize("n", [1, 3])
def test_conv_net_groups_keep_their_own_statistics(pooling: str, ways: int, n: int) -> None:
    torch.manual_seed(0)
    model = OmniglotConvNet(ways=ways, channels=8, pooling=pooling)
    params = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in module_params(model).items()}
    # Groups on very different scales: shared statistics would change every answer.
    x = torch.randn(4, n, 1, 28, 28) * torch.tensor([0.1, 1.0, 5.0, 20.0]).view(4, 1, 1, 1, 1)
    got = forward_groups(model, params, x)
    assert got.shape == (4, n, ways or model.embedding_dim)
    torch.testing.assert_close(got, _alone(model, params, x), atol=1e-5, rtol=1e-5)
    shared = functional_call(model, params, (x.reshape(4 * n, 1, 28, 28),)).view(4, n, -1)
    assert (shared - got).abs().max() > 1e-2  # what the per-group statistics protect against


def test_images_without_channel_axis_and_mlp() -> None:
    torch.manual_seed(1)
    conv = OmniglotConvNet(ways=5, channels=8)
    params = {k: v.detach() for k, v in module_params(conv).items()}
    x = torch.randn(3, 2, 28, 28)
    torch.testing.assert_close(forward_groups(conv, params, x), _alone(conv, params, x),
                               atol=1e-5, rtol=1e-5)
    mlp = SinusoidMLP()
    mp = {k: v.detach() for k, v in module_params(mlp).items()}
    xs = torch.linspace(-5, 5, 12).view(3, 4, 1)
    torch.testing.assert_close(forward_groups(mlp, mp, xs), _alone(mlp, mp, xs))


def test_unknown_architecture_is_unsupported_and_algorithms_fall_back_to_vmap() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    params = {k: v.detach() for k, v in module_params(model).items()}
    x = torch.randn(5, 2, 3)
    with pytest.raises(Unsupported, match="Sequential"):
        forward_groups(model, params, x)
    alg = build_algorithm("maml", model, "classification", inner_lr=0.1)
    torch.testing.assert_close(alg.predict_groups(params, x), _alone(model, params, x))


@pytest.mark.parametrize("name", ["maml", "metasgd", "anil", "protonet"])
def test_predict_groups_equals_predict_for_every_algorithm(name: str) -> None:
    torch.manual_seed(2)
    model = OmniglotConvNet(ways=0 if name == "protonet" else 5, channels=8)
    alg = build_algorithm(name, model, "classification", inner_lr=0.4)
    sx, sy = torch.randn(5, 1, 28, 28), torch.arange(5)
    adapted = alg.adapt(alg.init_params(), sx, sy, steps=1)
    x = torch.randn(3, 4, 1, 28, 28)
    want = torch.stack([alg.predict(adapted, xg) for xg in x])
    torch.testing.assert_close(alg.predict_groups(adapted, x), want, atol=1e-5, rtol=1e-5)


def _per_task(model: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([functional_call(model, {k: v[b] for k, v in params.items()}, (x[b],))
                        for b in range(x.shape[0])])


@pytest.mark.parametrize("pooling", ["stride", "max"])
@pytest.mark.parametrize("ways", [5, 0])
def test_tasks_keep_their_own_weights_and_statistics(pooling: str, ways: int) -> None:
    torch.manual_seed(3)
    model = OmniglotConvNet(ways=ways, channels=8, pooling=pooling)
    params = {k: v.detach() + 0.1 * torch.randn(3, *v.shape)
              for k, v in module_params(model).items()}
    x = torch.randn(3, 4, 1, 28, 28) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(forward_tasks(model, params, x), _per_task(model, params, x),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward_tasks(model, params, x[:, :, 0]),  # no channel axis
                               _per_task(model, params, x), atol=1e-5, rtol=1e-5)


def test_tasks_through_the_mlp_and_a_sequential() -> None:
    torch.manual_seed(4)
    for model in (SinusoidMLP(), nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))):
        params = {k: v.detach() + 0.1 * torch.randn(4, *v.shape)
                  for k, v in module_params(model).items()}
        x = torch.randn(4, 6, model[0].in_features if isinstance(model, nn.Sequential) else 1)
        torch.testing.assert_close(forward_tasks(model, params, x), _per_task(model, params, x))


def test_groups_through_a_sequential_with_batch_norm() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU(), nn.AvgPool2d(2))
    params = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in module_params(model).items()}
    x = torch.randn(3, 2, 1, 8, 8) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(forward_groups(model, params, x), _alone(model, params, x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model", "match"), [
    (nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), r"layer LayerNorm \(in Sequential\)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "padding_mode"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "running statistics"),
])
def test_unsupported_layers_are_named(model: nn.Module, match: str) -> None:
    params = {k: v.detach() for k, v in module_params(model).items()}
    x = torch.randn(2, 3, 1, 6, 3) if isinstance(model[0], nn.Conv2d) else torch.randn(2, 3, 3)
    with pytest.raises(Unsupported, match=match):
        forward_groups(model, params, x)


def test_tasks_refuse_what_would_mix_tasks() -> None:
    """Pooling after a per-task linear would pool over (examples, features) of the folded
    activations; a convolution outside an image stage has no task-folded layout."""
    for model in (nn.Sequential(nn.Linear(4, 4), nn.MaxPool2d(2)),
                  nn.Sequential(nn.Conv2d(1, 2, 3))):
        params = {k: v.detach() for k, v in module_params(model).items()}
        x = torch.randn(2, 3, 4) if isinstance(model[0], nn.Linear) else torch.randn(2, 3, 1, 5, 5)
        assert not supports_tasks(model, params, x)
    mlp = SinusoidMLP()
    assert supports_tasks(mlp, {k: v.detach() for k, v in module_params(mlp).items()},
                          torch.randn(2, 3, 1))


def test_predict_groups_tries_an_unsupported_net_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsupported is a property of the architecture: a server's later batches go straight to
    the fallback instead of running the walk up to the unsupported layer again."""
    import metalearn.algorithms.maml as maml_module

    calls = []

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return forward_groups(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(maml_module, "forward_groups", counting)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    params = {k: v.detach() for k, v in module_params(model).items()}
    alg = build_algorithm("maml", model, "classification", inner_lr=0.1)
    x = torch.randn(5, 2, 3)
    for _ in range(3):
        torch.testing.assert_close(alg.predict_groups(params, x), _alone(model, params, x))
    assert len(calls) == 1
