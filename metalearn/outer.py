"""The cloud's outer optimizer over a ``Params`` dict.

Meta-gradients are applied as gradients. Parameter deltas (several local meta-steps on an edge)
are applied as the pseudo-gradient ``-delta`` (FedOpt: Reddi et al., 2021), so one optimizer
serves both kinds of update and its state checkpoints with the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from metalearn.params import Params


class OuterOptimizer:
    """Adam (or SGD) over named meta-parameters, fed gradients or deltas as dicts."""

    def __init__(self, params: Mapping[str, Tensor], lr: float = 1e-3,
                 kind: Literal["adam", "sgd"] = "adam") -> None:
        if lr <= 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        self.names = list(params)
        self._leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        leaves = list(self._leaves.values())
        if kind == "adam":
            self._opt: torch.optim.Optimizer = torch.optim.Adam(leaves, lr=lr)
        elif kind == "sgd":
            self._opt = torch.optim.SGD(leaves, lr=lr)
        else:
            raise ValueError(f"outer optimizer must be 'adam' or 'sgd', not {kind!r}")

    @property
    def params(self) -> Params:
        """Current meta-parameters (detached views; clone before mutating)."""
        return {k: v.detach() for k, v in self._leaves.items()}

    def step(self, update: Mapping[str, Tensor], kind: Literal["gradient", "delta"]) -> None:
        """Apply one aggregated update; the keys must match the meta-parameters."""
        if set(update) != set(self._leaves):
            raise KeyError(f"update keys differ from meta-parameters: "
                           f"{sorted(set(update) ^ set(self._leaves))}")
        sign = 1.0 if kind == "gradient" else -1.0
        for k, leaf in self._leaves.items():
            leaf.grad = (sign * update[k]).to(leaf.dtype).clone()
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"params": {k: v.detach().clone() for k, v in self._leaves.items()},
                "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for k, leaf in self._leaves.items():
                leaf.copy_(state["params"][k])
        self._opt.load_state_dict(state["optimizer"])
