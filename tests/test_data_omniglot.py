"""Locating, loading and splitting the Omniglot npz (the real file, via EDGEMETA_DATA_DIR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metalearn.data import find_omniglot, load_omniglot, split_characters, standard_split
from metalearn.data.omniglot import ENV_VAR


@pytest.fixture(scope="module")
def npz_path() -> Path:
    return find_omniglot()


@pytest.fixture(scope="module")
def raw(npz_path: Path) -> dict[str, np.ndarray]:
    with np.load(npz_path, allow_pickle=False) as z:
        return {k: z[k] for k in ("images", "images105", "char_vinyals_split", "char_alphabet")}


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def test_find_explicit_file_and_directories(npz_path: Path, tmp_path: Path) -> None:
    assert find_omniglot(npz_path) == npz_path.resolve()
    nested = tmp_path / "a"
    _link(npz_path, nested / "omniglot" / "omniglot.npz")
    assert find_omniglot(nested) == npz_path.resolve()
    flat = tmp_path / "b"
    _link(npz_path, flat / "omniglot.npz")
    assert find_omniglot(str(flat)) == npz_path.resolve()


def test_find_env_then_user_cache(npz_path: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = tmp_path / "env"
    _link(npz_path, env_dir / "omniglot" / "omniglot.npz")
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nothing-here"))
    assert find_omniglot() == npz_path.resolve()

    cache = tmp_path / "xdg"
    _link(npz_path, cache / "edgemeta" / "omniglot" / "omniglot.npz")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty-env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert find_omniglot() == npz_path.resolve()


def test_missing_data_message_names_places_and_fix(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        find_omniglot()
    msg = str(err.value)
    assert str(tmp_path / "cache" / "edgemeta") in msg
    assert "edgemeta data fetch omniglot" in msg and ENV_VAR in msg

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match="env"):
        find_omniglot()
    # An explicit path that does not hold the file is an error, not a fallback.
    with pytest.raises(FileNotFoundError, match="typo"):
        find_omniglot(tmp_path / "typo")


def test_load_shapes_values_and_cache(raw: dict[str, np.ndarray]) -> None:
    data = load_omniglot()
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == torch.float32
    assert data.num_characters == 1623
    assert float(data.images.min()) == 0.0 and float(data.images.max()) == 1.0
    assert abs(float(data.images.mean()) * 255 - 21.4) < 0.05  # README: mean of images is 21.4
    # Row 20*c + d of the file is drawing d of character c.
    for c, d in [(0, 0), (700, 13), (1622, 19)]:
        expected = torch.from_numpy(raw["images"][20 * c + d]).float() / 255
        assert torch.equal(data.images[c, d], expected)
    assert data.char_alphabet.shape == data.char_vinyals_split.shape == (1623,)
    assert len(data.alphabet_names) == 50 and len(data.character_names) == 1623
    assert data.character_names[673] == "Latin/character01"
    assert load_omniglot() is data  # cached: a second sampler does not reload
    assert load_omniglot(data.path) is data


def test_maml_variant_is_binary_nearest_neighbour(raw: dict[str, np.ndarray]) -> None:
    data = load_omniglot(variant="maml")
    assert data.images.shape == (1623, 20, 28, 28)
    assert set(torch.unique(data.images).tolist()) == {0.0, 1.0}
    i = ((np.arange(28) + 0.5) * 105 / 28).astype(int)
    x105 = np.unpackbits(raw["images105"][:40], axis=-1, count=105)
    assert np.array_equal(data.images[:2].reshape(40, 28, 28).numpy(), x105[:, i][:, :, i])
    with pytest.raises(ValueError, match="variant"):
        load_omniglot(variant="bicubic")  # type: ignore[arg-type]


def test_standard_split_counts_and_disjoint() -> None:
    data = load_omniglot()
    train, test = standard_split(data)
    assert len(train) == 1200 and len(test) == 423
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.union1d(train, test), np.arange(1623))
    assert len(split_characters(data, "train")) == 1028
    assert len(split_characters(data, "val")) == 172
    assert np.array_equal(np.union1d(split_characters(data, "train"),
                                     split_characters(data, "val")), train)
    gurmukhi = int(np.flatnonzero(data.alphabet_names == "Gurmukhi")[0])
    on_test = np.isin(np.flatnonzero(data.char_alphabet == gurmukhi), test)
    assert on_test.sum() == 4  # the one alphabet on both sides of the split
    with pytest.raises(ValueError, match="split must be one of"):
        split_characters(data, "dev")  # type: ignore[arg-type]


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _small_valid(chars: int = 2) -> dict[str, np.ndarray]:
    return {
        "images": np.zeros((chars * 20, 28, 28), np.uint8),
        "alphabet_names": np.array(["A"]),
        "character_names": np.array([f"A/character{i + 1:02d}" for i in range(chars)]),
        "char_alphabet": np.zeros(chars, np.int16),
        "char_split": np.zeros(chars, np.int8),
        "char_vinyals_split": np.zeros(chars, np.int8),
    }


def test_malformed_files_raise_clear_errors(tmp_path: Path) -> None:
    ok = load_omniglot(_write(tmp_path / "ok.npz", **_small_valid()))
    assert ok.images.shape == (2, 20, 28, 28)

    missing = _small_valid()
    del missing["char_alphabet"]
    with pytest.raises(ValueError, match=r"missing keys \['char_alphabet'\]"):
        load_omniglot(_write(tmp_path / "missing.npz", **missing))

    bad_shape = _small_valid()
    bad_shape["images"] = np.zeros((39, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="'images' is uint8"):
        load_omniglot(_write(tmp_path / "shape.npz", **bad_shape))

    bad_alpha = _small_valid()
    bad_alpha["char_alphabet"] = np.array([0, 3], np.int16)
    with pytest.raises(ValueError, match="outside 'alphabet_names'"):
        load_omniglot(_write(tmp_path / "alpha.npz", **bad_alpha))

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid Omniglot npz"):
        load_omniglot(tmp_path / "junk.npz")
