"""What a run's model takes and gives: request inputs to tensors, tensors to answers.

The request schema (:mod:`serve.schemas`) can only check that inputs are finite numbers; their
shape depends on the model asked (the data set's ``(channels, height, width)`` images, such as
Omniglot's 1×28×28 or an image folder's 3×64×64, or sinusoid scalars), so it is checked here,
against the run's config, and so are packed inputs (``*_b64``: base64 float32), which are
decoded here. Both spellings end in the same tensor and the same checks (count limit, finite
values). Everything here is cheap and model-free, so the ingress does it before any model
replica is involved.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalearn.algorithms import embedding_only
from metalearn.algorithms.base import TaskType
from metalearn.data.registry import get_source
from serve.errors import BadInput, TooLarge


def _finite(x: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise BadInput(f"{what}: values must be finite float32 numbers (NaN, infinity or "
                       f"beyond float32's range found)")
    return x


def describe_shape(shape: tuple[int, ...]) -> str:
    """How an error message and the API document name one input of ``shape``."""
    if len(shape) == 1:
        return "one number" if shape[0] == 1 else f"{shape[0]} numbers"
    channels, height, width = shape
    image = f"{height}x{width} image"
    if channels == 1:
        return f"a {image} ({height} rows of {width} numbers, or 1 channel of them)"
    return f"a {channels}-channel {image} ({channels} channels of {height} rows of {width} numbers)"


@dataclass(frozen=True)
class ModelSignature:
    """The inputs a run's models take and the outputs they give, read from its ``config.yaml``.

    ``input_shape`` is one input's shape, from the data set (``(channels, height, width)``
    for images, ``(1,)`` for sinusoid x values); ``ways`` is the number of classes the model's
    head outputs, ``None`` for an embedding (ProtoNet, Matching Networks, Siamese), whose
    classes are those of the support set.
    """

    task_type: TaskType
    dataset: str
    algorithm: str
    ways: int | None
    input_shape: tuple[int, ...] = (1, 28, 28)
    max_ways: int = 64

    @staticmethod
    def from_config(config: dict[str, Any]) -> ModelSignature:
        data, alg = config["data"], config["algorithm"]
        source = get_source(data)
        regression = source.task_type == "regression"
        ways = None if regression or embedding_only(alg["name"]) else int(data["ways"])
        return ModelSignature(source.task_type, data["dataset"], alg["name"], ways,
                              tuple(source.input_shape(data)))

    @property
    def per_input(self) -> int:
        """Numbers in one input."""
        return int(np.prod(self.input_shape))

    def read(self, raw: Sequence[Any] | None, packed: str | None, limit: int,
             what: str = "inputs") -> Tensor:
        """The batch of a request, from JSON numbers (``raw``) or packed float32 (``packed``)."""
        if packed is not None:
            return self.unpack(packed, limit, what)
        assert raw is not None, "the request schema requires one of the two"
        return self.inputs(raw, limit, what)

    def unpack(self, packed: str, limit: int, what: str = "inputs") -> Tensor:
        """``*_b64`` inputs: base64 of little-endian float32, row-major, whole inputs only."""
        try:
            data = base64.b64decode(packed, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadInput(f"{what}_b64: not valid base64 ({err})") from None
        per = self.per_input
        if len(data) % (4 * per):
            dims = self.input_shape[1:] if self.input_shape[0] == 1 else self.input_shape
            values = "x".join(str(d) for d in dims) + " values" if dims else "one value"
            raise BadInput(f"{what}_b64: {len(data)} bytes are not whole inputs of {values} "
                           f"({4 * per} bytes each, little-endian float32)")
        n = len(data) // (4 * per)
        if n > limit:
            raise TooLarge(f"{what}_b64: {n} inputs exceed this server's limit of {limit}")
        values = np.frombuffer(data, dtype="<f4").astype(np.float32)  # own, writable, native
        return _finite(torch.from_numpy(values.reshape(n, *self.input_shape)), what)

    def inputs(self, raw: Sequence[Any], limit: int, what: str = "inputs") -> Tensor:
        """A float32 batch in the layout training used: ``[N, C, H, W]`` or ``[N, 1]``.

        A one-channel image may leave out its channel axis (``H`` rows of ``W`` numbers), and
        a scalar input may be a bare number."""
        if len(raw) > limit:
            raise TooLarge(f"{what}: {len(raw)} inputs exceed this server's limit of {limit}")
        if not raw:
            raise BadInput(f"{what}: at least one input is needed")
        try:  # numpy reads nested lists ~2.5x faster than torch.tensor (13 vs 34 µs an image)
            with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                x = torch.from_numpy(np.array(raw, dtype=np.float32))
        except (ValueError, TypeError) as err:
            raise BadInput(f"{what}: inputs must all have the same shape ({err})") from None
        shape = self.input_shape
        if shape[0] == 1 and tuple(x.shape[1:]) == shape[1:]:
            x = x.unsqueeze(1)  # no channel axis (images), or bare numbers (scalars)
        if tuple(x.shape[1:]) != shape:
            raise BadInput(f"{what}: each input must be {describe_shape(shape)}; got shape "
                           f"{list(x.shape[1:])} per input")
        return _finite(x, what)

    def targets(self, raw: Sequence[Any], n: int) -> Tensor:
        """Support labels (int64, classification) or targets (``[N, 1]`` float32)."""
        if len(raw) != n:
            raise BadInput(f"support_labels has {len(raw)} entries but there are {n} inputs")
        if self.task_type == "regression":
            y = torch.tensor([float(v) for v in raw], dtype=torch.float32).unsqueeze(-1)
            if not bool(torch.isfinite(y).all()):
                raise BadInput("support_labels: targets must be finite float32 numbers")
            return y
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise BadInput("support_labels: a classification model needs integer class labels")
        classes = sorted(set(raw))
        ways = self.ways if self.ways is not None else self.max_ways
        if len(classes) > ways:
            raise BadInput(f"support_labels: the support set has {len(classes)} classes but "
                           f"the model has {ways} outputs")
        if classes[0] < 0 or classes[-1] >= ways:
            bad = classes[0] if classes[0] < 0 else classes[-1]
            raise BadInput(f"support_labels: label {bad} is out of range for a {ways}-way "
                           f"model (labels are 0..{ways - 1})")
        if self.ways is None and classes != list(range(len(classes))):
            raise BadInput(f"support_labels: labels must be 0..k-1 with every class present; "
                           f"got classes {classes}")
        return torch.tensor(raw, dtype=torch.int64)


def outputs_to_prediction(task_type: TaskType, out: Tensor) -> dict[str, Any]:
    """Logits to probabilities + labels, or regression outputs to a list of values."""
    if task_type == "classification":
        probs = torch.softmax(out.float(), dim=-1)
        return {"task_type": task_type, "labels": probs.argmax(-1).tolist(),
                "probabilities": probs.tolist()}
    return {"task_type": task_type, "values": out.reshape(out.shape[0], -1)[:, 0].tolist()}
