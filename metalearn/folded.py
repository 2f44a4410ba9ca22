"""Folded forwards: B independent runs of one of the paper's nets (or of a plain ``Sequential``
stack of the same layers) computed as one pass.

"Folded" because the runs are folded into an axis of the activations (channels or rows) instead
of being looped over or ``vmap``-ed; each run still gets exactly the answer it would get alone
(to float rounding). Two callers need this, and this module owns it for both:

* :func:`forward_tasks` — the ``grouped`` strategy of the MAML fast path
  (:mod:`metalearn.algorithms.maml_func`): B tasks, each with its own fast weights ``[B, ...]``.
  Tasks ride in the channel axis, so per-task convolutions become one grouped convolution and
  BatchNorm over the folded channels is BatchNorm with per-task statistics; after the
  convolutions, per-task linears are one ``bmm``.
* :func:`forward_groups` — serving's ``predict_groups``: G requests, one set of weights, each
  request normalised with its own statistics (the paper's nets keep no running statistics, so a
  prediction depends on its batch). Convolutions and linears run once over all G·n rows; only
  BatchNorm sees the groups, as ``[G*n, C, H, W]`` viewed as ``[n, G*C, H, W]``. Measured here
  (one thread, 4 to 32 single-image groups, ``benchmarks/bench_group_forward.py``): 1.6-1.8x
  faster than ``vmap``, which pays Python dispatch per operator and per batching rule.

Both are one layer walk (:func:`_walk`) with a different *layout* (:class:`_Layout`): what a
``Conv2d``, a ``BatchNorm2d`` and a ``Linear`` become under that folding. Elementwise and
per-channel layers (:data:`STATELESS_LAYERS`) do not care how the runs are folded. Anything else,
and any net not in :func:`_stages`, raises :class:`Unsupported`; callers fall back to ``vmap`` or
a loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.models import OmniglotConvNet, SinusoidMLP
from metalearn.params import Params

__all__ = ["POOLING_LAYERS", "STATELESS_LAYERS", "Unsupported", "forward_groups",
           "forward_tasks", "supports_tasks"]


class Unsupported(TypeError):
    """The net, or one of its layers, has no folded forward (callers fall back to ``vmap``)."""


POOLING_LAYERS: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d)
"""Per channel over the last two axes: right only where those axes are an image's."""

STATELESS_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Identity, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.ELU, nn.LeakyReLU,
    *POOLING_LAYERS)
"""Layers without parameters that act per element or per channel, so that the module itself
runs on folded activations unchanged."""


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1)


