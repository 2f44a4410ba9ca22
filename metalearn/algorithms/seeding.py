"""Randomness drawn from a task's own content, so that a task is treated identically wherever
it is processed.

A federated round must equal the centralized step over the same tasks, and ``/v1/adapt`` must
make the same adapted model as an offline ``adapt`` of the same support set; an algorithm whose
adaptation draws noise (a hallucinator) or an order (a memory network's support sequence) from
the global generator would break both. Seeding a private generator with a checksum of the
support set's bytes keeps the draws independent across tasks and reproducible for one task.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def task_generator(support_x: Tensor, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded by a CRC-32 of ``support_x``'s bytes, mixed with ``salt``."""
    data = support_x.detach().contiguous().cpu().numpy().tobytes()
    return torch.Generator().manual_seed(zlib.crc32(data) ^ (int(salt) & 0xFFFFFFFF))
