"""What the episode samplers share: all their randomness from one seeded ``torch.Generator``,
whose state resumes the episode stream exactly, and the check of a positive count."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def positive(name: str, value: int) -> int:
    """``value`` as an int, or a ValueError that names ``name`` (a bool is no count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SeededEpisodes:
    """The base of a seeded episode sampler: ``seed``, the generator every draw uses, and a
    count of episodes drawn. :meth:`state_dict` captures them, so an interrupted run resumes
    with exactly the episodes an uninterrupted one would see."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.episodes_sampled = 0

    def state_dict(self) -> dict[str, Any]:
        """The generator state (and bookkeeping) needed to resume the episode stream exactly."""
        return {"seed": self.seed, "rng": self._generator.get_state(),
                "episodes_sampled": self.episodes_sampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            rng = state["rng"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"state must be a dict from {type(self).__name__}.state_dict()"
                             ) from err
        self._generator.set_state(rng)
        self.seed = int(state.get("seed", self.seed))
        self.episodes_sampled = int(state.get("episodes_sampled", 0))
