"""Running requests: alone, or grouped into as few forward passes as leave every answer unchanged.

Which requests share a pass (the same model; for batch-statistics models also the same input
shape: see ``LoadedModel.batch_independent``), how large a pass may grow (``batch_max_images``,
:func:`passes`), and the grouped forward itself (:func:`predict_many`).
No Ray here: a model replica's ``@serve.batch`` hands its batch to :func:`predict_many`, and the
benchmarks call the same functions offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from serve.store import LoadedModel


@torch.no_grad()
def predict_one(model: LoadedModel, x: Tensor) -> Tensor:
    """Raw outputs of one request, exactly as ``algorithm.predict`` gives them offline."""
    return model.algorithm.predict(model.params, x)


def passes(sizes: Sequence[int], max_images: int) -> list[slice]:
    """Consecutive runs of requests, each run holding at most ``max_images`` inputs (a
    request larger than that runs alone): the sizes of the forward passes ``predict_many``
    makes.

    Why a cap: one pass over many small requests beats a pass each, but past a few dozen
    inputs a pass gets slower per input (the activations outgrow the cache, we think). With
    the 64-filter Omniglot net on this CPU (``benchmarks/bench_group_forward.py --images N``),
    32 one-image requests took 4-6 ms in one pass against 20 ms one by one; 32 eight-image
    requests took 36 ms in one pass, 42 ms one by one, and 29 ms in passes of at most 32
    images (16 requests: 35, 22 and 17 ms).
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, not {max_images}")
    out: list[slice] = []
    start, images = 0, 0
    for i, n in enumerate(sizes):
        if i > start and images + n > max_images:
            out.append(slice(start, i))
            start, images = i, 0
        images += n
    if sizes:
        out.append(slice(start, len(sizes)))
    return out


@torch.no_grad()
def predict_many(items: Sequence[tuple[LoadedModel, Tensor]],
                 max_images: int = 32) -> list[Tensor]:
    """Outputs for many requests, with as few forward passes as leave every answer unchanged.

    * Batch-independent models (no BatchNorm): one forward over the concatenated inputs.
    * Batch-statistics models (MAML's nets): requests with the same input shape are stacked
      and run through ``algorithm.predict_groups``, which keeps one set of BatchNorm
      statistics per request while the convolutions run as one large call
      (:mod:`metalearn.folded`; ``vmap`` for other architectures). If that fails,
      requests run one by one.

    A pass holds at most ``max_images`` inputs (see :func:`passes`). Either way a batched
    answer equals the unbatched one (to float rounding, ~1e-6).
    """
    results: list[Tensor | None] = [None] * len(items)
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, (model, x) in enumerate(items):
        shape = () if model.batch_independent else tuple(x.shape)
        groups.setdefault((model.id, shape), []).append(i)
    for same in groups.values():
        model = items[same[0]][0]
        for run in passes([int(items[i][1].shape[0]) for i in same], max_images):
            idx = same[run]
            for i, out in zip(idx, _one_pass(model, [items[i][1] for i in idx]), strict=True):
                results[i] = out
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _one_pass(model: LoadedModel, xs: list[Tensor]) -> Sequence[Tensor]:
    """Outputs of one model for requests ``xs`` (same shape unless batch-independent)."""
    if len(xs) > 1 and model.batch_independent:
        return model.algorithm.predict(model.params, torch.cat(xs)).split(
            [x.shape[0] for x in xs])
    if len(xs) > 1 and model.groupable:
        try:
            return model.algorithm.predict_groups(model.params, torch.stack(xs)).unbind(0)
        except Exception:  # cannot be grouped (data-dependent control flow, ...): loop
            model.groupable = False
    return [model.algorithm.predict(model.params, x) for x in xs]
