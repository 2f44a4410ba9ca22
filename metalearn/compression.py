"""Compressed updates, in pure torch: what a site sends instead of a float32 vector.

One idea per function, each with its exact decoder:

* :func:`encode_fp16` / :func:`decode_fp16` — half precision: 2 bytes a value, relative error
  at most 2^-11 for normal values (round to nearest), absolute error at most 2^-25 below
  2^-14 (subnormals). A value beyond fp16's range (65504) is refused, not saturated: such an
  update is broken, and a silent clamp would hide it.
* :func:`encode_int8` / :func:`decode_int8` — 8-bit codes with one float32 scale per segment
  (``max |x| / 127`` over the segment; the segments are the model's tensors, or blocks of a
  fixed size) and **stochastic rounding**: ``q = floor(x / s + u)``, ``u ~ U[0, 1)``, so
  ``E[q s] = x`` exactly: the rounding error averages out over sites and rounds instead of
  biasing every coordinate toward zero.
* :func:`encode_topk` / :func:`decode_topk` — the ``k`` coordinates of largest magnitude and
  their indices; the rest are sent as zero.
* :class:`ErrorFeedback` — what top-k (or any biased codec) left out is kept at the site and
  added to the next update before it is compressed (Stich et al., 2018; Karimireddy et al.,
  2019), so nothing is lost for good, only delayed.

The encoded form (:class:`Encoded`) holds numpy arrays, as every vector on the wire does
(:mod:`actors.contract`), and says which codec made it, so the cloud decodes without knowing
the site's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

CodecName = Literal["fp16", "int8", "topk"]
FP16_MAX = 65504.0
INT8_LEVELS = 127  # symmetric codes -127..127: zero is exact, and so is max |x|


@dataclass(frozen=True)
class Encoded:
    """A compressed flat update as it crosses the wire.

    ``values``: fp16 values (fp16), int8 codes (int8) or the kept values (topk, float32).
    ``scales`` and ``segments``: int8's scale and length of each segment (empty otherwise).
    ``indices``: topk's kept coordinates (int32, ascending; empty otherwise).
    """

    codec: CodecName
    dim: int
    values: np.ndarray
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    segments: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def nbytes(self) -> int:
        """The payload in bytes: everything the decoder reads."""
        return int(self.values.nbytes + self.scales.nbytes + self.segments.nbytes
                   + self.indices.nbytes)


def _tensor(a: np.ndarray, dtype: type) -> Tensor:
    """A torch copy of a wire array (those Ray hands over are read-only)."""
    return torch.from_numpy(np.array(a, dtype=dtype, copy=True))


def _flat(x: Tensor) -> Tensor:
    return x.detach().reshape(-1).to(torch.float32)


# --------------------------------------------------------------------------- fp16

def encode_fp16(x: Tensor) -> Encoded:
    """``x`` rounded to half precision (round to nearest even)."""
    v = _flat(x)
    peak = float(v.abs().max()) if v.numel() else 0.0
    if not peak <= FP16_MAX:  # also catches nan
        raise ValueError(f"fp16 cannot hold an update with |value| {peak:g} (max {FP16_MAX:g})")
    return Encoded("fp16", v.numel(), v.to(torch.float16).numpy())


def decode_fp16(e: Encoded) -> Tensor:
    return _tensor(e.values, np.float16).to(torch.float32)


# --------------------------------------------------------------------------- int8

def block_segments(dim: int, block: int) -> list[int]:
    """Lengths of consecutive blocks of ``block`` coordinates covering ``dim`` (the last one
    shorter): int8's per-block scale."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [block] * (dim // block) + ([dim % block] if dim % block else [])


