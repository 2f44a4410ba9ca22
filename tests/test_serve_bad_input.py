"""Bad input, auth and overload over real HTTP: each a clear 4xx/503, and the replica lives on.

One Serve instance, two apps: ``/`` (small limits, a small adapted-model quota) and ``/secure``
(bearer token; one request in flight and one queued, for the overload test). After every bad
request a good one is answered by the same replica (same ``x-edgemeta-replica``): nothing crashed
or restarted it. Then a flood of ``/v1/adapt`` against the quota, and requests generated from the
OpenAPI document (schemathesis).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch

from serve.auth import load_token, token_matches

PORT = 8141
TOKEN = "s3cret-token-for-tests"
QUOTA_MODELS = 12  # and room for QUOTA_FILES models of bytes: the byte bound binds first
QUOTA_FILES = 6


def _train(out: Path) -> Path:
    from experiments.config import parse_config
    from experiments.train import train

    raw = {"name": "omni", "output_dir": str(out), "seed": 0,
           "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 3},
           "model": {"name": "omniglot_conv", "channels": 8},
           "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 1},
           "train": {"steps": 1, "meta_batch": 2, "log_every": 1},
           "eval": {"episodes": 5, "batch": 5}}
    train(parse_config(raw), echo=lambda _: None)
    return out / "omni"


def _adapted_file_bytes(run: Path) -> int:
    """The size of one adapted model of ``run``, as the store writes it."""
    from serve.store import ModelStore

    store = ModelStore([run], poll_s=0.0, cache_size=1)
    x = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(0))
    ref = store.adapt(store.get("latest"), x, torch.arange(5), steps=1).ref
    size = ref.path.path.stat().st_size  # a local run folder here
    ref.path.unlink()
    return size


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def quota_bytes(run_dir: Path) -> int:
    return QUOTA_FILES * _adapted_file_bytes(run_dir) + 100


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, run_dir: Path,
        quota_bytes: int) -> Iterator[str]:
    from serve.launch import start

    run = str(run_dir)
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    common = {"run_dirs": [run], "num_cpus": 0}
    served = start({**common, "max_inputs": 8, "max_support": 25, "max_adapt_steps": 10,
                    "max_body_bytes": 256 * 1024, "adapted_max_models": QUOTA_MODELS,
                    "adapted_max_bytes": quota_bytes},
                   port=PORT, num_cpus=2,
                   extra_apps={"secure": ("/secure", {**common, "token_file": str(token_file),
                                                      "max_ongoing_requests": 1,
                                                      "max_queued_requests": 1,
                                                      "retry_after_s": 2,
                                                      "max_adapt_steps": 1000})})
    try:
        yield served.url
    finally:
        served.stop()


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _image(value: float = 0.5) -> list[list[float]]:
    return [[value] * 28 for _ in range(28)]


GOOD = {"inputs": [_image()]}
SUPPORT = [_image(i / 5) for i in range(5)]


@pytest.fixture(scope="module")
def replica(http: httpx.Client) -> str:
    r = http.post("/v1/models/latest/predict", json=GOOD)
    assert r.status_code == 200, r.text
    return r.headers["x-edgemeta-replica"]


def _raw(body: str) -> dict[str, Any]:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


def _chunks(n: int) -> Iterator[bytes]:
    yield b'{"inputs": ['
    for _ in range(n):
        yield b"0.5," * 4096
    yield b"0.5]}"


def _packed(n: int, value: float = 0.5, extra: int = 0) -> str:
    """``n`` 28×28 images as ``*_b64`` wants them, plus ``extra`` stray bytes."""
    data = struct.pack(f"<{n * 28 * 28}f", *([value] * (n * 28 * 28))) + b"\0" * extra
    return base64.b64encode(data).decode()


PREDICT = "/v1/models/latest/predict"
CASES: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "wrong shape": (PREDICT, {"json": {"inputs": [[[0.5] * 28] * 27]}}, 422, "28x28"),
    "wrong dtype": (PREDICT, {"json": {"inputs": [[["0.5"] * 28] * 28]}}, 422,
                    "valid number"),
    "boolean": (PREDICT, {"json": {"inputs": [True]}}, 422, "valid number"),
    "nan": (PREDICT, _raw('{"inputs": [NaN]}'), 422, "finite"),
    "infinity": (PREDICT, _raw('{"inputs": [[[Infinity]]]}'), 422, "finite"),
    "float32 overflow": (PREDICT, {"json": {"inputs": [_image(1e39)]}}, 422, "float32"),
    "ragged": (PREDICT, {"json": {"inputs": [_image(), _image()[:27]]}}, 422, "same shape"),
    "empty": (PREDICT, {"json": {"inputs": []}}, 422, "at least 1"),
    "too many inputs": (PREDICT, {"json": {"inputs": [_image()] * 9}}, 413, "limit of 8"),
    "oversized body": (PREDICT, _raw("x" * (300 * 1024)), 413, "exceeds the limit"),
    "oversized chunked": (PREDICT, {"content": _chunks(40),
                                    "headers": {"content-type": "application/json"}}, 413,
                          "exceeds the limit"),
    "malformed json": (PREDICT, _raw('{"inputs": [1.0,'), 400, "malformed JSON"),
    "both forms": (PREDICT, {"json": {"inputs": [_image()], "inputs_b64": _packed(1)}}, 422,
                   "not both"),
    "neither form": (PREDICT, {"json": {}}, 422, "inputs_b64"),
    "bad base64": (PREDICT, {"json": {"inputs_b64": "not*base64"}}, 422, "not valid base64"),
    "partial image": (PREDICT, {"json": {"inputs_b64": _packed(1, extra=4)}}, 422,
                      "not whole inputs"),
    "packed nan": (PREDICT, {"json": {"inputs_b64": _packed(1, value=float("nan"))}}, 422,
                   "finite"),
    "packed too many": (PREDICT, {"json": {"inputs_b64": _packed(9)}}, 413, "limit of 8"),
    "packed support and labels": ("/v1/adapt", {"json": {
        "support_inputs_b64": _packed(5), "support_labels": [0, 1]}}, 422,
        "support_labels has 2"),
    "missing field": (PREDICT, {"json": {"input": [0.5]}}, 422, "inputs"),
    "unknown model": ("/v1/models/omni@999/predict", {"json": GOOD}, 404, "no checkpoint"),
    "unknown run": ("/v1/models/other@1/predict", {"json": GOOD}, 404, "unknown run"),
    "path traversal": ("/v1/models/..%2F..%2Fetc%2Fpasswd/predict", {"json": GOOD}, 404, ""),
    "not an id": ("/v1/models/omni@..x/predict", {"json": GOOD}, 404, "not a model id"),
    "more ways than labels": ("/v1/adapt", {"json": {
        "support_inputs": [*SUPPORT, _image()], "support_labels": [0, 1, 2, 3, 4, 5]}}, 422,
        "6 classes but the model has 5"),
    "label out of range": ("/v1/adapt", {"json": {
        "support_inputs": SUPPORT[:2], "support_labels": [0, 9]}}, 422, "out of range"),
    "float labels": ("/v1/adapt", {"json": {
        "support_inputs": SUPPORT[:2], "support_labels": [0.0, 1.5]}}, 422, "integer"),
    "labels mismatch": ("/v1/adapt", {"json": {
        "support_inputs": SUPPORT, "support_labels": [0, 1]}}, 422, "support_labels has 2"),
    "too many steps": ("/v1/adapt", {"json": {
        "support_inputs": SUPPORT, "support_labels": [0, 1, 2, 3, 4], "steps": 11}}, 422,
        "limit of 10"),
    "support too large": ("/v1/adapt", {"json": {
        "support_inputs": [_image()] * 26, "support_labels": [0] * 26}}, 413, "limit of 25"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_clear_4xx_and_the_replica_lives(http: httpx.Client, replica: str,
                                                            case: str) -> None:
    path, kwargs, status, fragment = CASES[case]
    r = http.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"], r.text
    good = http.post(PREDICT, json=GOOD)
    assert good.status_code == 200 and good.headers["x-edgemeta-replica"] == replica


def test_token_required_everywhere_but_healthz(url: str) -> None:
    from serve.client import EdgeMetaClient, ServeError

    with httpx.Client(base_url=url + "/secure", timeout=60) as anon:
        assert anon.get("/healthz").status_code == 200
        for path in ("/v1/models", "/docs", "/openapi.json"):
            r = anon.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert anon.post(PREDICT, json=GOOD).status_code == 401
        for header in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"):
            assert anon.get("/v1/models", headers={"authorization": header}).status_code == 401
    with EdgeMetaClient(url + "/secure", token=TOKEN) as client:
        assert client.predict("latest", torch.full((1, 28, 28), 0.5))["labels"]
        assert client.models()["runs"][0]["run"] == "omni"
    with EdgeMetaClient(url + "/secure", token="wrong") as client, pytest.raises(ServeError) as e:
        client.models()
    assert e.value.status == 401
    # The open app needs no token.
    assert httpx.get(url + "/v1/models", timeout=60).status_code == 200


def test_token_sources(tmp_path: Path) -> None:
    assert load_token(None, env={}) is None
    assert load_token(None, env={"EDGEMETA_SERVE_TOKEN": " abc \n"}) == "abc"
    (tmp_path / "t").write_text("from-file\n")
    assert load_token(tmp_path / "t", env={"EDGEMETA_SERVE_TOKEN": "abc"}) == "from-file"
    with pytest.raises(FileNotFoundError):
        load_token(tmp_path / "missing")  # fail closed on a typo, never serve open
    assert token_matches("abc", "Bearer abc") and token_matches("abc", "bearer abc")
    assert not token_matches("abc", "Bearer abd") and not token_matches("abc", None)


def test_overload_is_answered_with_503_and_retry_after(url: str) -> None:
    """Eight slow adaptations at once against one slot and one queue place: the rest are shed
    with 503 and the configured ``Retry-After``, and the same replica (nothing crashed or
    restarted) answers afterwards. benchmarks/serve_overload.py measures the same at scale."""
    slow = {"support_inputs": SUPPORT * 5, "support_labels": [0, 1, 2, 3, 4] * 5,
            "steps": 400}
    auth = {"authorization": f"Bearer {TOKEN}"}
    before = httpx.post(url + "/secure" + PREDICT, json=GOOD, timeout=60, headers=auth)
    assert before.status_code == 200

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url + "/secure", timeout=120,
                                     headers={"authorization": f"Bearer {TOKEN}"}) as c:
            return await asyncio.gather(*[
                c.post("/v1/adapt", json={**slow, "steps": 400 + i}) for i in range(8)])

    responses = asyncio.run(flood())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "2" for r in rejected)
    r = httpx.post(url + "/secure" + PREDICT, json=GOOD, timeout=60, headers=auth)
    assert r.status_code == 200
    assert r.headers["x-edgemeta-replica"] == before.headers["x-edgemeta-replica"]


def test_the_python_client_waits_out_an_overload(url: str) -> None:
    """Both slots of ``/secure`` busy with long adaptations: the client's predict gets 503, waits
    the server's ``Retry-After`` and is answered once a slot is free, without the caller
    seeing an error."""
    from concurrent.futures import ThreadPoolExecutor

    from serve.client import EdgeMetaClient

    auth = {"authorization": f"Bearer {TOKEN}"}
    slow = {"support_inputs": SUPPORT * 5, "support_labels": [0, 1, 2, 3, 4] * 5}
    waits: list[float] = []

    def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=url + "/secure", timeout=120,
                                                     headers=auth) as raw:
        busy = []
        for steps in (1000, 999):  # one running, then one queued: both slots taken
            busy.append(pool.submit(raw.post, "/v1/adapt", json={**slow, "steps": steps}))
            time.sleep(0.25)  # each adaptation takes seconds here (3-6 s measured)
        with EdgeMetaClient(url + "/secure", token=TOKEN, retries=30, max_retry_wait_s=2.0,
                            sleep=recorded_sleep) as client:
            answer = client.predict("latest", torch.full((1, 28, 28), 0.5))
        assert [f.result().status_code for f in busy] == [200, 200], [
            f.result().text[:200] for f in busy]
    assert len(answer["labels"]) == 1
    assert waits and set(waits) == {2.0}, waits  # the server's Retry-After, each time


def _stored(folder: Path) -> tuple[int, int]:
    """Adapted models in ``folder``, and their bytes (writes in progress included)."""
    count = size = 0
    for entry in os.scandir(folder) if folder.is_dir() else ():
        if entry.name.startswith(("ad-", ".ad-")):
            try:
                size += entry.stat().st_size
            except FileNotFoundError:
                continue
            count += entry.name.startswith("ad-")
    return count, size


def test_an_adapt_flood_stays_within_the_quota(url: str, run_dir: Path,
                                               quota_bytes: int) -> None:
    """8 clients, each adapting 12 distinct support sets as fast as answers come back: every
    request succeeds, and the adapted models on disk never exceed the quota."""
    from serve.client import EdgeMetaClient

    clients, per_client = 8, 12
    peak = [0, 0]
    done = threading.Event()

    def watch() -> None:  # the folder as seen from outside the server, every few ms
        while not done.is_set():
            count, size = _stored(run_dir / "adapted")
            peak[0], peak[1] = max(peak[0], count), max(peak[1], size)
            time.sleep(0.003)

    def flood(client_idx: int) -> list[str]:
        ids = []
        with EdgeMetaClient(url, timeout=60) as client:
            for i in range(per_client):
                x = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(
                    100 * client_idx + i))
                reply = client.adapt(x, list(range(5)), steps=1, query_inputs=x[:1])
                assert reply["created"] and len(reply["predictions"]["labels"]) == 1
                ids.append(reply["model_id"])
        return ids

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(clients) as pool:
            ids = [i for part in pool.map(flood, range(clients)) for i in part]
    finally:
        done.set()
        watcher.join()
    print(f"\n{len(ids)} adaptations in {time.monotonic() - t0:.1f} s; peak on disk: "
          f"{peak[0]} models, {peak[1]} bytes (quota {QUOTA_MODELS} models, {quota_bytes} bytes)")
    assert len(set(ids)) == clients * per_client  # all succeeded, each a new model
    assert 0 < peak[1] <= quota_bytes and peak[0] <= QUOTA_FILES

    listing = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert listing["adapted_quota"] == {"max_models": QUOTA_MODELS, "max_bytes": quota_bytes,
                                        "ttl_s": None}
    run = listing["runs"][0]
    assert 0 < run["adapted_models"] <= QUOTA_FILES and run["adapted_bytes"] <= quota_bytes
    kept = [m["id"] for m in listing["adapted_models"]]  # most recently used first
    assert set(kept) <= set(ids) and len(kept) == run["adapted_models"]
    one = [[[0.5] * 28] * 28]
    assert httpx.post(f"{url}/v1/models/{kept[0]}/predict", json={"inputs": one},
                      timeout=30).status_code == 200
    evicted = next(i for i in ids if i not in kept)
    r = httpx.post(f"{url}/v1/models/{evicted}/predict", json={"inputs": one}, timeout=30)
    assert r.status_code == 404 and "no adapted model" in r.json()["detail"]


def test_the_schema_states_what_the_server_refuses(url: str) -> None:
    """Bodies the server refuses for their form are invalid in its own OpenAPI document: both
    input forms, neither, no label, a packed string of no whole float32."""
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()

    def valid(name: str, body: dict[str, object]) -> bool:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        return jsonschema.Draft202012Validator(schema).is_valid(body)

    packed = _packed(1)
    assert valid("PredictRequest", {"inputs": [0.5]})
    assert valid("PredictRequest", {"inputs_b64": packed})
    assert valid("PredictRequest", {"inputs": [0.5], "inputs_b64": None})
    assert not valid("PredictRequest", {"inputs": [0.5], "inputs_b64": packed})
    assert not valid("PredictRequest", {})
    assert not valid("PredictRequest", {"inputs_b64": "AAAA"})  # 3 bytes: no whole float32
    assert not valid("PredictRequest", {"inputs_b64": "not*base64"})
    assert valid("AdaptRequest", {"support_inputs": [0.5], "support_labels": [1.0]})
    assert not valid("AdaptRequest", {"support_inputs": [0.5], "support_labels": []})
    assert not valid("AdaptRequest", {"support_inputs": [0.5], "support_inputs_b64": packed,
                                      "support_labels": [1.0]})
    assert not valid("AdaptRequest", {"support_inputs": [0.5], "support_labels": [1.0],
                                      "query_inputs": [0.5], "query_inputs_b64": packed})
    for body in ({"inputs": [0.5], "inputs_b64": packed}, {"inputs_b64": "AAAA"}, {}):
        assert httpx.post(f"{url}{PREDICT}", json=body, timeout=30).status_code == 422


def test_generated_requests_get_no_server_error(url: str, tmp_path: Path) -> None:
    """schemathesis, from the served OpenAPI document: a bounded, seeded set of valid and
    invalid requests per operation, with every check but "schema-valid data is accepted",
    which a schema cannot promise here (input shapes, label counts and packed sizes depend on
    the model asked)."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{url}/openapi.json", "--max-examples", "30", "--seed", "17",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    summary = proc.stdout.split("SUMMARY")[-1]
    print(summary)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert " passed" in summary and "failed" not in summary


