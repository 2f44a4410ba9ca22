"""Rebuild ``omniglot.npz`` from the original Omniglot zips (brendenlake/omniglot, ``python/``).

The zips hold ``<alphabet>/<characterNN>/<XXXX_YY>.png`` (105×105, black ink on white). The npz
rows are sorted by (split, alphabet name, character name, drawer) with ``drawer = YY - 1``, as
the README of ``shared/data/omniglot`` describes, so a rebuilt file has the same content as the
shipped one; :func:`fetch_omniglot` checks that with the ``images105`` content checksum.

``char_vinyals_split`` is derived from names: the Vinyals / ProtoNets split is whole alphabets
except Gurmukhi (characters 42–45 are test, the rest train), which the table below encodes.
Characters of an alphabet not among the 50 known ones get -1. ``names_source`` (an existing
npz) overrides this with the split it records for each character name.

Pillow is needed only here, and is imported lazily.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from metalearn.data.omniglot import DRAWERS, FILE_NAME, IMAGE_SIZE, user_cache_dir

IMAGES105_SHA256 = "43f3e5e604f5d4ba93a120ae07a0525c7b3513d558c5952e9e531bc7fc798ce3"
# Pinned to the commit the README cites, so the bytes cannot change under us.
DEFAULT_BASE_URL = (
    "https://raw.githubusercontent.com/brendenlake/omniglot/"
    "057f034baf2ecb8530bc5710e5a23584d2a519cc/python/"
)
ZIP_NAMES = ("images_background.zip", "images_evaluation.zip")
SIDE = 105

_VAL_ALPHABETS = frozenset(
    {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
)
_TEST_ALPHABETS = frozenset({
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
})
_TEST_CHARACTERS = frozenset(f"Gurmukhi/character{n}" for n in (42, 43, 44, 45))
_TRAIN_ALPHABETS = frozenset({
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Asomtavruli_(Georgian)",
    "Balinese", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille", "Burmese_(Myanmar)",
    "Cyrillic", "Futurama", "Grantha", "Greek", "Gujarati",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)", "Japanese_(katakana)",
    "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Sanskrit", "Syriac_(Estrangelo)", "Tagalog", "Tifinagh", "Angelic", "Atemayar_Qelisayer",
    "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic", "Gurmukhi",
})

_FILE_RE = re.compile(r"^(\d{4})_(\d{2})\.png$")


class FetchError(RuntimeError):
    """Downloading or checking the Omniglot data failed; the message says how to do it by hand."""


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - exercised only without Pillow
        raise ImportError(
            "converting the Omniglot zips needs Pillow: `pip install pillow` "
            "(or install edgemeta with its `data` extra)"
        ) from err
    return Image


def vinyals_split_of(character_name: str) -> int:
    """Vinyals split of ``Alphabet/characterNN``: 0 = train, 1 = val, 2 = test, -1 = unknown."""
    alphabet = character_name.split("/", 1)[0]
    if character_name in _TEST_CHARACTERS or alphabet in _TEST_ALPHABETS:
        return 2
    if alphabet in _VAL_ALPHABETS:
        return 1
    return 0 if alphabet in _TRAIN_ALPHABETS else -1


def _read_zip(zip_path: Path, image_module: Any) -> list[tuple[str, str, int, int, np.ndarray]]:
    """(alphabet, character, drawer, omniglot id, ink bool[105,105]) for each PNG in the zip."""
    rows = []
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or len(parts) < 3 or parts[0].startswith("__MACOSX"):
                continue
            match = _FILE_RE.match(parts[-1])
            if match is None:
                continue
            with zf.open(info) as fh, image_module.open(fh) as img:
                grey = np.asarray(img.convert("L"))
            if grey.shape != (SIDE, SIDE):
                raise ValueError(f"{zip_path}:{info.filename} is {grey.shape}, not 105×105")
            rows.append((parts[-3], parts[-2], int(match[2]) - 1, int(match[1]), grey < 128))
    if not rows:
        raise ValueError(f"{zip_path} holds no <alphabet>/<character>/XXXX_YY.png images")
    return rows


def _resize28(ink: np.ndarray, image_module: Any) -> np.ndarray:
    grey = image_module.fromarray(ink.astype(np.uint8) * 255)  # uint8 2-D: mode L
    return np.asarray(grey.resize((IMAGE_SIZE, IMAGE_SIZE), image_module.LANCZOS))


def _names_lookup(names_source: str | Path) -> dict[str, int]:
    with np.load(names_source, allow_pickle=False) as z:
        return dict(zip(z["character_names"].tolist(),
                        z["char_vinyals_split"].astype(int).tolist(), strict=True))


def _name_of(key: tuple[int, str, str]) -> str:
    return f"{key[1]}/{key[2]}"


def build_arrays(background_zip: str | Path, evaluation_zip: str | Path,
                 names_source: str | Path | None = None) -> dict[str, np.ndarray]:
    """The npz's arrays (README layout, same key order) built from the two zips."""
    image_module = _pillow()
    rows = [(split, *row) for split, z in enumerate((background_zip, evaluation_zip))
            for row in _read_zip(Path(z), image_module)]
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))

    keys = [(r[0], r[1], r[2]) for r in rows]
    char_keys = sorted(set(keys))
    char_index = {k: i for i, k in enumerate(char_keys)}
    alphabet_keys = sorted({(s, a) for s, a, _ in char_keys})
    alphabet_index = {k: i for i, k in enumerate(alphabet_keys)}

    character = np.array([char_index[k] for k in keys], dtype=np.int16)
    counts = np.bincount(character, minlength=len(char_keys))
    drawers = np.array([r[3] for r in rows], dtype=np.int8)
    pairs = character.astype(np.int64) * DRAWERS + drawers
    if ((counts != DRAWERS).any() or drawers.min() < 0 or drawers.max() >= DRAWERS
            or np.unique(pairs).size != pairs.size):
        bad = sorted({_name_of(k) for k, r in zip(keys, rows, strict=True)
                      if counts[char_index[k]] != DRAWERS or not 0 <= r[3] < DRAWERS})[:5]
        raise ValueError(f"every character needs drawers _01.._{DRAWERS:02d} exactly once; "
                         f"not so for {bad or 'a character listed twice'}")

    ink = np.stack([r[5] for r in rows])
    names = [_name_of(k) for k in char_keys]
    lookup = _names_lookup(names_source) if names_source is not None else {}
    return {
        "images": np.stack([_resize28(x, image_module) for x in ink]),
        "images105": np.packbits(ink, axis=-1),
        "alphabet": np.array([alphabet_index[(r[0], r[1])] for r in rows], dtype=np.int16),
        "character": character,
        "drawer": drawers,
        "split": np.array([r[0] for r in rows], dtype=np.int8),
        "omniglot_id": np.array([r[4] for r in rows], dtype=np.int16),
        "alphabet_names": np.array([a for _, a in alphabet_keys]),
        "character_names": np.array(names),
        "char_alphabet": np.array([alphabet_index[(s, a)] for s, a, _ in char_keys],
                                  dtype=np.int16),
        "char_split": np.array([s for s, _, _ in char_keys], dtype=np.int8),
        "char_vinyals_split": np.array([lookup.get(n, vinyals_split_of(n)) for n in names],
                                       dtype=np.int8),
    }


