"""The user's own image folder end to end: centralized training that learns, a federated run on
real Ray actors, and both runs served over real HTTP with their own input shapes.

One embedded Ray cluster for the module (two sites): the federated run uses it, then Serve
starts on it and serves the centralized run (RGB, 3×16×20, ProtoNet) and the federated run
(grey, 1×16×16, MAML) side by side.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import torch
import yaml
from helpers import embedded_cluster
from image_folders import make_image_folder

from experiments.config import parse_config
from experiments.federated import train_federated
from experiments.train import meta_test, train
from metalearn.checkpoint import load_checkpoint
from metalearn.data.image_folder import load_image_folder
from metalearn.from_config import algorithm_from_config

# 2 of the 30 classes are too small for a task: left out with a warning (tested elsewhere).
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::metalearn.data.class_episodes.SmallClassWarning")]

TEST_CLASSES = ["circle-blue", "square-yellow", "triangle-red", "diamond-green",
                "ring-magenta", "cross-yellow"]


def raw_config(root: Path, out: Path, name: str, **sections: Any) -> dict[str, Any]:
    return {"name": name, "output_dir": str(out), "seed": 0,
            "data": {"dataset": "image_folder", "root": str(root), "ways": 5, "shots": 1,
                     "queries": 5, "split": {"test_classes": TEST_CLASSES}},
            "model": {"name": "omniglot_conv", "channels": 16},
            "train": {"checkpoint_every": 5, "log_every": 5, "outer_lr": 0.003},
            "eval": {"episodes": 60, "batch": 30}, **sections}


class Runs:
    def __init__(self, root: Path, central: Path, federated: Path,
                 summaries: dict[str, dict[str, Any]], baseline: float) -> None:
        self.root, self.central, self.federated = root, central, federated
        self.summaries, self.baseline = summaries, baseline


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root, out = tmp_path_factory.mktemp("shapes"), tmp_path_factory.mktemp("runs")
    make_image_folder(root)
    central = parse_config(raw_config(
        root, out, "central",
        data={**raw_config(root, out, "x")["data"], "image_size": [16, 20], "channels": 3},
        model={"name": "omniglot_conv", "channels": 16, "pooling": "max"},
        algorithm={"name": "protonet", "inner_lr": 0.1},
        train={"steps": 10, "meta_batch": 8, "outer_lr": 0.003, "checkpoint_every": 5}))
    summaries = {"central": train(central, echo=lambda _: None)}
    torch.manual_seed(central.seed)  # the parameters training started from
    untrained = algorithm_from_config(central.to_dict())
    baseline = meta_test(central, untrained, untrained.init_params(), central.eval.episodes)
    fed = parse_config(raw_config(
        root, out, "fed",
        data={**raw_config(root, out, "x")["data"], "image_size": 16, "channels": 1,
              "queries": 3},
        model={"name": "omniglot_conv", "channels": 8},
        algorithm={"name": "maml", "inner_lr": 0.4, "options": {"strategy": "loop"}},
        train={"steps": 2, "meta_batch": 4, "checkpoint_every": 1, "log_every": 1},
        eval={"episodes": 10, "batch": 10},
        federated={"topology": {"sites": 2}, "personalize_episodes": 4}))
    with embedded_cluster(2):
        summaries["fed"] = train_federated(fed, echo=lambda _: None)
        yield Runs(root, central.run_dir, fed.run_dir, summaries, baseline["accuracy"])


def test_centralized_training_on_rgb_images_learns(runs: Runs) -> None:
    """10 ProtoNet steps on 3×16×20 images lift 5-way 1-shot meta-test accuracy on classes
    training never saw well above the untrained network (the same 60 episodes) and chance."""
    accuracy = runs.summaries["central"]["accuracy"]
    assert accuracy > runs.baseline + 0.1 and accuracy > 0.4, (accuracy, runs.baseline)
    config = yaml.safe_load((runs.central / "config.yaml").read_text())
    assert config["data"]["channels"] == 3 and config["data"]["image_size"] == [16, 20]
    params = load_checkpoint(runs.central)["params"]
    assert params["features.0.0.weight"].shape[1] == 3  # the first conv reads RGB


def test_federated_run_on_ray_actors_trains_on_whole_classes(runs: Runs) -> None:
    summary = runs.summaries["fed"]
    assert 0 <= summary["accuracy"] <= 1 and summary["train_steps"] == 2
    metrics = pd.read_parquet(runs.federated / "metrics.parquet")
    assert metrics["round"].tolist() == [1, 2] and (metrics["arrived"] == 2).all()
    sites = pd.read_parquet(runs.federated / "sites.parquet")
    assert set(sites["status"]) == {"ok"} and len(sites) == 4
    personal = summary["federated"]["personalization"]
    assert {row["site"] for row in personal} == {"site-0", "site-1"}
    assert all("error" not in row and 0 <= row["after_accuracy"] <= 1 for row in personal)
    params = load_checkpoint(runs.federated)["params"]
    assert params["features.0.0.weight"].shape[1] == 1 and params["head.weight"].shape[0] == 5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(runs: Runs) -> Iterator[str]:
    from serve.launch import start

    handle = start({"run_dirs": [str(runs.central), str(runs.federated)]}, port=_port())
    try:
        yield handle.url
    finally:
        handle.stop()


def _offline(run: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    algorithm = algorithm_from_config(yaml.safe_load((run / "config.yaml").read_text()))
    return algorithm, load_checkpoint(run)["params"]


def test_served_runs_name_their_input_shapes(served: str) -> None:
    with httpx.Client(base_url=served, timeout=60) as http:
        runs = {r["run"]: r for r in http.get("/v1/models").json()["runs"]}
        spec = http.get("/openapi.json").json()
    assert runs["central"]["input_shape"] == [3, 16, 20]
    assert runs["fed"]["input_shape"] == [1, 16, 16]
    assert spec["info"]["x-edgemeta-input-shapes"] == {"central": [3, 16, 20],
                                                       "fed": [1, 16, 16]}
    assert "`central`: inputs of shape [3, 16, 20] (channels, height, width)" in (
        spec["info"]["description"])


def test_predict_and_adapt_take_each_run_input_shape(runs: Runs, served: str) -> None:
    grey = load_image_folder(runs.root, 16, channels=1)
    rgb = load_image_folder(runs.root, (16, 20), channels=3)
    picks = [int(grey.offsets[grey.names.index(n)]) for n in TEST_CLASSES[:5]]
    gx = grey.pixels[picks].float() / 255  # [5, 1, 16, 16]
    sx = rgb.pixels[picks].float() / 255  # [5, 3, 16, 20]
    qx = rgb.pixels[[p + 1 for p in picks]].float() / 255
    with httpx.Client(base_url=served, timeout=60) as http:
        # grey: rows alone (no channel axis), as a client sends a grey image
        body = http.post("/v1/models/fed@latest/predict", json={"inputs": gx[:, 0].tolist()})
        assert body.status_code == 200, body.text
        wrong = http.post("/v1/models/fed@latest/predict", json={"inputs": sx.tolist()})
        made = http.post("/v1/adapt", json={"base_model": "central@latest",
                                             "support_inputs": sx.tolist(),
                                             "support_labels": list(range(5)),
                                             "query_inputs": qx.tolist()})
        assert made.status_code == 200, made.text
        grey_to_rgb = http.post("/v1/adapt", json={"base_model": "central@latest",
                                                    "support_inputs": gx[:, 0].tolist(),
                                                    "support_labels": list(range(5))})
    algorithm, params = _offline(runs.federated)
    with torch.no_grad():
        want = torch.softmax(algorithm.predict(params, gx), -1)
    torch.testing.assert_close(torch.tensor(body.json()["probabilities"]), want, atol=1e-5,
                               rtol=0)
    assert wrong.status_code == 422 and "a 16x16 image" in wrong.json()["detail"]
    assert grey_to_rgb.status_code == 422
    assert "a 3-channel 16x20 image" in grey_to_rgb.json()["detail"]
    algorithm, params = _offline(runs.central)
    adapted = algorithm.adapt(params, sx, torch.arange(5))
    with torch.no_grad():
        want = torch.softmax(algorithm.predict(adapted, qx), -1)
    got = torch.tensor(made.json()["predictions"]["probabilities"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