def encode_int8(x: Tensor, segments: Sequence[int], generator: torch.Generator) -> Encoded:
    """8-bit codes with one scale per segment and stochastic rounding (unbiased).

    ``segments``: lengths summing to ``x``'s size (the model's tensor sizes for a scale per
    tensor, :func:`block_segments` for a scale per block). ``generator`` draws the rounding.
    """
    v = _flat(x)
    sizes = [int(s) for s in segments]
    if sum(sizes) != v.numel() or any(s < 1 for s in sizes):
        raise ValueError(f"segments {sizes[:4]}... do not cover {v.numel()} values")
    lengths = torch.tensor(sizes)
    peaks = torch.stack([p.abs().max() for p in v.split(sizes)])
    scales = torch.where(peaks > 0, peaks / INT8_LEVELS, torch.ones_like(peaks))
    scaled = v / scales.repeat_interleave(lengths)
    noise = torch.rand(v.numel(), generator=generator, dtype=torch.float32)
    codes = torch.floor(scaled + noise).clamp_(-INT8_LEVELS, INT8_LEVELS)
    return Encoded("int8", v.numel(), codes.to(torch.int8).numpy(),
                   scales=scales.numpy().astype(np.float32),
                   segments=np.asarray(sizes, dtype=np.int32))


def decode_int8(e: Encoded) -> Tensor:
    codes = _tensor(e.values, np.int8).to(torch.float32)
    lengths = _tensor(e.segments, np.int64)
    return codes * _tensor(e.scales, np.float32).repeat_interleave(lengths)


# --------------------------------------------------------------------------- top-k

def topk_count(dim: int, fraction: float) -> int:
    """How many coordinates top-k keeps of ``dim``: ``ceil(fraction * dim)``, at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    return max(1, min(dim, int(np.ceil(fraction * dim))))


def encode_topk(x: Tensor, k: int) -> Encoded:
    """The ``k`` largest-magnitude coordinates of ``x`` (ties: the lower index), ascending."""
    v = _flat(x)
    if not 1 <= k <= v.numel():
        raise ValueError(f"top-k needs 1 <= k <= {v.numel()}, got {k}")
    kept = torch.topk(v.abs(), k, sorted=False).indices.sort().values
    return Encoded("topk", v.numel(), v[kept].numpy().copy(),
                   indices=kept.to(torch.int32).numpy())


def decode_topk(e: Encoded) -> Tensor:
    out = torch.zeros(e.dim, dtype=torch.float32)
    idx = _tensor(e.indices, np.int64)
    out[idx] = _tensor(e.values, np.float32)
    return out


# --------------------------------------------------------------------------- any codec

def decode(e: Encoded) -> Tensor:
    """The float32 vector ``e`` stands for, whichever codec made it."""
    decoders = {"fp16": decode_fp16, "int8": decode_int8, "topk": decode_topk}
    if e.codec not in decoders:
        raise ValueError(f"unknown codec {e.codec!r}; known: {', '.join(decoders)}")
    out = decoders[e.codec](e)
    if out.numel() != e.dim:
        raise ValueError(f"a {e.codec} update decoded to {out.numel()} values, not {e.dim}")
    return out


class ErrorFeedback:
    """The part of past updates a biased codec left out, kept where the update is made.

    :meth:`compress` sends ``encode(u + e)`` and keeps ``e <- (u + e) - decode(sent)``: the sum
    of everything sent plus the residual always equals the sum of the updates, exactly up to
    float rounding. The residual is the site's own state (it never crosses the wire);
    :meth:`state` / :meth:`load` let a resumed run restore it.
    """

    def __init__(self) -> None:
        self.residual: Tensor | None = None

    def compress(self, update: Tensor, encode: Callable[[Tensor], Encoded]) -> Encoded:
        v = _flat(update)
        if self.residual is not None:
            if self.residual.numel() != v.numel():
                raise ValueError(f"error feedback holds {self.residual.numel()} values, the "
                                 f"update has {v.numel()}")
            v = v + self.residual
        sent = encode(v)
        self.residual = v - decode(sent)
        return sent

    def state(self) -> Tensor | None:
        """The residual (a tensor: what a checkpoint may hold), or None before any update."""
        return None if self.residual is None else self.residual.clone()

    def load(self, state: Tensor | None) -> None:
        self.residual = None if state is None else state.detach().to(torch.float32).clone()
