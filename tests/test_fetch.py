"""Zip → npz conversion and download handling, on a small zip pair made from the real npz.

Pillow is imported unconditionally: without it this module fails (it must not be skipped).
"""

from __future__ import annotations

import functools
import http.server
import random
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from metalearn.data import (
    FetchError,
    OmniglotEpisodes,
    convert_zips_to_npz,
    fetch_omniglot,
    find_omniglot,
    load_omniglot,
)
from metalearn.data import fetch as fetch_module
from metalearn.data.fetch import IMAGES105_SHA256, content_sha256, vinyals_split_of

README_KEYS = ["images", "images105", "alphabet", "character", "drawer", "split", "omniglot_id",
               "alphabet_names", "character_names", "char_alphabet", "char_split",
               "char_vinyals_split"]
BACKGROUND = ["Latin/character02", "Greek/character01", "Latin/character01", "Greek/character02"]
EVALUATION = ["Kannada/character01", "Gurmukhi/character42", "Gurmukhi/character41",
              "Kannada/character02"]
SORTED = ["Greek/character01", "Greek/character02", "Latin/character01", "Latin/character02",
          "Gurmukhi/character41", "Gurmukhi/character42", "Kannada/character01",
          "Kannada/character02"]


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    with np.load(find_omniglot(), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write_zip(path: Path, top: str, names: list[str], real: dict[str, np.ndarray]) -> Path:
    """An original-style zip: ``top/<alphabet>/<characterNN>/<XXXX_YY>.png`` in mode '1'."""
    index = {n: i for i, n in enumerate(real["character_names"].tolist())}
    entries = []
    for name in names:
        for row in range(20 * index[name], 20 * index[name] + 20):
            ink = np.unpackbits(real["images105"][row], axis=-1, count=105).astype(bool)
            file = f"{real['omniglot_id'][row]:04d}_{real['drawer'][row] + 1:02d}.png"
            entries.append((f"{top}/{name}/{file}", ink))
    random.Random(0).shuffle(entries)  # the converter must sort, not trust the zip order
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", b"")
        zf.writestr(f"{top}/readme.txt", b"not an image")
        for arcname, ink in entries:
            img = Image.fromarray(~ink)  # paper white (1), ink black (0), as in the originals
            assert img.mode == "1"
            with zf.open(arcname, "w") as fh:
                img.save(fh, format="PNG")
    return path


@pytest.fixture(scope="module")
def zips(tmp_path_factory: pytest.TempPathFactory,
         real: dict[str, np.ndarray]) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zips")
    return (_write_zip(root / "images_background.zip", "images_background", BACKGROUND, real),
            _write_zip(root / "images_evaluation.zip", "images_evaluation", EVALUATION, real))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, zips: tuple[Path, Path]) -> Path:
    out = tmp_path_factory.mktemp("out") / "sub" / "omniglot.npz"
    assert convert_zips_to_npz(*zips, out) == out
    return out


def test_conversion_layout_and_round_trip(converted: Path, real: dict[str, np.ndarray]) -> None:
    assert [p.name for p in converted.parent.iterdir()] == ["omniglot.npz"]  # no temp left
    with np.load(converted, allow_pickle=False) as z:
        assert z.files == README_KEYS
        new = {k: z[k] for k in z.files}
    assert new["character_names"].tolist() == SORTED
    assert new["alphabet_names"].tolist() == ["Greek", "Latin", "Gurmukhi", "Kannada"]
    index = {n: i for i, n in enumerate(real["character_names"].tolist())}
    rows = np.concatenate([np.arange(20 * index[n], 20 * index[n] + 20) for n in SORTED])
    # The original binary pixels come back bit for bit, in the README's row order.
    assert new["images105"].shape == (160, 105, 14) and new["images105"].dtype == np.uint8
    assert np.array_equal(new["images105"], real["images105"][rows])
    assert np.array_equal(new["character"], np.repeat(np.arange(8), 20))
    assert np.array_equal(new["drawer"], np.tile(np.arange(20), 8))
    assert np.array_equal(new["split"], np.repeat([0, 1], 80))
    assert np.array_equal(new["alphabet"], np.repeat([0, 1, 2, 3], 40))
    assert np.array_equal(new["omniglot_id"], real["omniglot_id"][rows])
    assert np.array_equal(new["char_alphabet"], [0, 0, 1, 1, 2, 2, 3, 3])
    assert np.array_equal(new["char_split"], [0, 0, 0, 0, 1, 1, 1, 1])
    # Derived from names: Gurmukhi 41 is train, 42 test; Kannada is test.
    assert np.array_equal(new["char_vinyals_split"], [0, 0, 0, 0, 0, 2, 2, 2])
    for key in ("alphabet", "character", "drawer", "split", "omniglot_id", "char_alphabet",
                "char_split", "char_vinyals_split"):
        assert new[key].dtype == real[key].dtype, key
    # 28×28 LANCZOS images: identical with the Pillow that built the shipped file.
    diff = np.abs(new["images"].astype(int) - real["images"][rows].astype(int))
    assert new["images"].dtype == np.uint8 and new["images"].shape == (160, 28, 28)
    assert diff.max() == 0 if PIL.__version__ == "13.0.0" else diff.max() <= 8


