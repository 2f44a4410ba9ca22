"""End to end over real HTTP: train tiny runs, serve them with Ray Serve, predict, adapt, roll out.

One Serve instance for the module, deployed with ``site="site-a"`` on an embedded Ray node that
advertises that site's resource: the replica must hold a share of it, and every response names
the node and site that served it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from helpers import train_tiny_run

from cluster.topology import ACTOR_RESOURCE_REQUEST, SITE_RESOURCE_QUANTITY, site_resource
from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.from_config import algorithm_from_config
from metalearn.site_models import save_site_model
from serve.client import EdgeMetaClient

PORT = 8131
SITE = "site-a"


class Served:
    def __init__(self, url: str, omni: Path, sine: Path, node: str) -> None:
        self.url, self.omni, self.sine, self.node = url, omni, sine, node


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import ray

    from serve.launch import start

    out = tmp_path_factory.mktemp("runs")
    omni, sine = train_tiny_run(out, "omni", "omniglot"), train_tiny_run(out, "sine", "sinusoid")
    # A site model, written by the writer the federated driver and onboarding use (a federated
    # run that makes one for real: tests/test_cluster_local.py, served from the site's node).
    save_site_model(omni, SITE, load_checkpoint(omni, 1)["params"], {"round": 1, "steps": 0})
    # One embedded node that advertises the site's resource; the replica must ask for it.
    handle = start({"run_dirs": [str(omni), str(sine)], "site": SITE,
                    "max_models_per_replica": 3, "latest_poll_ms": 50},
                   port=PORT, ingress="haproxy", num_cpus=2,
                   resources={site_resource(SITE): SITE_RESOURCE_QUANTITY})
    try:
        node = ray.get_runtime_context().get_node_id()
        yield Served(handle.url, omni, sine, node)
    finally:
        handle.stop()


@pytest.fixture()
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed))


def _offline(run: Path, step: int) -> tuple[Any, dict[str, torch.Tensor]]:
    import yaml

    algorithm = algorithm_from_config(yaml.safe_load((run / "config.yaml").read_text()))
    return algorithm, load_checkpoint(run, step)["params"]


def test_health_docs_and_where_served(served: Served, http: httpx.Client) -> None:
    import ray

    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["site"] == SITE
    assert r.headers["x-edgemeta-node"] == served.node == r.json()["node_id"]
    assert r.headers["x-edgemeta-site"] == SITE and r.headers["x-edgemeta-replica"]
    # The replica holds its share of the site's resource: that is what pins it to the site.
    held = SITE_RESOURCE_QUANTITY - ray.available_resources()[site_resource(SITE)]
    assert held == ACTOR_RESOURCE_REQUEST
    spec = http.get("/openapi.json").json()
    assert {"/v1/models/{model_id}/predict", "/v1/adapt", "/v1/models", "/healthz"} <= set(
        spec["paths"])
    assert http.get("/docs").status_code == 200


def test_models_lists_versions_sites_and_runs(http: httpx.Client) -> None:
    body = http.get("/v1/models").json()
    assert {(m["id"], m["step"], m["latest"]) for m in body["meta_models"]} >= {
        ("omni@1", 1, False), ("omni@2", 2, True), ("sine@2", 2, True)}
    assert [s["id"] for s in body["site_models"]] == [f"omni@site-{SITE}"]
    assert {r["run"]: r["task_type"] for r in body["runs"]} == {
        "omni": "classification", "sine": "regression"}


def test_predict_classification_and_regression_match_the_core(served: Served,
                                                              http: httpx.Client) -> None:
    x = _images(4, seed=0)
    r = http.post("/v1/models/latest/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["resolved_model_id"], body["step"], body["run"]) == ("omni@2", 2, "omni")
    algorithm, params = _offline(served.omni, 2)
    with torch.no_grad():
        expected = torch.softmax(algorithm.predict(params, x.unsqueeze(1)), -1)
    torch.testing.assert_close(torch.tensor(body["probabilities"]), expected, atol=1e-5, rtol=0)
    assert body["labels"] == expected.argmax(-1).tolist()

    xs = [-3.0, 0.0, 2.5]
    body = http.post("/v1/models/sine@latest/predict", json={"inputs": xs}).json()
    algorithm, params = _offline(served.sine, 2)
    with torch.no_grad():
        want = algorithm.predict(params, torch.tensor(xs).unsqueeze(1))[:, 0]
    torch.testing.assert_close(torch.tensor(body["values"]), want, atol=1e-5, rtol=0)

    site = http.post(f"/v1/models/site-{SITE}/predict", json={"inputs": x.tolist()}).json()
    assert site["resolved_model_id"] == f"omni@site-{SITE}" and site.get("step") is None


def test_adapt_equals_offline_adaptation_and_is_served_by_id(served: Served) -> None:
    sx, sy, qx = _images(5, seed=1), list(range(5)), _images(10, seed=2)
    with EdgeMetaClient(served.url) as client:
        made = client.adapt(sx, sy, base_model="omni@2", steps=3, query_inputs=qx)
        assert made["base_model"] == "omni@2" and made["steps"] == 3 and made["created"]
        algorithm, params = _offline(served.omni, 2)
        adapted = algorithm.adapt(params, sx.unsqueeze(1), torch.tensor(sy), steps=3)
        with torch.no_grad():
            expected = torch.softmax(algorithm.predict(adapted, qx.unsqueeze(1)), -1)
        got = torch.tensor(made["predictions"]["probabilities"])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # The id names the adaptation: served later by id, and the same request gives it again.
        later = client.predict(made["model_id"], qx)
        torch.testing.assert_close(torch.tensor(later["probabilities"]), got, atol=1e-6, rtol=0)
        again = client.adapt(sx, sy, base_model="omni@2", steps=3)
        assert again["model_id"] == made["model_id"] and not again["created"]
        assert client.adapt(sx, sy, base_model="omni@2", steps=4)["model_id"] != made["model_id"]
        assert (served.omni / "adapted" / f"{made['model_id'].split('@')[1]}.pt").is_file()
        listed = {m["id"] for m in client.models()["adapted_models"]}
        assert made["model_id"] in listed



def test_packed_inputs_give_the_same_answers_as_json_numbers(served: Served) -> None:
    """``*_b64`` inputs (float32, base64) are another spelling of the same request."""
    x, sx, qx = _images(4, seed=20), _images(5, seed=21), _images(6, seed=22)
    with EdgeMetaClient(served.url) as plain, EdgeMetaClient(served.url, packed=True) as packed:
        assert packed.predict("omni@2", x) == plain.predict("omni@2", x)
        xs = torch.tensor([-3.0, 0.0, 2.5])
        assert packed.predict("sine@2", xs)["values"] == plain.predict("sine@2", xs)["values"]
        a = packed.adapt(sx, list(range(5)), base_model="omni@2", steps=2, query_inputs=qx)
        b = plain.adapt(sx, list(range(5)), base_model="omni@2", steps=2, query_inputs=qx)
        assert a["model_id"] == b["model_id"]  # the same support set: the same adaptation
        assert a["predictions"] == b["predictions"]


def test_concurrent_requests_are_batched_without_changing_answers(http: httpx.Client) -> None:
    jobs = [("omni@2", _images(3, seed=10 + i).tolist()) for i in range(8)]
    jobs += [("sine@2", [float(i), -float(i)]) for i in range(8)]
    alone = [http.post(f"/v1/models/{m}/predict", json={"inputs": x}).json() for m, x in jobs]

    def call(job: tuple[str, Any]) -> dict[str, Any]:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as c:
            return c.post(f"/v1/models/{job[0]}/predict", json={"inputs": job[1]}).json()

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(call, jobs))
    for a, b in zip(alone, together, strict=True):
        key = "probabilities" if a["task_type"] == "classification" else "values"
        torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), atol=1e-5,
                                   rtol=0)


def test_more_adapted_models_than_the_lru_holds(served: Served) -> None:
    qx = _images(2, seed=3)
    with EdgeMetaClient(served.url) as client:
        ids = [client.adapt(_images(5, seed=100 + i), list(range(5)), base_model="omni@1",
                            steps=1)["model_id"] for i in range(5)]
        first = [client.predict(i, qx)["probabilities"] for i in ids]
        second = [client.predict(i, qx)["probabilities"] for i in reversed(ids)]
    assert len(set(ids)) == 5
    assert first == list(reversed(second))  # reloaded from the run folder after eviction


def test_latest_rolls_out_a_new_checkpoint_without_failed_requests(served: Served) -> None:
    x = _images(2, seed=4).tolist()
    base = load_checkpoint(served.omni, 2)["params"]
    seen: list[list[tuple[int, int | None]]] = [[], []]
    stop = threading.Event()

    def hammer(log: list[tuple[int, int | None]]) -> None:
        with httpx.Client(base_url=served.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/models/latest/predict", json={"inputs": x})
                log.append((r.status_code, r.json().get("step") if r.status_code == 200
                            else None))

    threads = [threading.Thread(target=hammer, args=(log,)) for log in seen]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for step in (3, 4, 5):
            save_checkpoint(served.omni, step, {"params": {k: v + 0.05 * step
                                                           for k, v in base.items()}})
            time.sleep(0.3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(log and log[-1][1] == 5 for log in seen):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    for log in seen:
        assert {status for status, _ in log} == {200}, log
        steps = [s for _, s in log]
        assert steps[0] == 2 and steps[-1] == 5
        assert steps == sorted(steps)  # a client never goes back to an older version
    algorithm, params = _offline(served.omni, 5)
    r = httpx.post(f"{served.url}/v1/models/latest/predict", json={"inputs": x}, timeout=60)
    with torch.no_grad():
        want = torch.softmax(algorithm.predict(params, torch.tensor(x).unsqueeze(1)), -1)
    torch.testing.assert_close(torch.tensor(r.json()["probabilities"]), want, atol=1e-5, rtol=0)
