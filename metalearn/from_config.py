"""Build models, algorithms and task samplers from plain dicts (a resolved config's sections).

The training driver, the edge actors and the serving replicas all go through these functions,
so that a model is rebuilt identically wherever it is used: from a run folder's ``config.yaml``
a replica reconstructs exactly the architecture and adaptation rule that training used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from metalearn.algorithms import build_algorithm, embedding_only
from metalearn.algorithms.base import MetaAlgorithm, TaskType
from metalearn.data.registry import get_source
from metalearn.data.source import TaskSampler
from metalearn.models import build_model


def task_type(data: Mapping[str, Any]) -> TaskType:
    return get_source(data).task_type


def input_shape(data: Mapping[str, Any]) -> tuple[int, ...]:
    """One input's shape, from the data set (``(channels, height, width)`` for images)."""
    return get_source(data).input_shape(data)


def model_from_config(data: Mapping[str, Any], model: Mapping[str, Any],
                      algorithm: Mapping[str, Any]) -> nn.Module:
    """The network of ``model``, in the shape ``algorithm`` needs (see ``ModelConfig``)."""
    name = algorithm["name"]
    if model["name"] == "sinusoid_mlp":
        if name == "cavia":
            return build_model("cavia_mlp", hidden=model.get("hidden", 40),
                               context=model.get("context") or 4)
        return build_model("sinusoid_mlp", hidden=model.get("hidden", 40))
    channels, *size = input_shape(data)
    conv = {"channels": model.get("channels", 64), "pooling": model.get("pooling", "stride"),
            "in_channels": channels, "image_size": tuple(size)}
    if name == "matching":
        return build_model("matching_net", fce=model.get("fce", False),
                           fce_steps=model.get("fce_steps", 5), **conv)
    if name == "siamese":
        return build_model("siamese_net", hidden=model.get("twin_units", 128), **conv)
    if name == "hallucination":
        return build_model("hallucinator_net", noise_dim=model.get("noise_dim", 16),
                           hidden=model.get("generator_units", 128), **conv)
    if name == "versa":
        return build_model("versa_net", hidden=model.get("amortizer_units", 128), **conv)
    if name == "mann":
        return build_model("mann_net", ways=int(data["ways"]),
                           controller=model.get("controller_units", 200),
                           slots=model.get("memory_slots", 128),
                           width=model.get("memory_width", 40), **conv)
    if name == "cavia":
        return build_model("cavia_conv", ways=int(data["ways"]),
                           context=model.get("context") or 100, **conv)
    ways = 0 if embedding_only(name) else int(data["ways"])
    return build_model("omniglot_conv", ways=ways, **conv)


def algorithm_from_config(config: Mapping[str, Any]) -> MetaAlgorithm:
    """A ready algorithm (holding its model) from a config dict with data/model/algorithm."""
    data, alg = config["data"], config["algorithm"]
    model = model_from_config(data, config["model"], alg)
    return build_algorithm(alg["name"], model, task_type(data), inner_lr=alg["inner_lr"],
                           inner_steps=alg["inner_steps"], test_steps=alg.get("test_steps"),
                           **dict(alg.get("options") or {}))


def sampler_from_config(data: Mapping[str, Any], split: str = "train", seed: int = 0,
                        characters: np.ndarray | None = None,
                        amplitude: tuple[float, float] | None = None) -> TaskSampler:
    """A task sampler with ``.sample(batch) -> TaskBatch``, from the data set that
    ``data.dataset`` names (:mod:`metalearn.data.registry`).

    ``split`` is ``train`` or ``test`` (meta-training or meta-test classes: Omniglot's standard
    1200 / 423 characters, an image folder's ``data.split``). ``characters`` restricts a class
    source to a subset of classes (a site's partition); ``amplitude`` does the same for a
    site's sinusoid range.
    """
    part = characters if characters is not None else amplitude
    return get_source(data).sampler(data, split, seed=seed, part=part)  # type: ignore[arg-type]
