"""Partitions over sites and devices: coverage, disjointness, balance, seeding, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metalearn.data import (
    load_omniglot,
    partition_by_alphabet,
    partition_devices,
    sinusoid_site_ranges,
    standard_split,
)


@pytest.fixture(scope="module")
def omniglot() -> tuple[np.ndarray, np.ndarray]:
    data = load_omniglot()
    return standard_split(data)[0], data.char_alphabet


@pytest.mark.parametrize("sites", [1, 3, 4, 10])
def test_alphabet_partition_of_meta_train(omniglot: tuple[np.ndarray, np.ndarray],
                                          sites: int) -> None:
    chars, alphabet_of = omniglot
    parts = partition_by_alphabet(chars, alphabet_of, sites, seed=0)
    assert len(parts) == sites and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(chars) == 1200
    assert np.array_equal(np.sort(joined), np.sort(chars))  # disjoint and complete
    site_alphabets = [set(alphabet_of[p].tolist()) for p in parts]
    for i in range(sites):  # whole alphabets: no alphabet on two sites
        for j in range(i + 1, sites):
            assert not site_alphabets[i] & site_alphabets[j]
    sizes = [len(p) for p in parts]
    largest_alphabet = max(np.bincount(alphabet_of[chars]))
    assert max(sizes) - min(sizes) <= largest_alphabet  # greedy balance bound
    if sites == 4:
        assert max(sizes) - min(sizes) <= 20  # in practice much closer than the bound


def test_alphabet_partition_seeding(omniglot: tuple[np.ndarray, np.ndarray]) -> None:
    chars, alphabet_of = omniglot
    a = partition_by_alphabet(chars, alphabet_of, 5, seed=1)
    b = partition_by_alphabet(chars, alphabet_of, 5, seed=1)
    c = partition_by_alphabet(chars, alphabet_of, 5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_one_alphabet_per_site_and_too_many_sites() -> None:
    alphabet_of = np.repeat(np.arange(4), [3, 5, 2, 4])
    chars = np.arange(14)
    parts = partition_by_alphabet(chars, alphabet_of, 4, seed=0)
    assert sorted(len(p) for p in parts) == [2, 3, 4, 5]
    assert all(len(set(alphabet_of[p].tolist())) == 1 for p in parts)
    # Greedy balance: sizes 5,4 | 3,2 -> two sites of 7.
    assert sorted(len(p) for p in partition_by_alphabet(chars, alphabet_of, 2)) == [7, 7]
    with pytest.raises(ValueError, match="only 4 alphabets"):
        partition_by_alphabet(chars, alphabet_of, 5)
    with pytest.raises(ValueError, match="sites must be a positive integer"):
        partition_by_alphabet(chars, alphabet_of, 0)
    with pytest.raises(ValueError, match="empty"):
        partition_by_alphabet(np.array([], dtype=np.int64), alphabet_of, 1)
    with pytest.raises(ValueError, match="outside char_alphabet"):
        partition_by_alphabet(np.array([14]), alphabet_of, 1)


def test_devices_disjoint_when_enough_characters() -> None:
    chars = np.arange(100, 147)
    parts = partition_devices(chars, devices=4, seed=0, min_classes=5)
    assert sorted(len(p) for p in parts) == [11, 12, 12, 12]
    assert np.array_equal(np.sort(np.concatenate(parts)), chars)
    again = partition_devices(chars, devices=4, seed=0, min_classes=5)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_devices_overlap_when_too_few_characters() -> None:
    chars = np.arange(12)
    parts = partition_devices(chars, devices=5, seed=3, min_classes=5)
    assert len(parts) == 5 and all(len(p) == 5 == len(set(p.tolist())) for p in parts)
    assert np.array_equal(np.unique(np.concatenate(parts)), chars)  # still covers everything
    with pytest.raises(ValueError, match="cannot give a device min_classes = 5"):
        partition_devices(np.arange(4), devices=2, min_classes=5)
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        partition_devices(chars, devices=0)


def test_sinusoid_site_ranges() -> None:
    ranges = sinusoid_site_ranges(4)
    amps = [r["amplitude"] for r in ranges]
    assert amps[0][0] == 0.1 and amps[-1][1] == 5.0
    assert all(amps[i][1] == amps[i + 1][0] for i in range(3))  # contiguous
    assert all(math.isclose(hi - lo, 4.9 / 4) for lo, hi in amps)
    assert all(r["phase"] == (0.0, math.pi) for r in ranges)
    assert sinusoid_site_ranges(1, amplitude=(1.0, 2.0))[0]["amplitude"] == (1.0, 2.0)
    with pytest.raises(ValueError, match="0 < low <= high"):
        sinusoid_site_ranges(2, amplitude=(0.0, 1.0))
    with pytest.raises(ValueError, match="phase"):
        sinusoid_site_ranges(2, phase=(1.0, 0.0))
    with pytest.raises(ValueError, match="sites must be a positive integer"):
        sinusoid_site_ranges(0)
