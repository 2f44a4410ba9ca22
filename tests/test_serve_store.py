"""The model store behind the serving API, without Ray: ids, rollout, adaptation, validation."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from helpers import train_tiny_run

from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.from_config import algorithm_from_config
from serve.adapted import adapted_key, fingerprint
from serve.batching import passes, predict_many, predict_one
from serve.errors import BadInput, TooLarge, UnknownModel
from serve.store import LRUCache, ModelStore


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    return train_tiny_run(out, "omni", "omniglot"), train_tiny_run(out, "sine", "sinusoid")


@pytest.fixture()
def store(runs: tuple[Path, Path]) -> ModelStore:
    return ModelStore(list(runs), poll_s=0.0, cache_size=4)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_ids_resolve_to_exact_versions(store: ModelStore, runs: tuple[Path, Path]) -> None:
    latest = store.resolve("latest")
    assert (latest.run, latest.kind, latest.step) == ("omni", "meta", 2)
    assert store.resolve("omni@latest") == latest
    assert store.resolve("omni@1").step == 1
    assert store.resolve("omni@000001").id == "omni@1"  # one canonical id per version
    assert store.resolve("sine@latest").run == "sine"
    for bad in ("nope@1", "omni@7", "../omni@1", "omni@../../etc", "omni/1", "ad-123", "",
                "site-../x", "omni@ad-" + "0" * 23):
        with pytest.raises(UnknownModel):
            store.resolve(bad)


def test_locate_maps_canonical_ids_only(store: ModelStore) -> None:
    """A model replica's loader gets canonical ids: mapped to files, never resolved again."""
    for model_id in ("latest", "omni@000001", "sine@latest"):
        ref = store.resolve(model_id)
        assert store.locate(ref.id) == ref
    adapted = store.locate("sine@ad-" + "0" * 24)  # a name-to-path map: nothing is read
    assert (adapted.kind, adapted.path.name) == ("adapted", "ad-" + "0" * 24 + ".pt")
    for not_canonical in ("latest", "omni@latest", "omni@0001", "1", "nope@1", "omni/1", ""):
        with pytest.raises(ValueError, match="not a canonical model id"):
            store.locate(not_canonical)


