"""Run storage on a real S3-compatible server (moto's standalone server, HTTP on 127.0.0.1):
files, a training run that checkpoints to s3 and resumes from it, and models served from s3."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from helpers import S3_BUCKET, s3_server

from experiments.config import parse_config
from experiments.train import train
from metalearn.checkpoint import latest_step, list_checkpoints, load_checkpoint, save_checkpoint
from metalearn.storage import Location, StorageError
from serve.store import ModelStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3() -> Any:
    with s3_server() as env:
        yield env


def _sine(output_dir: str, steps: int) -> dict[str, Any]:
    return {"name": "sine", "output_dir": output_dir, "seed": 3,
            "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
            "model": {"name": "sinusoid_mlp"},
            "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
            "train": {"steps": steps, "meta_batch": 2, "checkpoint_every": 1, "log_every": 1},
            "eval": {"episodes": 4, "batch": 4, "steps_list": [0, 1]}}


def test_files_on_s3(s3: dict[str, str]) -> None:
    root = Location(f"s3://{S3_BUCKET}/unit")
    f = root / "a" / "x.bin"
    assert str(f) == f"s3://{S3_BUCKET}/unit/a/x.bin" and f.name == "x.bin"
    assert not f.exists()
    with pytest.raises(FileNotFoundError, match=r"x\.bin"):
        f.read_bytes()
    f.write_bytes(b"one")
    f.write_bytes(b"second")
    (root / "a" / "y.txt").write_text("why")
    assert f.read_bytes() == b"second" and f.is_file() and (root / "a").is_dir()
    assert {(e.name, e.size) for e in (root / "a").files()} == {("x.bin", 6), ("y.txt", 3)}
    assert all(e.mtime > 0 for e in (root / "a").files())
    assert (root / "none").files() == []
    with pytest.raises(TypeError, match="object storage"):
        os.fspath(f)
    again = pickle.loads(pickle.dumps(f))  # e.g. a ModelRef sent to another process
    assert again == f and again.read_bytes() == b"second"
    f.unlink()
    assert not f.exists() and [e.name for e in (root / "a").files()] == ["y.txt"]


def test_local_location_reads_like_a_path(tmp_path: Path) -> None:
    loc = Location(f"file://{tmp_path}") / "t.parquet"
    assert loc.is_local and loc == tmp_path / "t.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(loc)  # os.PathLike: libraries take it
    assert pd.read_parquet(loc)["a"].tolist() == [1, 2]
    unknown = Location("nosuch://bucket/x") / "y"  # naming touches nothing
    assert str(unknown) == "nosuch://bucket/x/y" and unknown.parent.name == "x"
    with pytest.raises(StorageError, match="nosuch"):
        unknown.exists()


def test_run_checkpoints_to_s3_and_resumes_from_it(s3: dict[str, str], tmp_path: Path) -> None:
    """Two steps to s3, then the same run to four steps resumes from s3's latest checkpoint
    and ends where an uninterrupted local run ends; the metrics table continues."""
    uri = f"s3://{S3_BUCKET}/runs"
    first = parse_config(_sine(uri, 2))
    assert str(first.run_dir) == f"{uri}/sine"
    train(first, echo=lambda _: None)
    assert list_checkpoints(first.run_dir) == [1, 2] and latest_step(first.run_dir) == 2
    lines: list[str] = []
    train(parse_config(_sine(uri, 4)), echo=lines.append)
    assert any(f"resuming {uri}/sine from step 2" in line for line in lines), lines
    rows = pd.read_parquet(io.BytesIO((first.run_dir / "metrics.parquet").read_bytes()))
    assert rows["step"].tolist() == [1, 2, 3, 4]

    whole = parse_config(_sine(str(tmp_path), 4))
    train(whole, echo=lambda _: None)
    a, b = load_checkpoint(first.run_dir), load_checkpoint(whole.run_dir)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in b["params"])
    assert (first.run_dir / "summary.json").is_file() and (first.run_dir / "config.yaml").is_file()


def test_models_served_from_s3(s3: dict[str, str]) -> None:
    """A model adapted by one store lands in s3 and another store finds it by its id; a new
    checkpoint in s3 rolls out to ``latest``. (Across nodes, with Serve replicas pinned to a
    site: tests/test_cluster_local.py.)"""
    uri = f"s3://{S3_BUCKET}/runs/sine"  # trained by the test above (module order)
    store = ModelStore([uri], poll_s=0.0, cache_size=2)
    base = store.get("latest")
    assert base.id == "sine@4"
    x = torch.linspace(-4, 4, 5)[:, None]
    made = store.adapt(base, x, torch.sin(x), steps=2)
    assert made.created and str(made.ref.path) == f"{uri}/adapted/{made.ref.key}.pt"
    assert made.ref.path.is_file()

    # another store (a replica elsewhere: its own cache, nothing shared but s3) finds it
    other = ModelStore([uri], cache_size=0)
    found = other.get(made.ref.id)
    assert found.id == made.ref.id and other.listing()["adapted_total"] == 1
    assert all(torch.equal(found.params[k], v) for k, v in made.params.items())

    again = store.adapt(base, x, torch.sin(x), steps=2)
    assert not again.created and again.ref.id == made.ref.id  # found in s3, not recomputed
    save_checkpoint(uri, 5, {"params": base.params})
    assert store.resolve("latest").id == "sine@5"
