"""The networks of the MAML paper, built so that `higher` and `torch.func` can both drive them.

BatchNorm layers keep no running statistics (``track_running_stats=False``): MAML normalises
with the statistics of the batch at hand, in training and at test time alike, and a model with
no buffers is a pure function of its parameters, which is what functional meta-learning needs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Pooling = Literal["stride", "max"]


def _conv_block(c_in: int, c_out: int, pooling: Pooling) -> nn.Sequential:
    stride = 2 if pooling == "stride" else 1
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(c_out, track_running_stats=False),
        nn.ReLU(),
    ]
    if pooling == "max":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class OmniglotConvNet(nn.Module):
    """4 × [3×3 conv, 64 filters, BatchNorm, ReLU] then a linear head (Finn et al., 2017).

    ``pooling="stride"`` is the paper's Omniglot variant (stride-2 convolutions, no pooling);
    ``"max"`` is the max-pooling Conv-4 of ProtoNets. ``ways=0`` drops the head, so the network
    is an embedding (ProtoNet). The head is named ``head`` so that ANIL can adapt it alone.
    ``in_channels`` and ``image_size`` (an int, or ``(height, width)``) are the data set's
    (:meth:`metalearn.data.source.FewShotSource.input_shape`): 1×28×28 for Omniglot, any
    size and 1 or 3 channels for an image folder; the head's width follows from them.
    """

    def __init__(self, ways: int = 5, channels: int = 64, pooling: Pooling = "stride",
                 in_channels: int = 1, image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        if pooling not in ("stride", "max"):
            raise ValueError(f"pooling must be 'stride' or 'max', not {pooling!r}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if pooling == "max" and min(height, width) < 16:
            raise ValueError(f"pooling 'max' halves the image four times: {height}x{width} "
                             "inputs are too small (16x16 at least)")
        self.ways, self.pooling = ways, pooling
        self.input_shape = (int(in_channels), int(height), int(width))
        self.features = nn.Sequential(
            *[_conv_block(in_channels if i == 0 else channels, channels, pooling) for i in range(4)]
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(2, *self.input_shape)).flatten(1)
        self.embedding_dim = int(flat.shape[1])
        self.head = nn.Linear(self.embedding_dim, ways) if ways > 0 else nn.Identity()

    def embed(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # [N, H, W] images without a channel axis
            x = x.unsqueeze(1)
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


class SinusoidMLP(nn.Module):
    """The 1-40-40-1 ReLU regressor of the MAML paper's sinusoid experiment."""

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by name: ``omniglot_conv`` or ``sinusoid_mlp``."""
    builders = {"omniglot_conv": OmniglotConvNet, "sinusoid_mlp": SinusoidMLP}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(builders)}")
    return builders[name](**kwargs)  # type: ignore[arg-type]
