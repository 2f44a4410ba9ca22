"""Checkpoints in run storage: whole-file writes and a ``latest`` pointer.

A checkpoint is written whole (:meth:`metalearn.storage.Location.write_bytes`: a temporary file,
fsync and ``os.replace`` on a local disk; one upload to an object store, which shows it only
once complete), and only then does the ``latest`` pointer move. A crash at any moment therefore
leaves either the old or the new checkpoint, never a torn one, and ``latest`` always names a
whole file. Serving watches the pointer to roll out new meta-model versions; a restarted driver
resumes from it. ``run_dir`` is a local folder or a URI (``s3://bucket/runs/NAME``).
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from metalearn.storage import Location, PathLike, location

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_dir(run_dir: PathLike) -> Location:
    return location(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: PathLike, step: int) -> Location:
    return checkpoint_dir(run_dir) / f"step_{step:06d}.pt"


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    location(path).write_bytes(data)


def save_checkpoint(run_dir: PathLike, step: int, state: dict[str, Any]) -> Location:
    """Save ``state`` (tensors, numbers, RNG states) as step ``step`` and point ``latest`` at it."""
    path = checkpoint_path(run_dir, step)
    buf = io.BytesIO()
    torch.save({**state, "step": step}, buf)
    path.write_bytes(buf.getvalue())
    (checkpoint_dir(run_dir) / LATEST).write_bytes((path.name + "\n").encode())
    return path


def list_checkpoints(run_dir: PathLike) -> list[int]:
    """Steps with a checkpoint file, ascending."""
    files = checkpoint_dir(run_dir).files()
    return sorted(int(m.group(1)) for f in files if (m := _NAME.match(f.name)))


def latest_step(run_dir: PathLike) -> int | None:
    """The step that ``latest`` names, or ``None`` for a run without checkpoints."""
    pointer = checkpoint_dir(run_dir) / LATEST
    try:
        text = pointer.read_text()
    except FileNotFoundError:
        return None
    m = _NAME.match(text.strip())
    if m is None:
        raise ValueError(f"{pointer} does not name a checkpoint file: {text!r}")
    return int(m.group(1))


def read_torch(path: PathLike) -> Any:
    """A ``torch.save`` file from run storage, tensors on the CPU, plain data only."""
    return torch.load(io.BytesIO(location(path).read_bytes()), map_location="cpu",
                      weights_only=True)


def load_checkpoint(run_dir: PathLike, step: int | None = None) -> dict[str, Any]:
    """Load step ``step`` (default: the latest); a missing step lists the ones there are."""
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    try:
        return read_torch(checkpoint_path(run_dir, step))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {checkpoint_dir(run_dir)}; "
            f"available: {list_checkpoints(run_dir)}") from None


def resume_from_latest(run_dir: PathLike, outer: Any) -> dict[str, Any] | None:
    """Restore ``outer`` (an :class:`~metalearn.outer.OuterOptimizer`) and torch's RNG from
    the run's latest checkpoint; None when the run has none.

    The whole state comes back so that each trainer restores its own parts too (the
    centralized sampler; the federated aggregator and sites). ``step`` and ``elapsed_s``
    are converted to ``int`` and ``float``.
    """
    step = latest_step(run_dir)
    if step is None:
        return None
    state = load_checkpoint(run_dir, step)
    outer.load_state_dict(state["outer"])
    torch.set_rng_state(state["torch_rng"])
    state["step"], state["elapsed_s"] = int(state["step"]), float(state["elapsed_s"])
    return state