def test_latest_follows_the_pointer_with_bounded_staleness(runs: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    run = tmp_path / "roll"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    params = load_checkpoint(runs[0])["params"]
    save_checkpoint(run, 1, {"params": params})
    slow = ModelStore([run], poll_s=3600.0)
    fast = ModelStore([run], poll_s=0.0)
    assert slow.resolve("latest").step == fast.resolve("latest").step == 1
    save_checkpoint(run, 2, {"params": {k: v + 1 for k, v in params.items()}})
    assert fast.resolve("latest").step == 2
    assert slow.resolve("latest").step == 1  # not re-read within poll_s: one stat per period
    slow.runs["roll"]._latest_checked = float("-inf")
    assert slow.resolve("latest").step == 2
    moved = fast.get("latest")
    assert torch.equal(moved.params["head.bias"], params["head.bias"] + 1)


def test_inputs_are_checked_against_the_model(store: ModelStore) -> None:
    omni = store.runs["omni"].signature
    assert omni.inputs(_images(3).tolist(), 8).shape == (3, 1, 28, 28)
    with pytest.raises(BadInput, match="28x28"):
        omni.inputs(torch.rand(2, 27, 28).tolist(), 8)
    with pytest.raises(BadInput, match="same shape"):
        omni.inputs([_images(1)[0].tolist(), [[0.0] * 28] * 27], 8)
    with pytest.raises(BadInput, match="finite float32"):
        omni.inputs([[[1e39] * 28] * 28], 8)
    with pytest.raises(TooLarge, match="limit of 2"):
        omni.inputs(_images(3).tolist(), 2)
    sine = store.runs["sine"].signature
    assert sine.inputs([0.5, -1.0], 8).shape == (2, 1)
    assert sine.inputs([[0.5], [-1.0]], 8).shape == (2, 1)
    with pytest.raises(BadInput, match="one number"):
        sine.inputs([[0.5, 1.0]], 8)



def _pack(x: torch.Tensor) -> str:
    return base64.b64encode(x.numpy().astype("<f4").tobytes()).decode()


def test_packed_inputs_decode_to_the_json_batch(store: ModelStore) -> None:
    omni, sine = store.runs["omni"].signature, store.runs["sine"].signature
    x = _images(3)
    assert torch.equal(omni.unpack(_pack(x), 8), omni.inputs(x.tolist(), 8))
    assert torch.equal(omni.read(None, _pack(x), 8), omni.read(x.tolist(), None, 8))
    xs = torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(sine.unpack(_pack(xs), 8), sine.inputs(xs.tolist(), 8))
    assert omni.unpack(_pack(x), 8).is_contiguous()
    with pytest.raises(BadInput, match="not valid base64"):
        omni.unpack("abc$", 8)
    with pytest.raises(BadInput, match="not whole inputs of 28x28 values"):
        omni.unpack(_pack(x[:, :27]), 8)
    with pytest.raises(BadInput, match="not whole inputs of one value"):
        sine.unpack(base64.b64encode(b"\0" * 6).decode(), 8)
    with pytest.raises(BadInput, match="finite float32"):
        omni.unpack(_pack(torch.full((1, 28, 28), float("inf"))), 8)
    with pytest.raises(TooLarge, match="inputs_b64: 3 inputs exceed this server's limit of 2"):
        omni.unpack(_pack(x), 2)


def test_support_labels_are_checked(store: ModelStore) -> None:
    spec = store.runs["omni"].signature
    assert spec.targets([0, 1, 2, 3, 4], 5).dtype == torch.int64
    with pytest.raises(BadInput, match="6 classes but the model has 5"):
        spec.targets([0, 1, 2, 3, 4, 5], 6)
    with pytest.raises(BadInput, match="label 7 is out of range"):
        spec.targets([0, 7], 2)
    with pytest.raises(BadInput, match="label -1"):
        spec.targets([-1, 0], 2)
    with pytest.raises(BadInput, match="integer"):
        spec.targets([0.0, 1.0], 2)
    with pytest.raises(BadInput, match="2 entries"):
        spec.targets([0, 1], 3)
    assert store.runs["sine"].signature.targets([0.5, 1.5], 2).shape == (2, 1)


def test_adapt_is_content_addressed_persisted_and_equal_to_the_core(
        store: ModelStore, runs: tuple[Path, Path]) -> None:
    base = store.get("latest")
    sx, sy = _images(5, seed=1).unsqueeze(1), torch.arange(5)
    first = store.adapt(base, sx, sy, steps=2)
    assert first.created and first.ref.kind == "adapted" and first.ref.path.is_file()
    again = store.adapt(base, sx.clone(), sy.clone(), steps=2)
    assert again.ref.id == first.ref.id and not again.created
    assert store.adapt(base, sx, sy, steps=3).ref.id != first.ref.id
    assert store.adapt(base, sx, sy.flip(0), steps=2).ref.id != first.ref.id
    # A fresh store (another replica) serves it by id from the run folder.
    other = ModelStore(list(runs), poll_s=0.0)
    loaded = other.get(first.ref.id)
    algorithm = algorithm_from_config(other.runs["omni"].config)
    offline = algorithm.adapt(load_checkpoint(runs[0])["params"], sx, sy, steps=2)
    qx = _images(7, seed=2).unsqueeze(1)
    torch.testing.assert_close(predict_one(loaded, qx), algorithm.predict(offline, qx),
                               atol=1e-5, rtol=0)
    assert other.get(first.ref.key).id == first.ref.id  # short form: the default run
    assert first.ref.key == adapted_key(fingerprint(base.params), sx, sy, 2)


def test_batched_predictions_equal_unbatched(store: ModelStore) -> None:
    omni, sine = store.get("omni@latest"), store.get("sine@latest")
    assert not omni.batch_independent and sine.batch_independent
    items = [(omni, _images(3, s).unsqueeze(1)) for s in range(3)]  # one grouped pass
    items += [(omni, _images(2, 9).unsqueeze(1))]  # another shape: its own pass
    items += [(sine, torch.linspace(-5, 5, n).unsqueeze(1)) for n in (1, 4, 9)]  # concatenated
    for (model, x), out in zip(items, predict_many(items), strict=True):
        torch.testing.assert_close(out, predict_one(model, x), atol=1e-5, rtol=0)
    assert omni.groupable
    # Capped at 4 inputs a pass: the 3-image group and the sinusoid requests split into
    # several passes; every answer is still the unbatched one.
    for (model, x), out in zip(items, predict_many(items, max_images=4), strict=True):
        torch.testing.assert_close(out, predict_one(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("sizes", "cap", "expected"), [
    ([], 32, []),
    ([1] * 5, 2, [(0, 2), (2, 4), (4, 5)]),
    ([8, 8, 8, 8, 8], 32, [(0, 4), (4, 5)]),
    ([3, 40, 1, 1], 32, [(0, 1), (1, 2), (2, 4)]),  # larger than the cap: alone
    ([5, 5], 1, [(0, 1), (1, 2)]),
])
def test_passes_hold_at_most_the_cap(sizes: list[int], cap: int,
                                     expected: list[tuple[int, int]]) -> None:
    runs = passes(sizes, cap)
    assert [(r.start, r.stop) for r in runs] == expected
    assert [i for r in runs for i in range(r.start, r.stop)] == list(range(len(sizes)))


def test_passes_reject_a_cap_below_one() -> None:
    with pytest.raises(ValueError, match="max_images"):
        passes([1], 0)


def test_site_models_and_listing(store: ModelStore, runs: tuple[Path, Path]) -> None:
    params = load_checkpoint(runs[0])["params"]
    (runs[0] / "adapted").mkdir(exist_ok=True)
    torch.save({"params": params, "step": 2}, runs[0] / "adapted" / "site-a.pt")
    ref = store.resolve("site-a")
    assert (ref.kind, ref.id) == ("site", "omni@site-a")
    assert store.get("omni@site-a").params.keys() == params.keys()
    listing = store.listing()
    assert [m["step"] for m in listing["meta_models"] if m["run"] == "omni"] == [1, 2]
    assert any(m["latest"] and m["id"] == "omni@2" for m in listing["meta_models"])
    assert {s["id"] for s in listing["site_models"]} == {"omni@site-a"}
    assert {r["run"] for r in listing["runs"]} == {"omni", "sine"}


def test_lru_evicts_least_recently_used() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and len(cache) == 2


def test_serve_deploy_config_is_valid() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import app_builder
    from serve.schemas import ServeSettings

    raw = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder"
    assert schema.http_options.host == "127.0.0.1"
    settings = ServeSettings.model_validate(app.args)
    assert settings.max_models_per_replica == 16 and settings.token_file is None
    assert app_builder(app.args) is not None  # builds the bound application offline


def test_replica_request_path_defaults(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Handlers on the replica's own loop and no access log, unless asked otherwise."""
    from serve.launch import ingress_env
    from serve.schemas import ServeSettings

    monkeypatch.delenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", raising=False)
    for ingress in ("proxy", "haproxy"):
        assert ingress_env(ingress, tmp_path)["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    assert ingress_env("haproxy", tmp_path)["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert ServeSettings.model_validate({"run_dirs": [str(tmp_path)]}).access_log is False
