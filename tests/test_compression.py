"""The codecs of compressed updates (metalearn.compression): bounds, unbiasedness, feedback."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.compression import (
    ErrorFeedback,
    block_segments,
    decode,
    encode_fp16,
    encode_int8,
    encode_topk,
    topk_count,
)


def test_fp16_round_trip_is_within_half_an_ulp() -> None:
    g = torch.Generator().manual_seed(0)
    # magnitudes from 1e-9 (subnormal in fp16) to 6e4 (near its maximum), both signs
    x = (torch.rand(20_000, generator=g) * 2 - 1) * torch.logspace(-9, 4.8, 20_000)
    enc = encode_fp16(x)
    y = decode(enc)
    assert enc.codec == "fp16" and enc.nbytes == 2 * x.numel()
    err = (y - x).abs()
    normal = x.abs() >= 2.0 ** -14
    assert (err[normal] <= x[normal].abs() * 2.0 ** -11).all()  # round to nearest: 1/2 ulp
    assert (err[~normal] <= 2.0 ** -25).all()  # subnormal spacing 2^-24, half of it
    assert err[normal].max() > 0  # it is a lossy codec: the bound is not vacuous
    with pytest.raises(ValueError, match="fp16 cannot hold"):
        encode_fp16(torch.tensor([1.0, 7e4]))


def test_int8_stochastic_rounding_is_unbiased() -> None:
    """E[decode] = x: the mean of many independent roundings converges to x, where rounding
    to the nearest code would be off by the same fraction of a step every time."""
    n, reps = 64, 4000
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, generator=g) * 2 - 1
    x[0] = 1.0  # every copy has the same peak, so one scale: s = 1/127
    step = 1.0 / 127
    enc = encode_int8(x.repeat(reps), [n] * reps, torch.Generator().manual_seed(2))
    assert enc.nbytes == n * reps + 8 * reps  # int8 codes, a float32 scale + int32 length each
    draws = decode(enc).reshape(reps, n)
    assert ((draws - x).abs() < step + 1e-6).all()  # never more than one step off
    bias = draws.double().mean(0) - x.double()
    # each draw's error has std <= step / 2; five standard errors of the mean
    assert bias.abs().max() < 5 * step / (2 * math.sqrt(reps))
    nearest = torch.round(x / step) * step
    assert (nearest - x).abs().max() > 20 * bias.abs().max()  # deterministic rounding is biased


def test_int8_scales_per_tensor_or_per_block() -> None:
    x = torch.cat([torch.full((3,), 0.01), torch.full((5,), 100.0)])
    per_tensor = encode_int8(x, [3, 5], torch.Generator().manual_seed(0))
    assert per_tensor.scales.tolist() == pytest.approx([0.01 / 127, 100 / 127])
    assert torch.allclose(decode(per_tensor), x, rtol=1e-5)  # each tensor's peak is a code
    one_scale = encode_int8(x, [8], torch.Generator().manual_seed(0))
    assert (decode(one_scale)[:3] - x[:3]).abs().max() > 0.005  # small values drown
    assert block_segments(10, 4) == [4, 4, 2] and sum(block_segments(1761, 256)) == 1761
    with pytest.raises(ValueError, match="do not cover"):
        encode_int8(x, [3, 4], torch.Generator())


def test_topk_keeps_the_largest_and_error_feedback_loses_nothing() -> None:
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2])
    enc = encode_topk(x, 2)
    assert enc.indices.tolist() == [1, 3] and decode(enc).tolist() == [0, -5.0, 0, 2.0, 0]
    assert enc.nbytes == 16 and topk_count(1761, 0.01) == 18

    g = torch.Generator().manual_seed(3)
    updates = [torch.randn(50, generator=g) for _ in range(30)]
    feedback = ErrorFeedback()
    sent = [decode(feedback.compress(u, lambda v: encode_topk(v, 5))) for u in updates]
    assert feedback.residual is not None
    # everything sent plus what is still kept equals everything computed
    assert torch.allclose(sum(sent) + feedback.residual, sum(updates), atol=1e-4)
    # without feedback, the part left out is gone for good
    dropped = sum(updates) - sum(decode(encode_topk(u, 5)) for u in updates)
    assert dropped.norm() > 2 * feedback.residual.norm()

    restored = ErrorFeedback()
    restored.load(feedback.state())
    nxt = torch.randn(50, generator=g)
    assert torch.equal(decode(restored.compress(nxt, lambda v: encode_topk(v, 5))),
                       decode(feedback.compress(nxt, lambda v: encode_topk(v, 5))))
