"""Matching Networks, Siamese networks, CAVIA, support hallucination, MANN and VERSA served
over real HTTP.

Tiny real runs of each are trained here and served by one Ray Serve instance. ``/v1/adapt``
makes each algorithm's own adapted state (support embeddings and labels, twin features, an
adapted context, prototypes with the generated embeddings, a filled memory, a classifier's
posterior and its draws) on the replica;
its predictions, and later ones by the id it returns, must equal the same adaptation done
offline with the run's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cluster.ports import free_port
from experiments.config import parse_config
from experiments.train import train
from metalearn.algorithms.mann import STATE as MANN_STATE
from metalearn.checkpoint import load_checkpoint
from metalearn.from_config import algorithm_from_config
from serve.client import EdgeMetaClient

pytestmark = pytest.mark.slow

OMNIGLOT = {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2}
RUNS: dict[str, dict[str, Any]] = {
    "matching": {"data": OMNIGLOT, "algorithm": {"name": "matching", "inner_steps": 0},
                 "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                           "fce": True, "fce_steps": 2}},
    "siamese": {"data": OMNIGLOT, "algorithm": {"name": "siamese", "inner_steps": 0},
                "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                          "twin_units": 8}},
    "cavia-omni": {"data": OMNIGLOT,
                   "algorithm": {"name": "cavia", "inner_lr": 1.0, "inner_steps": 1},
                   "model": {"name": "omniglot_conv", "channels": 4, "context": 3}},
    "cavia-sine": {"data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
                   "algorithm": {"name": "cavia", "inner_lr": 1.0, "inner_steps": 1},
                   "model": {"name": "sinusoid_mlp", "hidden": 8, "context": 2},
                   "eval": {"episodes": 3, "batch": 3, "steps_list": [0, 1]}},
    "hallucination": {"data": OMNIGLOT, "algorithm": {"name": "hallucination", "inner_steps": 0},
                      "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                                "noise_dim": 3, "generator_units": 8}},
    "mann": {"data": OMNIGLOT, "algorithm": {"name": "mann", "inner_steps": 0},
             "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                       "controller_units": 6, "memory_slots": 5, "memory_width": 3}},
    "versa": {"data": OMNIGLOT, "algorithm": {"name": "versa", "inner_steps": 0,
                                              "options": {"samples": 3}},
              "model": {"name": "omniglot_conv", "channels": 4, "pooling": "max",
                        "amortizer_units": 5}},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from serve.launch import start

    out = tmp_path_factory.mktemp("runs")
    for name, spec in RUNS.items():
        train(parse_config({"name": name, "output_dir": str(out), "seed": 0,
                            "train": {"steps": 2, "meta_batch": 2, "checkpoint_every": 1},
                            "eval": {"episodes": 3, "batch": 3}, **spec}), echo=lambda _: None)
    # Serve's own proxy: what is tested here is the algorithms' adapted states, and this
    # ingress starts reliably on a loaded machine (HAProxy's readiness check can time out).
    handle = start({"run_dirs": [str(out / n) for n in RUNS]}, port=free_port("127.0.0.1"),
                   ingress="proxy", num_cpus=2)
    try:
        yield handle.url, out
    finally:
        handle.stop()


def inputs(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "cavia-sine":
        return torch.rand(n, 1, generator=g) * 10 - 5
    return torch.rand(n, 1, 28, 28, generator=g)


@pytest.mark.parametrize("name", list(RUNS))
def test_adapt_over_http_equals_offline_adaptation(served: tuple[str, Path], name: str) -> None:
    url, out = served
    sine = name == "cavia-sine"
    sx, qx = inputs(name, 6, 1), inputs(name, 4, 2)
    sy = torch.sin(sx) if sine else torch.tensor([0, 1, 2, 0, 1, 2])  # sine: [N, 1] targets
    algorithm = algorithm_from_config(yaml.safe_load((out / name / "config.yaml").read_text()))
    params = load_checkpoint(out / name, 2)["params"]
    adapted = algorithm.adapt(params, sx, sy)
    with torch.no_grad():
        offline = algorithm.predict(adapted, qx)
    wire_x, wire_q = sx[:, 0], qx[:, 0]  # the wire takes [N] numbers or [N, 28, 28] images
    labels = sy.flatten().tolist()
    with EdgeMetaClient(url) as client:
        made = client.adapt(wire_x, labels, base_model=f"{name}@2", query_inputs=wire_q)
        assert made["created"] and made["model_id"].startswith(f"{name}@ad-")
        later = client.predict(made["model_id"], wire_q)
        if sine:
            got = torch.tensor(made["predictions"]["values"])
            torch.testing.assert_close(got, offline[:, 0], atol=1e-5, rtol=0)
            assert later["values"] == made["predictions"]["values"]
        else:
            got = torch.tensor(made["predictions"]["probabilities"])
            torch.testing.assert_close(got, torch.softmax(offline, -1), atol=1e-5, rtol=0)
            assert later["probabilities"] == made["predictions"]["probabilities"]
        stored = torch.load(out / name / "adapted" / f"{made['model_id'].split('@')[1]}.pt",
                            weights_only=True)["params"]
        extra = set(stored) - set(params)
        changed = {k for k in params if not torch.equal(stored[k], params[k])}
        if name.startswith("cavia"):  # only the context adapted, from zero
            assert extra == set() and changed == {"context"}
        elif name == "hallucination":  # prototypes over real and generated embeddings
            assert extra == {"prototypes", "generated_embeddings", "generated_labels"}
            assert stored["generated_embeddings"].shape == (6 * 2, 4) and changed == set()
        elif name == "mann":  # the memory and controller state after the support sequence
            assert extra == set(MANN_STATE) and changed == set()
            assert float((stored["memory"] - 1e-6).abs().max()) > 1e-4
        elif name == "versa":  # the classifier's Gaussian per class and its draws
            assert extra == {"weight_mean", "weight_logvar", "bias_mean", "bias_logvar",
                             "weight_samples", "bias_samples"} and changed == set()
            assert stored["weight_samples"].shape == (3, 3, 4)
        else:  # metric learners: the support set's embeddings and labels, weights unchanged
            assert len(extra) == 2 and changed == set()
        if name in ("matching", "siamese", "hallucination", "versa"):  # no classes of its own
            with pytest.raises(Exception, match="embedding with no classes"):
                client.predict(f"{name}@2", wire_q)
        if name == "mann":  # a meta-model is a MANN with an empty memory: it predicts
            empty = algorithm.predict(params, qx)
            got = torch.tensor(client.predict(f"{name}@2", wire_q)["probabilities"])
            torch.testing.assert_close(got, torch.softmax(empty, -1), atol=1e-5, rtol=0)
