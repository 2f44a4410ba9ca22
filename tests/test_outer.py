"""The outer optimizer: the same numbers as torch.optim, without importing torch's compiler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn.outer import OuterOptimizer

ROOT = Path(__file__).resolve().parents[1]


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def _updates(steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
            for _ in range(steps)]


def _torch_reference(kind: str, lr: float, updates: list[dict[str, torch.Tensor]],
                     sign: float) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in _params().items()}
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    opt = cls(list(leaves.values()), lr=lr)
    for u in updates:
        for k, leaf in leaves.items():
            leaf.grad = sign * u[k]
        opt.step()
    return {k: v.detach() for k, v in leaves.items()}, opt


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("update_kind", ["gradient", "delta"])
def test_steps_equal_torch_optim_bit_for_bit(kind: str, update_kind: str) -> None:
    updates = _updates(6)
    ours = OuterOptimizer(_params(), lr=0.01, kind=kind)  # type: ignore[arg-type]
    for u in updates:
        ours.step(u, update_kind)  # type: ignore[arg-type]
    sign = 1.0 if update_kind == "gradient" else -1.0
    reference, _ = _torch_reference(kind, 0.01, updates, sign)
    for k in reference:
        assert torch.equal(ours.params[k], reference[k]), k
    assert not torch.equal(ours.params["w"], _params()["w"])  # it moved


def test_resumes_from_a_checkpoint_written_with_torch_optim() -> None:
    """Checkpoints of earlier versions hold torch.optim.Adam's state dict: they still resume."""
    updates = _updates(5)
    after3, torch_opt = _torch_reference("adam", 0.01, updates[:3], 1.0)
    resumed = OuterOptimizer(_params(), lr=0.01)
    resumed.load_state_dict({"params": after3, "optimizer": torch_opt.state_dict()})
    for u in updates[3:]:
        resumed.step(u, "gradient")
    reference, _ = _torch_reference("adam", 0.01, updates, 1.0)
    for k in reference:
        assert torch.equal(resumed.params[k], reference[k]), k


def test_state_round_trip_and_mismatches() -> None:
    opt = OuterOptimizer(_params(), lr=0.01)
    opt.step(_updates(1)[0], "gradient")
    state = opt.state_dict()
    assert state["optimizer"]["step"] == 1
    sgd = OuterOptimizer(_params(), lr=0.01, kind="sgd")
    with pytest.raises(ValueError, match="holds adam state"):
        sgd.load_state_dict(state)
    with pytest.raises(KeyError, match="update keys differ"):
        opt.step({"w": torch.zeros(4, 3)}, "gradient")
    with pytest.raises(ValueError, match="'adam' or 'sgd'"):
        OuterOptimizer(_params(), kind="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be > 0"):
        OuterOptimizer(_params(), lr=0.0)


def test_params_are_copies_that_callers_cannot_change() -> None:
    opt = OuterOptimizer(_params(), lr=0.01)
    opt.params["w"].requires_grad_(True)
    assert not opt.params["w"].requires_grad
    opt.params["w"].add_(1.0)
    assert torch.equal(opt.params["w"], _params()["w"])


def test_params_pickle_at_their_own_size() -> None:
    """The optimizer keeps one flat buffer; what it hands out must not drag that buffer along
    once per tensor when pickled (as Ray does when the params cross to a task)."""
    import pickle

    params = {f"t{i}": torch.randn(1000) for i in range(18)}
    raw = sum(v.numel() * v.element_size() for v in params.values())
    assert len(pickle.dumps(OuterOptimizer(params).params)) < 1.2 * raw


def test_an_update_of_the_right_size_but_wrong_shape_is_refused() -> None:
    opt = OuterOptimizer(_params(), lr=0.01)
    with pytest.raises(ValueError, match=r"w has shape \(3, 4\), expected \(4, 3\)"):
        opt.step({"w": torch.zeros(3, 4), "b": torch.zeros(3)}, "gradient")


def test_a_step_does_not_import_the_compiler() -> None:
    """torch.optim imports torch._dynamo (~100 MB resident) when an optimizer is built; the
    cloud driver and the edge actors run this optimizer and must not pay for it."""
    code = ("import sys, torch\n"
            "from metalearn.outer import OuterOptimizer\n"
            "opt = OuterOptimizer({'w': torch.zeros(3)}, lr=0.1)\n"
            "opt.step({'w': torch.ones(3)}, 'gradient')\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "False"
