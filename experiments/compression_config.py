"""The ``federated.compression`` section: how sites compress their updates on the wire, one
model per codec, told apart by ``codec`` (the maths is :mod:`metalearn.compression`).

What cannot compose with it (secure aggregation's ring encoding, distributed DP noise) is
checked where the whole federated section is known (:func:`experiments.config.check_compression`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field

from experiments.section import Section

CODECS = ("fp16", "int8", "topk")


def _known_codec(value: Any) -> Any:
    """Say which codecs exist when ``codec`` is missing or names none."""
    if isinstance(value, dict) and value.get("codec") not in CODECS:
        raise ValueError(f"compression codec {value.get('codec')!r} is not one of "
                         f"{', '.join(CODECS)}")
    return value


class Fp16Codec(Section):
    """Half precision: 2 bytes a value, relative error at most 2^-11."""

    codec: Literal["fp16"]


class Int8Codec(Section):
    """8-bit codes, stochastic rounding (unbiased), one float32 scale per tensor or block."""

    codec: Literal["int8"]
    block: int = Field(0, ge=0, description="coordinates per scale; 0: one scale per tensor "
                                            "of the model")


class TopkCodec(Section):
    """The largest-magnitude share of coordinates with their indices (8 bytes each)."""

    codec: Literal["topk"]
    fraction: float = Field(0.01, gt=0, le=1, description="share of coordinates sent")
    error_feedback: bool = Field(True, description="keep what was left out at the site and "
                                                   "add it to the next update")


CompressionConfig = Annotated[
    Union[Fp16Codec, Int8Codec, TopkCodec],  # noqa: UP007
    Field(discriminator="codec"),
    BeforeValidator(_known_codec),
]
