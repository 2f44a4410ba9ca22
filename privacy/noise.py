"""Gaussian noise for differential privacy: from the operating system's CSPRNG, or seeded.

Why not ``torch.randn``: a DP guarantee assumes noise the adversary cannot predict. A seeded
Mersenne Twister or Philox stream is predictable by anyone who learns the seed (config files
travel) or enough of its output. So by default every normal comes from ``os.urandom`` (the
kernel's CSPRNG), turned into normals by the Box-Muller transform in float64. Tests that need
reproducible noise (an exact resume, a fixed expected value) pass a seed: then a draw is a pure
function of ``(seed, stream)``, where the stream names who draws and for what (a site and a
round, the cloud and a round), so a resumed run or a restarted site draws the same noise
without any generator state to checkpoint.

Known limit (documented in ``docs/PRIVACY.md``): floating-point normals are not exactly
Gaussian (Mironov 2012 showed the consequence for Laplace noise); a discrete Gaussian would
close that gap.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Who draws: a site's stream is keyed by a CRC of its name, the cloud's by this constant
# (CRC-32 values are below 2**32, so the two never collide).
CLOUD_STREAM = 2**32 + 1
# What for: the noise share on a site's update, on its clipping vote; the cloud's noise on the
# sum and on the votes.
UPDATE, VOTE = 0, 1
_U53 = 2.0 ** -53


def site_stream(site: str, round_idx: int, purpose: int) -> tuple[int, ...]:
    """The stream of ``site``'s draws for ``purpose`` in round ``round_idx``."""
    return (zlib.crc32(site.encode()), int(round_idx), int(purpose))


def cloud_stream(round_idx: int, purpose: int) -> tuple[int, ...]:
    """The stream of the cloud's draws for ``purpose`` in round ``round_idx``."""
    return (CLOUD_STREAM, int(round_idx), int(purpose))


def secure_normals(n: int) -> np.ndarray:
    """``n`` independent standard normals (float64) from ``os.urandom`` by Box-Muller.

    Each pair of 53-bit uniforms ``u1`` in (0, 1] and ``u2`` in [0, 1) gives two normals
    ``sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)``.
    """
    if n <= 0:
        return np.zeros(0)
    pairs = (n + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64) >> np.uint64(11)
    u1 = (words[:pairs] + 1).astype(np.float64) * _U53
    u2 = words[pairs:].astype(np.float64) * _U53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


class GaussianNoise:
    """Where the DP noise of one party (a site or the cloud) comes from.

    ``seed=None`` (the default of a run): the OS CSPRNG, never reproducible. A seed: a torch
    generator seeded from ``(seed, *stream)`` for each draw, so draws repeat exactly.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    @property
    def secure(self) -> bool:
        return self.seed is None

    def normals(self, n: int, std: float, stream: Sequence[int]) -> Tensor:
        """``n`` draws of N(0, std^2) as float64 (all zeros for ``std == 0``)."""
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        if std == 0 or n == 0:
            return torch.zeros(n, dtype=torch.float64)
        if self.seed is None:
            z = torch.from_numpy(secure_normals(n))
        else:
            words = [int(self.seed) & 0xFFFFFFFF, *(int(s) for s in stream)]
            key = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(key))
            z = torch.randn(n, generator=generator, dtype=torch.float64)
        return z * float(std)

    def normal(self, std: float, stream: Sequence[int]) -> float:
        """One draw of N(0, std^2)."""
        return float(self.normals(1, std, stream)[0])