class _Layout:
    """How the runs are folded into the activations, hence what each layer kind becomes.

    The base refuses every layer kind; a layout overrides the ones it can fold.
    """

    __slots__ = ("kind", "model", "runs")
    pooling = True  # whether POOLING_LAYERS see images in their last two axes

    def __init__(self, kind: str, model: nn.Module, runs: int) -> None:
        self.kind, self.model, self.runs = kind, model, runs

    def refuse(self, what: str) -> Unsupported:
        return Unsupported(f"no {self.kind} forward for {what} (in {type(self.model).__name__})")

    def conv(self, layer: nn.Conv2d, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        raise self.refuse(f"layer {type(layer).__name__}")

    def batch_norm(self, layer: nn.BatchNorm2d, weight: Tensor | None, bias: Tensor | None,
                   h: Tensor) -> Tensor:
        raise self.refuse(f"layer {type(layer).__name__}")

    def linear(self, layer: nn.Linear, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        raise self.refuse(f"layer {type(layer).__name__}")


class _TasksInChannels(_Layout):
    """Images ``[N, B*C, H, W]`` (task b owns channels b*C to (b+1)*C-1), weights ``[B, ...]``."""

    __slots__ = ()

    def conv(self, layer: nn.Conv2d, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        return F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), _flat(bias), layer.stride,
                        layer.padding, layer.dilation, self.runs * layer.groups)

    def batch_norm(self, layer: nn.BatchNorm2d, weight: Tensor | None, bias: Tensor | None,
                   h: Tensor) -> Tensor:
        # Statistics per folded channel are statistics per (task, channel): nothing to unfold.
        return F.batch_norm(h, None, None, _flat(weight), _flat(bias), True, 0.0, layer.eps)


class _TasksInRows(_Layout):
    """Vectors ``[B, N, D]``, weights ``[B, ...]``: a per-task linear is one ``bmm``."""

    __slots__ = ()
    pooling = False  # the last two axes are (examples, features): pooling would mix them

    def linear(self, layer: nn.Linear, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        out = torch.bmm(h, weight.transpose(1, 2))
        return out if bias is None else out + bias.unsqueeze(1)


class _GroupsInRows(_Layout):
    """Rows ``[G*n, ...]`` (group g owns rows g*n to (g+1)*n-1) and one set of weights: every
    layer is the model's own op over all rows, except BatchNorm, which folds the groups into
    its channels for the duration of one call."""

    __slots__ = ()

    def conv(self, layer: nn.Conv2d, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)

    def batch_norm(self, layer: nn.BatchNorm2d, weight: Tensor | None, bias: Tensor | None,
                   h: Tensor) -> Tensor:
        groups = self.runs
        rows, channels, height, width = h.shape
        n = rows // groups
        folded = h.view(groups, n, channels, height, width).transpose(0, 1).reshape(
            n, groups * channels, height, width)
        folded = F.batch_norm(folded, None, None,
                              None if weight is None else weight.repeat(groups),
                              None if bias is None else bias.repeat(groups), True, 0.0,
                              layer.eps)
        return folded.view(n, groups, channels, height, width).transpose(0, 1).reshape(
            rows, channels, height, width)

    def linear(self, layer: nn.Linear, weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
        return F.linear(h, weight, bias)


def _walk(module: nn.Module, prefix: str, params: Params, h: Tensor, layout: _Layout) -> Tensor:
    """The one layer walk: ``module`` (a ``Sequential``, walked child by child, or one layer)
    on ``h``, each layer as ``layout`` folds it; ``prefix`` names ``module``'s parameters.

    Dispatch is inline, one Python call per ``Sequential`` and per folded layer: on a
    single-image request the net's kernels take a few hundred µs, so calls add up."""
    layers = module.named_children() if isinstance(module, nn.Sequential) else (("", module),)
    for name, layer in layers:
        key = f"{prefix}{name}." if name else prefix
        if isinstance(layer, nn.Sequential):
            h = _walk(layer, key, params, h, layout)
        elif isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":  # F.conv2d pads with zeros only
                raise layout.refuse(f"Conv2d with padding_mode={layer.padding_mode!r}")
            h = layout.conv(layer, params[key + "weight"], params.get(key + "bias"), h)
        elif isinstance(layer, nn.BatchNorm2d):
            if layer.running_mean is not None:
                raise layout.refuse("BatchNorm with running statistics (these forwards are for "
                                    "nets that normalise with batch statistics)")
            h = layout.batch_norm(layer, params.get(key + "weight"), params.get(key + "bias"), h)
        elif isinstance(layer, STATELESS_LAYERS) and (
                layout.pooling or not isinstance(layer, POOLING_LAYERS)):
            h = layer(h)
        elif isinstance(layer, nn.Linear):
            h = layout.linear(layer, params[key + "weight"], params.get(key + "bias"), h)
        else:
            raise layout.refuse(f"layer {type(layer).__name__}")
    return h


_Stage = list[tuple[nn.Module, str]]


def _stages(model: nn.Module, kind: str) -> tuple[_Stage, _Stage]:
    """The nets covered, as (image layers, vector layers after flattening), each with the
    prefix of its parameter names. Exact types: a subclass may change ``forward``."""
    if type(model) is OmniglotConvNet:
        return [(model.features, "features.")], [(model.head, "head.")] if model.ways > 0 else []
    if type(model) is SinusoidMLP:
        return [], [(model.body, "body."), (model.head, "head.")]
    if type(model) is nn.Sequential:
        return [], [(model, "")]
    raise Unsupported(f"no {kind} forward for {type(model).__name__}")


def forward_tasks(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Outputs ``[B, N, ...]`` of ``model`` run on each task's inputs ``x[b]`` (``x`` is
    ``[B, N, ...]``) with that task's parameters (``params`` are ``[B, ...]`` each)."""
    images, vectors = _stages(model, "grouped")
    h = x
    if images:
        if x.dim() == 4:  # [B, N, H, W]: images without a channel axis
            x = x.unsqueeze(2)
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])
        layout: _Layout = _TasksInChannels("grouped", model, tasks)
        for module, prefix in images:
            h = _walk(module, prefix, params, h, layout)
        h = h.reshape(n, tasks, -1).transpose(0, 1)
    layout = _TasksInRows("grouped", model, x.shape[0])
    for module, prefix in vectors:
        h = _walk(module, prefix, params, h, layout)
    return h


def forward_groups(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Outputs ``[G, n, ...]`` of ``model`` with ``params`` on ``G`` independent batches
    ``x[g]`` (``x`` is ``[G, n, ...]``): equal, to float rounding, to calling the model on each
    ``x[g]`` alone."""
    images, vectors = _stages(model, "per-group")
    groups, n = x.shape[:2]
    layout = _GroupsInRows("per-group", model, groups)
    h = x.reshape(groups * n, *x.shape[2:])
    if images:
        if h.dim() == 3:  # [N, H, W]: images without a channel axis
            h = h.unsqueeze(1)
        for module, prefix in images:
            h = _walk(module, prefix, params, h, layout)
        h = h.flatten(1)
    for module, prefix in vectors:
        h = _walk(module, prefix, params, h, layout)
    return h.reshape(groups, n, *h.shape[1:])


def supports_tasks(model: nn.Module, params: Params, x: Tensor) -> bool:
    """Whether :func:`forward_tasks` handles this model, tried on a tiny batch (one task, two
    examples of ``x``) with ``params`` (one task's, without the task axis)."""
    try:
        with torch.no_grad():
            forward_tasks(model, {k: v.unsqueeze(0) for k, v in params.items()}, x[:1, :2])
    except Unsupported:
        return False
    return True
