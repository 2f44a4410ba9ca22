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
from metalearn.models import build_model


def task_type(data: Mapping[str, Any]) -> TaskType:
    return "regression" if data["dataset"] == "sinusoid" else "classification"


def model_from_config(data: Mapping[str, Any], model: Mapping[str, Any],
                    algorithm: Mapping[str, Any]) -> nn.Module:
    """The network of ``model``, in the shape ``algorithm`` needs (see ``ModelConfig``)."""
    name = algorithm["name"]
    if model["name"] == "sinusoid_mlp":
        if name == "cavia":
            return build_model("cavia_mlp", hidden=model.get("hidden", 40),
                               context=model.get("context") or 4)
        return build_model("sinusoid_mlp", hidden=model.get("hidden", 40))
    conv = {"channels": model.get("channels", 64), "pooling": model.get("pooling", "stride")}
    if name == "matching":
        return build_model("matching_net", fce=model.get("fce", False),
                           fce_steps=model.get("fce_steps", 5), **conv)
    if name == "siamese":
        return build_model("siamese_net", hidden=model.get("twin_units", 128), **conv)
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
                      amplitude: tuple[float, float] | None = None) -> Any:
    """A task sampler with ``.sample(batch) -> TaskBatch``.

    ``split`` is ``train`` or ``test`` (the standard 1200 / 423 Omniglot characters).
    ``characters`` restricts Omniglot to a subset (a site's partition); ``amplitude`` does the
    same for a site's sinusoid range.
    """
    if data["dataset"] == "sinusoid":
        from metalearn.data.sinusoid import SinusoidTasks

        return SinusoidTasks(amplitude=tuple(amplitude or data["amplitude"]),
                             phase=tuple(data["phase"]), x_range=tuple(data["x_range"]),
                             shots=data["shots"], queries=data["queries"], seed=seed)
    from metalearn.data.episodes import OmniglotEpisodes
    from metalearn.data.omniglot import load_omniglot, standard_split

    omni = load_omniglot(data.get("path"))
    if characters is None:
        train, test = standard_split(omni)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        characters = train if split == "train" else test
    return OmniglotEpisodes(omni, characters, ways=data["ways"], shots=data["shots"],
                            queries=data["queries"], rotations=data.get("rotations", True),
                            seed=seed)
