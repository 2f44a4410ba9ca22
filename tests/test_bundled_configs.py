"""Every bundled config validates and builds its algorithm; every algorithm has one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.config import CONFIG_DIR, ConfigError, load_config, parse_config
from metalearn.algorithms import ALGORITHMS
from metalearn.from_config import algorithm_from_config

PATHS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_bundled_config_validates_and_builds(path: Path) -> None:
    cfg = load_config(path)
    spec = cfg.to_dict()
    spec["model"]["channels"] = 2  # the same wiring, built in milliseconds
    algorithm = algorithm_from_config(spec)
    assert algorithm.name == cfg.algorithm.name
    params = algorithm.init_params()
    assert params and all(torch.isfinite(v).all() for v in params.values())


def test_every_algorithm_has_a_bundled_config() -> None:
    covered = {load_config(p).algorithm.name for p in PATHS}
    assert covered == set(ALGORITHMS)


@pytest.mark.parametrize(("raw", "message"), [
    ({"algorithm": {"name": "matching"}, "data": {"dataset": "sinusoid"},
      "model": {"name": "sinusoid_mlp"}}, "matching is a classifier"),
    ({"algorithm": {"name": "siamese"}, "data": {"dataset": "sinusoid"},
      "model": {"name": "sinusoid_mlp"}}, "siamese is a classifier"),
    ({"algorithm": {"name": "maml"}, "model": {"fce": True}},
     "model.fce is a setting of algorithm 'matching', not of 'maml'"),
    ({"algorithm": {"name": "matching"}, "model": {"context": 4}},
     "model.context is a setting of algorithm 'cavia'"),
    ({"algorithm": {"name": "cavia"}, "model": {"context": 0}}, "model.context"),
    ({"algorithm": {"name": "mann"}, "data": {"dataset": "sinusoid"},
      "model": {"name": "sinusoid_mlp"}}, "mann is a classifier"),
    ({"algorithm": {"name": "mann"}, "data": {"ways": 5}, "eval": {"ways": 20}},
     "eval.ways 20 is more than MANN's data.ways 5"),
    ({"algorithm": {"name": "protonet"}, "model": {"noise_dim": 4}},
     "model.noise_dim is a setting of algorithm 'hallucination'"),
    ({"algorithm": {"name": "hallucination"}, "model": {"memory_slots": 4}},
     "model.memory_slots is a setting of algorithm 'mann'"),
    ({"algorithm": {"name": "versa"}, "data": {"dataset": "sinusoid"},
      "model": {"name": "sinusoid_mlp"}}, "versa is a classifier"),
    ({"algorithm": {"name": "mann"}, "model": {"amortizer_units": 4}},
     "model.amortizer_units is a setting of algorithm 'versa'"),
])
def test_model_settings_of_other_algorithms_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
