"""Model-aware routing over real HTTP: two model replicas, many adapted models.

A request names a model by any id (``latest``, ``RUN@ad-HEX``, ...); the ingress resolves it to
the canonical id that the replicas' ``@serve.multiplexed`` caches are keyed by and routes with
it, so the requests for a model go to the replica that holds it. Measured with the replica id
and the replica's load counter, which every model answer carries in its headers: a model is
loaded about once, not once per replica or per request.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
import torch
from helpers import train_tiny_run

from serve.client import to_packed
from serve.host import LOADS_HEADER

MODELS = 12
REPEATS = 4
REPLICA = "x-edgemeta-replica"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from cluster.ports import free_port
    from serve.launch import start

    run = train_tiny_run(tmp_path_factory.mktemp("runs"), "omni", "omniglot")
    # Room for every model on either replica (16 > 12 adapted + the base): no eviction, so
    # any load after the first one of a model would be a routing miss.
    served = start({"run_dirs": [str(run)], "num_replicas": 2, "num_cpus": 0.5,
                    "max_models_per_replica": 16},
                   port=free_port(), ingress="haproxy", num_cpus=2)
    try:
        yield served.url
    finally:
        served.stop()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_requests_for_a_model_go_to_the_replica_that_holds_it(url: str) -> None:
    loads: dict[str, int] = {}  # replica -> models it has loaded, as it last said
    holders: dict[str, set[str]] = defaultdict(set)  # canonical id -> replicas that answered

    def note(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        replica = r.headers[REPLICA]
        loads[replica] = max(loads.get(replica, 0), int(r.headers[LOADS_HEADER]))
        return replica

    query = {"inputs_b64": to_packed(_images(2, seed=0))}
    with httpx.Client(base_url=url, timeout=60) as http:
        ids = []
        for i in range(MODELS):  # balanced by load: the base ends up on the replicas that adapt
            r = http.post("/v1/adapt", json={"base_model": "latest", "steps": 1,
                                             "support_inputs_b64": to_packed(_images(5, 100 + i)),
                                             "support_labels": list(range(5))})
            holders[r.json()["base_model"]].add(note(r))
            ids.append(r.json()["model_id"])
        assert len(set(ids)) == MODELS
        for model_id in ids:  # first requests: each model is loaded on one replica
            holders[model_id].add(note(http.post(f"/v1/models/{model_id}/predict", json=query)))
        time.sleep(1.0)  # replicas report what they hold every 0.1 s, via the controller
        first_loads = sum(loads.values())

        served_by: dict[str, set[str]] = defaultdict(set)
        rng = random.Random(0)
        for _ in range(REPEATS):
            for model_id in rng.sample([*ids, "latest"], MODELS + 1):
                r = http.post(f"/v1/models/{model_id}/predict", json=query)
                served_by[r.json()["resolved_model_id"]].add(note(r))

    requests = MODELS * (REPEATS + 2) + REPEATS
    print(f"\n{requests} requests, {MODELS} adapted models + the base; loads per replica: "
          f"{dict(sorted(loads.items()))}")
    assert len(loads) == 2 and all(len(holders[m]) == 1 for m in ids)
    assert {next(iter(holders[m])) for m in ids} == set(loads)  # new models spread over both
    for model_id, replicas in served_by.items():
        assert replicas <= holders[model_id], (model_id, replicas, holders[model_id])
    assert "omni@2" in served_by  # `latest` was routed by its canonical id
    assert sum(loads.values()) == first_loads <= MODELS + 2  # no model loaded a second time


def test_a_client_error_in_a_model_replica_keeps_its_status(url: str) -> None:
    """A model replica's :class:`UnknownModel` (its file gone since the ingress resolved the
    id) reaches the ingress as itself, not as Ray's wrapper: the client gets a 404."""
    import asyncio

    from ray import serve

    from serve.errors import UnknownModel
    from serve.ingress import remote_reply

    replicas = serve.get_deployment_handle("EdgeMeta-models", app_name="edgemeta")
    gone = "omni@ad-" + "0" * 24
    x = _images(1, seed=0).unsqueeze(1)
    call = replicas.options(multiplexed_model_id=gone).predict.remote(gone, x)
    with pytest.raises(UnknownModel, match="disappeared"):
        asyncio.run(remote_reply(call))
