"""The networks of the MAML paper, built so that `higher` and `torch.func` can both drive them.

BatchNorm layers keep no running statistics (``track_running_stats=False``): MAML normalises
with the statistics of the batch at hand, in training and at test time alike, and a model with
no buffers is a pure function of its parameters, which is what functional meta-learning needs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
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


class MatchingNet(nn.Module):
    """The embeddings of Matching Networks (Vinyals et al., 2016): a Conv-4 encoder, and
    optionally the full context embeddings (FCE).

    ``forward(x)`` embeds a *support set* as a sequence: ``g(x_i, S)``, the encoder output
    plus, with FCE, both directions of a bidirectional LSTM run over the support set in
    order (``g = h_fwd + h_bwd + g'``). ``forward(x, support=G)`` embeds *queries* against
    the support embeddings ``G``: ``f(x, S)``, with FCE ``fce_steps`` steps of an attention
    LSTM that reads over ``G`` (``h_k = LSTM(f', h_{k-1} + r_{k-1}) + f'``, ``r`` the
    softmax-over-dot-products read; the paper concatenates ``[h, r]``, here they are added so
    that the cell's state keeps the embedding's size). Without FCE both are the encoder alone.
    """

    def __init__(self, channels: int = 64, pooling: Pooling = "max", fce: bool = False,
                 fce_steps: int = 5, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        if fce_steps < 1:
            raise ValueError(f"fce_steps must be >= 1, got {fce_steps}")
        self.encoder = OmniglotConvNet(0, channels, pooling, in_channels, image_size)
        self.input_shape = self.encoder.input_shape
        self.embedding_dim = self.encoder.embedding_dim
        self.fce, self.fce_steps = bool(fce), int(fce_steps)
        if self.fce:
            d = self.embedding_dim
            self.support_lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(d, d)

    def forward(self, x: Tensor, support: Tensor | None = None) -> Tensor:
        e = self.encoder(x)
        if not self.fce:
            return e
        if support is None:
            out, _ = self.support_lstm(e.unsqueeze(0))
            d = self.embedding_dim
            return out[0, :, :d] + out[0, :, d:] + e
        h, c = torch.zeros_like(e), torch.zeros_like(e)
        r = torch.zeros_like(e)
        for _ in range(self.fce_steps):
            h_hat, c = self.query_lstm(e, (h + r, c))
            h = h_hat + e
            r = torch.softmax(h @ support.T, dim=-1) @ support
        return h


class SiameseNet(nn.Module):
    """The convolutional twin of Koch et al. (2015), sized for 28×28 Omniglot.

    ``forward(x)`` is the twin: a Conv-4 encoder and a fully connected sigmoid layer (the
    paper's 4096-unit layer; ``hidden`` units here). ``distance(h1, h2)`` is the paper's
    weighted L1 distance before its sigmoid, ``Σ_j α_j |h1_j − h2_j| + b``: a logit that two
    inputs are of the same class.
    """

    def __init__(self, channels: int = 64, pooling: Pooling = "max", hidden: int = 128,
                 in_channels: int = 1, image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        self.encoder = OmniglotConvNet(0, channels, pooling, in_channels, image_size)
        self.input_shape = self.encoder.input_shape
        self.features = nn.Linear(self.encoder.embedding_dim, hidden)
        self.distance_head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.features(self.encoder(x)))

    def distance(self, h1: Tensor, h2: Tensor) -> Tensor:
        """Same-class logits ``[A, B]`` of every pair of twin features ``h1 [A, H]``,
        ``h2 [B, H]``."""
        return weighted_l1(h1, h2, self.distance_head.weight, self.distance_head.bias)


def weighted_l1(h1: Tensor, h2: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Koch et al.'s distance before its sigmoid, ``Σ_j α_j |h1_j − h2_j| + b``, for every
    pair: [A, B] from [A, H] and [B, H], ``weight`` [1, H] (the α), ``bias`` [1]."""
    return F.linear((h1.unsqueeze(-2) - h2.unsqueeze(-3)).abs(), weight, bias).squeeze(-1)


class CaviaMLP(nn.Module):
    """The sinusoid regressor of CAVIA (Zintgraf et al., 2019): the 1-40-40-1 MLP whose input is
    concatenated with ``context`` (a parameter the inner loop adapts from zero; the outer
    loop never moves it)."""

    def __init__(self, hidden: int = 40, context: int = 4) -> None:
        super().__init__()
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.context = nn.Parameter(torch.zeros(context))
        self.body = nn.Sequential(nn.Linear(1 + context, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.context.expand(*x.shape[:-1], self.context.shape[0])
        return self.head(self.body(torch.cat([x, ctx], dim=-1)))


class FiLM(nn.Module):
    """Feature-wise linear modulation by a context vector: ``(1 + γ(φ)) · h + β(φ)``, with
    ``(γ, β)`` linear in φ. The bias starts at zero, so a zero context is the identity; the
    weights keep torch's default initialisation (at zero weights the context would get no
    gradient, and the weights none through it: a stationary point CAVIA never leaves)."""

    def __init__(self, context: int, channels: int) -> None:
        super().__init__()
        self.film = nn.Linear(context, 2 * channels)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        gamma, beta = self.film(context).chunk(2)
        shape = (1, -1) + (1,) * (h.dim() - 2)
        return (1 + gamma).reshape(shape) * h + beta.reshape(shape)


class CaviaConvNet(nn.Module):
    """CAVIA's classifier: the MAML paper's Omniglot Conv-4 with a FiLM layer after each block's
    BatchNorm, driven by ``context`` (adapted in the inner loop, zero at the start of each
    task); the convolutions and the head are meta-learned only."""

    def __init__(self, ways: int = 5, channels: int = 64, pooling: Pooling = "stride",
                 context: int = 100, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.context = nn.Parameter(torch.zeros(context))
        stride = 2 if pooling == "stride" else 1
        self.pooling = pooling
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride, 1)
            for i in range(4))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, track_running_stats=False)
                                   for _ in range(4))
        self.films = nn.ModuleList(FiLM(context, channels) for _ in range(4))
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.input_shape = (int(in_channels), int(height), int(width))
        for _ in range(4):
            height, width = (((height + 1) // 2, (width + 1) // 2) if pooling == "stride"
                             else (height // 2, width // 2))
        self.head = nn.Linear(channels * height * width, ways)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        for conv, norm, film in zip(self.convs, self.norms, self.films, strict=True):
            x = F.relu(film(norm(conv(x)), self.context))
            if self.pooling == "max":
                x = F.max_pool2d(x, 2)
        return self.head(x.flatten(1))


class HallucinatorNet(nn.Module):
    """The network of support-set hallucination (Wang et al., 2018): a Conv-4 embedding and the
    generator ``G``, a three-layer MLP with leaky ReLUs (the paper's) from ``[e, z]`` (an
    embedding and ``noise_dim`` noise values) to an embedding's width.

    ``forward(x)`` embeds; the algorithm calls ``generator`` itself and adds its output to the
    seed embedding. The generator's last layer starts at zero, so an untrained generator copies
    its seed (the method starts as ProtoNet) and the other layers still get gradient through it
    once it moves.
    """

    def __init__(self, channels: int = 64, pooling: Pooling = "max", noise_dim: int = 16,
                 hidden: int = 128, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        if noise_dim < 1:
            raise ValueError(f"noise_dim must be >= 1, got {noise_dim}")
        self.encoder = OmniglotConvNet(0, channels, pooling, in_channels, image_size)
        self.input_shape = self.encoder.input_shape
        self.embedding_dim = d = self.encoder.embedding_dim
        self.noise_dim = int(noise_dim)
        self.generator = nn.Sequential(nn.Linear(d + noise_dim, hidden), nn.LeakyReLU(0.2),
                                       nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                       nn.Linear(hidden, d))
        nn.init.zeros_(self.generator[-1].weight)
        nn.init.zeros_(self.generator[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class MANNNet(nn.Module):
    """The parameters of a memory-augmented network (Santoro et al., 2016) for ``ways`` labels: a
    Conv-4 embedding, an LSTM ``controller`` over ``[embedding, label, read]``, the ``key``,
    ``add`` and ``gate`` heads of the memory, and the output ``head`` over ``[h, read]``. The
    recurrence itself (least-recently-used access to a ``slots`` × ``width`` memory) is
    :class:`metalearn.algorithms.mann.MANN`'s; ``forward(x)`` embeds. Paper sizes: a 200-unit
    controller and a 128 × 40 memory.
    """

    def __init__(self, ways: int = 5, channels: int = 64, pooling: Pooling = "max",
                 controller: int = 200, slots: int = 128, width: int = 40, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        if min(ways, controller, slots, width) < 1:
            raise ValueError("ways, controller, slots and width must be >= 1")
        self.ways, self.slots, self.width = int(ways), int(slots), int(width)
        self.encoder = OmniglotConvNet(0, channels, pooling, in_channels, image_size)
        self.input_shape = self.encoder.input_shape
        d = self.encoder.embedding_dim
        self.controller = nn.LSTMCell(d + ways + width, controller)
        self.key = nn.Linear(controller, width)
        self.add = nn.Linear(controller, width)
        self.gate = nn.Linear(controller, 1)
        self.head = nn.Linear(controller + width, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class VersaNet(nn.Module):
    """The networks of VERSA (Gordon et al., 2019): a Conv-4 embedding and the amortization
    network, an MLP with ELUs over a class's mean embedding followed by four linear heads, the
    mean and log-variance of the class's weight vector (the embedding's width) and of its bias.
    The log-variance heads' biases start at −6 (σ ≈ 0.05), so the first samples are close to
    their means. ``forward(x)`` embeds; :class:`metalearn.algorithms.versa.VERSA` calls the rest.
    """

    def __init__(self, channels: int = 64, pooling: Pooling = "max", hidden: int = 128,
                 in_channels: int = 1, image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        self.encoder = OmniglotConvNet(0, channels, pooling, in_channels, image_size)
        self.input_shape = self.encoder.input_shape
        d = self.embedding_dim = self.encoder.embedding_dim
        self.amortizer = nn.Sequential(nn.Linear(d, hidden), nn.ELU(), nn.Linear(hidden, hidden),
                                       nn.ELU())
        self.weight_mean = nn.Linear(hidden, d)
        self.weight_logvar = nn.Linear(hidden, d)
        self.bias_mean = nn.Linear(hidden, 1)
        self.bias_logvar = nn.Linear(hidden, 1)
        for head in (self.weight_logvar, self.bias_logvar):
            nn.init.constant_(head.bias, -6.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by name (``omniglot_conv``, ``sinusoid_mlp``, ``matching_net``,
    ``siamese_net``, ``cavia_mlp``, ``cavia_conv``, ``hallucinator_net``, ``mann_net``,
    ``versa_net``)."""
    builders: dict[str, type[nn.Module]] = {
        "omniglot_conv": OmniglotConvNet, "sinusoid_mlp": SinusoidMLP,
        "matching_net": MatchingNet, "siamese_net": SiameseNet, "cavia_mlp": CaviaMLP,
        "cavia_conv": CaviaConvNet, "hallucinator_net": HallucinatorNet,
        "mann_net": MANNNet, "versa_net": VersaNet}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(builders)}")
    return builders[name](**kwargs)  # type: ignore[arg-type]