def test_a_replica_killed_under_load_costs_the_client_no_error(url: str) -> None:
    """Four clients predict without pause while the replica of ``/`` is SIGKILLed: Serve
    starts another, and the project's client (default retries) sees no error. Last in the
    module: it replaces the replica the tests above compare against."""
    import signal

    from cluster import procs
    from serve.client import EdgeMetaClient

    before = httpx.get(f"{url}/healthz", timeout=30).json()["replica"]
    table = procs.process_table()
    mine = procs.descendants(table, [os.getpid()])  # this test's Ray, not another's
    victims = [p for p in mine if table[p].cmdline.startswith("ray::ServeReplica:edgemeta:")]
    assert len(victims) == 1, [table[p].cmdline[:80] for p in victims]
    stop, answers, errors = threading.Event(), [0], []

    def predict_forever(i: int) -> None:
        with EdgeMetaClient(url, timeout=60) as client:
            while not stop.is_set():
                try:
                    client.predict("latest", torch.full((1, 28, 28), 0.1 * i))
                    answers[0] += 1
                except Exception as err:  # what a caller would see
                    errors.append(f"{type(err).__name__}: {err}"[:300])

    clients = [threading.Thread(target=predict_forever, args=(i,)) for i in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        os.kill(victims[0], signal.SIGKILL)
        t0, after = time.monotonic(), before
        while after == before and time.monotonic() - t0 < 120:
            time.sleep(0.5)
            try:
                r = httpx.get(f"{url}/healthz", timeout=30)
            except httpx.HTTPError:
                continue  # no replica behind the proxy yet
            after = r.json()["replica"] if r.status_code == 200 else before
        time.sleep(1.0)  # and a little under the new replica
    finally:
        stop.set()
        for t in clients:
            t.join()
    print(f"\nreplica {before} -> {after} in {time.monotonic() - t0:.1f} s; "
          f"{answers[0]} answers, {len(errors)} errors")
    assert after != before and answers[0] > 0
    assert errors == []
