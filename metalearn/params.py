"""Parameters as plain ``dict[str, Tensor]``: what crosses actor boundaries and lands on disk.

A functional representation (as in TorchOpt) keeps the maths free of module state: the driver
averages dicts, an edge actor turns a dict into a meta-update, a replica adapts a dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


def module_params(model: nn.Module) -> Params:
    """Detached copies of a module's parameters, keyed by their names."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load_into(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` into the module's own parameters (same names, same shapes)."""
    own = dict(model.named_parameters())
    missing = set(own) - set(params)
    if missing:
        raise KeyError(f"parameters missing for {sorted(missing)}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(params[name])


def detach(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in params.items()}


def clone(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}


def zeros_like(params: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def weighted_sum(dicts: Iterable[Mapping[str, Tensor]], weights: Iterable[float]) -> Params:
    """``sum_i w_i * d_i`` key by key; the caller normalises the weights."""
    out: Params = {}
    for d, w in zip(dicts, weights, strict=True):
        for k, v in d.items():
            out[k] = out[k] + w * v if k in out else w * v.detach().clone()
    return out


def num_bytes(params: Mapping[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in params.values())


def max_abs_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    if a.keys() != b.keys():
        raise KeyError(f"different keys: {sorted(set(a) ^ set(b))}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@dataclass(frozen=True)
class FlatLayout:
    """Names and shapes of a parameter dict, to ship it as one contiguous float32 vector.

    Why: a dict of tensors costs the object store one pickled tensor per key each way, while
    one numpy vector is read in place (zero-copy) by every worker on a node. Measured on the
    4-site Omniglot round: the payload dominated the round's overhead (docs/BENCHMARKS.md).
    Both ends build the layout from the same config, so names, order and shapes agree.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> FlatLayout:
        return cls(tuple(params), tuple(tuple(v.shape) for v in params.values()))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def pack(self, params: Mapping[str, Tensor]) -> np.ndarray:
        """One float32 vector holding ``params`` in layout order (a copy; any key order)."""
        if params.keys() != set(self.names):
            raise KeyError(f"parameter names differ from the layout: {list(params)} vs "
                           f"{list(self.names)}")
        return torch.cat([params[k].detach().reshape(-1).to(torch.float32)
                          for k in self.names]).numpy()

    def vector(self, flat: np.ndarray | Tensor) -> Tensor:
        """A fresh float32 tensor copy of ``flat`` (safe on read-only object-store buffers),
        checked to hold exactly the layout's parameters."""
        if isinstance(flat, Tensor):
            vec = flat.detach().to(torch.float32).reshape(-1).clone()
        else:
            vec = torch.as_tensor(np.array(flat, dtype=np.float32, copy=True)).reshape(-1)
        if vec.numel() != self.numel:
            raise ValueError(f"a flat vector of {vec.numel()} values does not hold "
                             f"{self.numel} parameters")
        return vec

    def unpack(self, flat: np.ndarray | Tensor) -> Params:
        """Tensors (views of one fresh copy of ``flat``) keyed and shaped by the layout."""
        return self.views(self.vector(flat))

    def views(self, vec: Tensor) -> Params:
        """Named views into ``vec`` itself (no copy, any dtype), shaped by the layout."""
        parts = vec.split([math.prod(s) for s in self.shapes])
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def concat(self, tensors: Mapping[str, Tensor], what: str = "tensors") -> Tensor:
        """One vector of ``tensors`` in layout order (a copy, dtype kept), after :meth:`check`:
        what the outer optimizer keeps its parameters, updates and moments in."""
        self.check(tensors, what)
        return torch.cat([tensors[k].detach().reshape(-1) for k in self.names])

    def check(self, tensors: Mapping[str, Tensor], what: str) -> None:
        """Same names and shapes as the layout: a flat concatenation would otherwise put a
        same-sized tensor of another shape on the wrong coordinates, silently."""
        if set(tensors) != set(self.names):
            raise KeyError(f"{what} keys differ from meta-parameters: "
                           f"{sorted(set(tensors) ^ set(self.names))}")
        for k, shape in zip(self.names, self.shapes, strict=True):
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"{what}: {k} has shape {tuple(tensors[k].shape)}, "
                                 f"expected {shape}")
