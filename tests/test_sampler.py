"""Omniglot episode sampler: shapes, labels, rotations, seeding, resuming and argument checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from metalearn.data import OmniglotData, OmniglotEpisodes, load_omniglot, standard_split


@pytest.fixture(scope="module")
def data() -> OmniglotData:
    return load_omniglot()


@pytest.fixture(scope="module")
def split(data: OmniglotData) -> tuple[np.ndarray, np.ndarray]:
    return standard_split(data)


@pytest.mark.parametrize(("ways", "shots", "queries"), [(5, 1, 15), (20, 5, 5)])
def test_shapes_dtypes_and_labels(data: OmniglotData, split: tuple[np.ndarray, np.ndarray],
                                  ways: int, shots: int, queries: int) -> None:
    sampler = OmniglotEpisodes(data, split[0], ways, shots, queries, seed=1)
    tasks = sampler.sample(4)
    assert len(tasks) == 4
    assert tasks.support_x.shape == (4, ways * shots, 1, 28, 28)
    assert tasks.query_x.shape == (4, ways * queries, 1, 28, 28)
    assert tasks.support_x.dtype == tasks.query_x.dtype == torch.float32
    assert tasks.support_y.dtype == tasks.query_y.dtype == torch.int64
    assert tasks.support_y.shape == (4, ways * shots)
    assert torch.equal(tasks.support_y[2], torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(tasks.query_y[3], torch.arange(ways).repeat_interleave(queries))
    assert float(tasks.query_x.min()) >= 0.0 and float(tasks.query_x.max()) <= 1.0


def test_images_are_the_rotated_originals(data: OmniglotData,
                                          split: tuple[np.ndarray, np.ndarray]) -> None:
    ways, shots, queries = 5, 2, 3
    sampler = OmniglotEpisodes(data, split[0], ways, shots, queries, seed=3)
    tasks, info = sampler.sample_with_info(6)
    originals = data.images.numpy()
    for b in range(6):
        for w in range(ways):
            k = int(info.rotations[b, w])
            drawn = [np.rot90(originals[info.characters[b, w], d], k) for d in info.drawers[b, w]]
            got = [tasks.support_x[b, w * shots + j, 0] for j in range(shots)]
            got += [tasks.query_x[b, w * queries + j, 0] for j in range(queries)]
            for expected, actual in zip(drawn, got, strict=True):
                assert np.array_equal(actual.numpy(), expected)
    assert set(info.rotations.unique().tolist()) <= {0, 1, 2, 3}


def test_classes_and_drawers_distinct_rotations_cover(data: OmniglotData) -> None:
    chars = np.arange(10)
    sampler = OmniglotEpisodes(data, chars, ways=20, shots=1, queries=19, seed=0)
    assert sampler.num_classes == 40
    _, info = sampler.sample_with_info(50)
    pairs = info.characters * 4 + info.rotations
    assert all(len(set(p.tolist())) == 20 for p in pairs)  # distinct classes in every task
    assert all(len(set(d.tolist())) == 20 for d in info.drawers.reshape(-1, 20))  # all 20 drawers
    assert set(info.characters.unique().tolist()) == set(chars.tolist())
    assert set(info.rotations.unique().tolist()) == {0, 1, 2, 3}


def test_no_rotations_and_uniform_class_use(data: OmniglotData) -> None:
    chars = np.array([5, 77, 300, 901, 1500])
    sampler = OmniglotEpisodes(data, chars, ways=2, shots=1, queries=1, rotations=False, seed=0)
    assert sampler.num_classes == 5
    _, info = sampler.sample_with_info(2000)
    assert int(info.rotations.abs().sum()) == 0
    counts = np.array([(info.characters == c).sum().item() for c in chars])
    assert counts.sum() == 4000
    assert np.all(np.abs(counts - 800) < 100)  # each character in 2/5 of tasks (sd 22)
    first = np.array([(info.characters[:, 0] == c).sum().item() for c in chars])
    assert np.all(np.abs(first - 400) < 80)  # label 0 not tied to one character (sd 18)


def test_meta_train_and_meta_test_disjoint(data: OmniglotData,
                                           split: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = split
    assert np.intersect1d(train, test).size == 0
    tr = OmniglotEpisodes(data, train, 20, 1, 1, seed=0)
    te = OmniglotEpisodes(data, test, 20, 1, 1, seed=0)
    assert tr.num_classes == 4800 and te.num_classes == 1692
    seen_train = np.unique(tr.sample_with_info(64)[1].characters.numpy())
    seen_test = np.unique(te.sample_with_info(64)[1].characters.numpy())
    assert np.isin(seen_train, train).all() and np.isin(seen_test, test).all()
    assert np.intersect1d(seen_train, seen_test).size == 0


def _equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("support_x", "support_y", "query_x", "query_y"))


def test_seeded_reproducible_and_resumable(data: OmniglotData,
                                           split: tuple[np.ndarray, np.ndarray]) -> None:
    make = lambda seed: OmniglotEpisodes(data, split[0], 5, 1, 5, seed=seed)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    first = a.sample(8)
    assert _equal(first, b.sample(8))
    assert not torch.equal(first.support_x, c.sample(8).support_x)

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # the state survives a checkpoint round trip
    expected = [a.sample(8), a.sample(3)]
    resumed = make(0)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert resumed.seed == 7 and resumed.episodes_sampled == 8
    assert all(_equal(e, resumed.sample(len(e))) for e in expected)
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ways": 0}, "ways must be a positive integer"),
    ({"shots": 0}, "shots must be a positive integer"),
    ({"queries": -1}, "queries must be a positive integer"),
    ({"ways": 2.5}, "ways must be a positive integer"),
    ({"shots": 5, "queries": 16}, "exceeds the 20 drawings"),
    ({"ways": 9}, "ways = 9 exceeds the 8 classes of 2 characters with rotations"),
    ({"ways": 3, "rotations": False}, "ways = 3 exceeds the 2 classes"),
    ({"characters": np.array([], dtype=np.int64)}, "non-empty 1-D"),
    ({"characters": np.array([3, 3])}, "must not repeat"),
    ({"characters": np.array([0, 1623])}, r"must lie in \[0, 1623\)"),
    ({"characters": np.array([0.0, 1.0])}, "integer indices"),
])
def test_bad_arguments(data: OmniglotData, kwargs: dict, message: str) -> None:
    args = {"characters": np.array([0, 1]), "ways": 2, "shots": 1, "queries": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        OmniglotEpisodes(data, **args)


def test_bad_batch(data: OmniglotData) -> None:
    sampler = OmniglotEpisodes(data, np.arange(5), 5, 1, 1)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        sampler.sample(0)
