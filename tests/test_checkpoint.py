"""Checkpoints: atomic files, a latest pointer, and the outer optimizer's exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalearn.checkpoint import (
    checkpoint_dir,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from metalearn.outer import OuterOptimizer


def test_save_load_and_latest_pointer(tmp_path: Path) -> None:
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"params": {"w": torch.full((2,), float(step))}})
    assert list_checkpoints(tmp_path) == [10, 20]
    assert latest_step(tmp_path) == 20
    assert torch.equal(load_checkpoint(tmp_path)["params"]["w"], torch.full((2,), 20.0))
    assert load_checkpoint(tmp_path, 10)["step"] == 10
    with pytest.raises(FileNotFoundError, match=r"available: \[10, 20\]"):
        load_checkpoint(tmp_path, 15)
    leftovers = [p.name for p in checkpoint_dir(tmp_path).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_outer_optimizer_resumes_exactly() -> None:
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(6)]

    straight = OuterOptimizer(params, lr=0.1)
    for g in grads:
        straight.step(g, "gradient")

    first = OuterOptimizer(params, lr=0.1)
    for g in grads[:3]:
        first.step(g, "gradient")
    resumed = OuterOptimizer(params, lr=0.1)
    resumed.load_state_dict(first.state_dict())
    for g in grads[3:]:
        resumed.step(g, "gradient")
    for k in params:
        assert torch.equal(straight.params[k], resumed.params[k])


def test_outer_sgd_applies_gradients_and_deltas_with_opposite_signs() -> None:
    params = {"w": torch.zeros(2)}
    opt = OuterOptimizer(params, lr=0.5, kind="sgd")
    opt.step({"w": torch.tensor([1.0, -2.0])}, "gradient")
    assert torch.allclose(opt.params["w"], torch.tensor([-0.5, 1.0]))
    opt.step({"w": torch.tensor([1.0, 1.0])}, "delta")
    assert torch.allclose(opt.params["w"], torch.tensor([0.0, 1.5]))
    with pytest.raises(KeyError, match="differ"):
        opt.step({"v": torch.zeros(2)}, "gradient")
