"""Checkpoints on disk: atomic writes and a ``latest`` pointer.

A checkpoint is written to a temporary file and moved into place with ``os.replace`` (atomic on
POSIX), and only then does the ``latest`` pointer move. A crash at any moment therefore leaves
either the old or the new checkpoint, never a torn one, and ``latest`` always names a whole file.
Serving watches the pointer to roll out new meta-model versions; a restarted driver resumes from it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:06d}.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Save ``state`` (tensors, numbers, RNG states) as step ``step`` and point ``latest`` at it."""
    import io

    path = checkpoint_path(run_dir, step)
    buf = io.BytesIO()
    torch.save({**state, "step": step}, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(checkpoint_dir(run_dir) / LATEST, (path.name + "\n").encode())
    return path


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps with a checkpoint file, ascending."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def latest_step(run_dir: str | Path) -> int | None:
    """The step that ``latest`` names, or ``None`` for a run without checkpoints."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    m = _NAME.match(pointer.read_text().strip())
    if m is None:
        raise ValueError(f"{pointer} does not name a checkpoint file: {pointer.read_text()!r}")
    return int(m.group(1))


def load_checkpoint(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Load step ``step`` (default: the latest); a missing step lists the ones there are."""
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    path = checkpoint_path(run_dir, step)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {checkpoint_dir(run_dir)}; "
            f"available: {list_checkpoints(run_dir)}")
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_from_latest(run_dir: str | Path, outer: Any) -> dict[str, Any] | None:
    """Restore ``outer`` (an :class:`~metalearn.outer.OuterOptimizer`) and torch's RNG from
    the run's latest checkpoint; None when the run has none.

    The whole state comes back so that each trainer restores its own parts too (the
    centralized sampler; the federated aggregator and sites). ``step`` and ``elapsed_s``
    are converted to ``int`` and ``float``.
    """
    if not (checkpoint_dir(run_dir) / LATEST).exists():
        return None
    state = load_checkpoint(run_dir)
    outer.load_state_dict(state["outer"])
    torch.set_rng_state(state["torch_rng"])
    state["step"], state["elapsed_s"] = int(state["step"]), float(state["elapsed_s"])
    return state