def test_converted_file_loads_and_samples(converted: Path) -> None:
    data = load_omniglot(converted)
    assert data.images.shape == (8, 20, 28, 28)
    tasks = OmniglotEpisodes(data, np.arange(8), ways=5, shots=1, queries=1).sample(2)
    assert tasks.support_x.shape == (2, 5, 1, 28, 28)


def test_names_source_and_vinyals_rule(zips: tuple[Path, Path], tmp_path: Path,
                                       real: dict[str, np.ndarray]) -> None:
    out = convert_zips_to_npz(*zips, tmp_path / "o.npz", names_source=find_omniglot())
    with np.load(out) as z:
        assert np.array_equal(z["char_vinyals_split"], [0, 0, 0, 0, 0, 2, 2, 2])
    # The built-in rule reproduces the real file's split for all 1623 characters.
    derived = [vinyals_split_of(n) for n in real["character_names"].tolist()]
    assert np.array_equal(derived, real["char_vinyals_split"])
    assert vinyals_split_of("Klingon/character01") == -1


def test_incomplete_character_is_rejected(tmp_path: Path, real: dict[str, np.ndarray]) -> None:
    good = _write_zip(tmp_path / "bg.zip", "images_background", ["Latin/character01"], real)
    broken = tmp_path / "ev.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist()[:-1]:  # drop one drawing
            dst.writestr(info.filename.replace("background", "evaluation"), src.read(info))
    with pytest.raises(ValueError, match="Latin/character01"):
        convert_zips_to_npz(good, broken, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_readme_checksum_of_the_real_file(real: dict[str, np.ndarray]) -> None:
    assert content_sha256(real["images105"]) == IMAGES105_SHA256


def test_no_network_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as err:
        fetch_omniglot(tmp_path, base_url="http://127.0.0.1:9/", timeout=5, progress=False)
    msg = str(err.value)
    assert "could not download http://127.0.0.1:9/images_background.zip" in msg
    assert "EDGEMETA_DATA_DIR" in msg and str(tmp_path / "omniglot" / "omniglot.npz") in msg
    assert "convert_zips_to_npz" in msg
    assert not (tmp_path / "omniglot" / "omniglot.npz").exists()


@pytest.fixture()
def server(zips: tuple[Path, Path]) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(zips[0].parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_checks_content_and_installs(server: str, converted: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The served zips are a small subset, so the real checksum must reject them...
    with pytest.raises(FetchError, match="do not match the expected content"):
        fetch_omniglot(tmp_path, base_url=server, progress=False)
    assert not (tmp_path / "omniglot").exists() or not any((tmp_path / "omniglot").iterdir())
    # ...and with the subset's checksum the file is installed where find_omniglot looks.
    with np.load(converted) as z:
        monkeypatch.setattr(fetch_module, "IMAGES105_SHA256", content_sha256(z["images105"]))
    out = fetch_omniglot(tmp_path, base_url=server)
    assert out == tmp_path / "omniglot" / "omniglot.npz" and find_omniglot(tmp_path) == out
    assert "downloading" in capsys.readouterr().err
    with np.load(out) as a, np.load(converted) as b:
        assert all(np.array_equal(a[k], b[k]) for k in README_KEYS)
    # An installed file is kept without touching the network.
    assert fetch_omniglot(tmp_path, base_url="http://127.0.0.1:9/", progress=False) == out


def test_demo_fetches_missing_data_or_says_what_to_do(server: str, converted: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh clone has no data: the demo's data step fetches it where the loader looks,
    checked; without network it stops with what to do instead."""
    from experiments.demo import OMNIGLOT_URL_ENV, ensure_omniglot

    monkeypatch.setenv("EDGEMETA_DATA_DIR", "")  # as `make` exports it without ../shared/data
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(OMNIGLOT_URL_ENV, server)
    with np.load(converted) as z:
        monkeypatch.setattr(fetch_module, "IMAGES105_SHA256", content_sha256(z["images105"]))
    said: list[str] = []
    path = ensure_omniglot(said.append)
    assert path == tmp_path / "cache" / "edgemeta" / "omniglot" / "omniglot.npz"
    assert find_omniglot() == path and load_omniglot(path).images.shape == (8, 20, 28, 28)
    assert said[0].startswith(f"Omniglot not found: fetching it from {server}")
    assert ensure_omniglot(said.append) == path and len(said) == 2  # found: no fetch again

    monkeypatch.setenv("EDGEMETA_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv(OMNIGLOT_URL_ENV, "http://127.0.0.1:9/")  # no network
    with pytest.raises(FetchError) as err:
        ensure_omniglot(said.append, timeout_s=5)
    msg = str(err.value)
    assert msg.startswith("the demo needs Omniglot and could not fetch it: could not download")
    assert "copy omniglot.npz by hand" in msg and "edgemeta data fetch omniglot" in msg
    assert not (tmp_path / "elsewhere" / "omniglot" / "omniglot.npz").exists()
