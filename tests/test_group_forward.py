"""The per-group forward (a server's batched predictions) equals each group run alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms import build_algorithm
from metalearn.group_forward import Unsupported, forward_groups
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