def content_sha256(array: np.ndarray) -> str:
    """The README's content checksum: sha256 of the C-contiguous array bytes."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _write_atomic(arrays: dict[str, np.ndarray], out_path: Path) -> None:
    """Write to a temporary file beside ``out_path`` and rename, so readers never see half."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_zips_to_npz(background_zip: str | Path, evaluation_zip: str | Path,
                        out_path: str | Path, names_source: str | Path | None = None) -> Path:
    """Convert the two original zips into the compact npz at ``out_path`` (written atomically).

    Works for a partial zip set too (e.g. a few alphabets); see the module docstring for how
    ``char_vinyals_split`` is filled in then.
    """
    out = Path(out_path)
    _write_atomic(build_arrays(background_zip, evaluation_zip, names_source), out)
    return out


def _download(url: str, dest: Path, timeout: float, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
                done += len(chunk)
                pct = done * 100 // total if total else -1
                if progress and (pct // 10 != shown // 10 or not total):
                    shown = pct
                    size = f"{done / 2**20:.1f} MiB" + (f" / {total / 2**20:.1f} MiB" if total
                                                        else "")
                    print(f"  {dest.name}: {size}", file=sys.stderr, flush=True)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise FetchError(f"could not download {url}: {getattr(err, 'reason', err)}") from err


def fetch_omniglot(dest_dir: str | Path | None = None, base_url: str = DEFAULT_BASE_URL,
                   timeout: float = 60.0, force: bool = False, progress: bool = True) -> Path:
    """Download the original zips, convert them, check the content checksum, and install.

    The result is ``<dest_dir>/omniglot/omniglot.npz`` (``dest_dir`` defaults to the user cache
    that :func:`~metalearn.data.omniglot.find_omniglot` searches). An existing file is kept
    unless ``force``. Nothing is written if a download or the checksum fails.
    """
    root = Path(dest_dir).expanduser() if dest_dir is not None else user_cache_dir()
    out = root / "omniglot" / FILE_NAME
    if out.is_file() and not force:
        return out
    _pillow()  # fail before a long download, not after
    url_root = base_url if base_url.endswith("/") else base_url + "/"
    work = Path(tempfile.mkdtemp(prefix="edgemeta-omniglot-"))
    try:
        zips = [work / name for name in ZIP_NAMES]
        for path in zips:
            if progress:
                print(f"downloading {url_root}{path.name}", file=sys.stderr, flush=True)
            try:
                _download(url_root + path.name, path, timeout, progress)
            except FetchError as err:
                raise FetchError(
                    f"{err}. Without network access, copy omniglot.npz by hand to {out} "
                    f"(or to <dir>/omniglot/{FILE_NAME} and set EDGEMETA_DATA_DIR=<dir>), or "
                    f"download {' and '.join(ZIP_NAMES)} from {url_root} elsewhere and run "
                    f"metalearn.data.fetch.convert_zips_to_npz(background, evaluation, '{out}')."
                ) from err
        if progress:
            print("converting 32,460 images", file=sys.stderr, flush=True)
        arrays = build_arrays(*zips)
        digest = content_sha256(arrays["images105"])
        if digest != IMAGES105_SHA256:
            raise FetchError(f"the downloaded images do not match the expected content "
                             f"(images105 sha256 {digest}, expected {IMAGES105_SHA256}); "
                             f"nothing was written to {out}")
        _write_atomic(arrays, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"wrote {out}", file=sys.stderr, flush=True)
    return out
