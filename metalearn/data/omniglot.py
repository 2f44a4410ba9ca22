"""Omniglot as one in-memory tensor, read from the project's compact ``omniglot.npz``.

The npz (see ``shared/data/omniglot/README.md``) holds every character's 20 drawings with rows
sorted by character, so the whole set reshapes to ``[characters, 20, 28, 28]`` and a task
sampler can gather an episode with one indexing operation instead of decoding files.

Where the file is looked for, in order: an explicit path, ``$EDGEMETA_DATA_DIR``, then the user
cache (``$XDG_CACHE_HOME/edgemeta`` or ``~/.cache/edgemeta``). In a directory, both
``omniglot/omniglot.npz`` and ``omniglot.npz`` are accepted.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

ENV_VAR = "EDGEMETA_DATA_DIR"
FILE_NAME = "omniglot.npz"
DRAWERS = 20
IMAGE_SIZE = 28

Variant = Literal["lanczos", "maml"]
Split = Literal["train", "val", "test", "trainval"]

# Keys the loader needs, with the dimensionality each must have.
_REQUIRED = {
    "images": 3,
    "alphabet_names": 1,
    "character_names": 1,
    "char_alphabet": 1,
    "char_split": 1,
    "char_vinyals_split": 1,
}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgemeta``, else ``~/.cache/edgemeta``: where ``fetch`` puts data."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgemeta"


def _in_location(location: Path) -> Path | None:
    """The npz at ``location`` if it is the file itself or a directory holding it."""
    if location.is_file():
        return location
    for candidate in (location / "omniglot" / FILE_NAME, location / FILE_NAME):
        if candidate.is_file():
            return candidate
    return None


def find_omniglot(path: str | Path | None = None) -> Path:
    """Locate ``omniglot.npz``: explicit path, then ``$EDGEMETA_DATA_DIR``, then the user cache.

    An explicit path that holds no npz is an error even if another location would have one,
    so a typo never silently picks up a different copy.
    """
    if path is not None:
        places = [Path(path).expanduser()]
    else:
        places = []
        env = os.environ.get(ENV_VAR)
        if env:
            places.append(Path(env).expanduser())
        places.append(user_cache_dir())
    for place in places:
        found = _in_location(place)
        if found is not None:
            return found.resolve()
    looked = ", ".join(
        f"{p} (as {FILE_NAME}, omniglot/{FILE_NAME} or the file itself)" for p in places
    )
    hint = "" if path is not None or os.environ.get(ENV_VAR) else f" ({ENV_VAR} is not set)"
    raise FileNotFoundError(
        f"Omniglot data not found; looked in: {looked}{hint}. Run `edgemeta data fetch omniglot` "
        f"to download and convert it, or set {ENV_VAR} to a directory holding "
        f"omniglot/{FILE_NAME}."
    )


@dataclass(frozen=True, eq=False)
class OmniglotData:
    """All characters' drawings plus the metadata the standard splits and partitions need.

    ``pixels[c, d]`` is drawing ``d`` of character ``c`` as stored (uint8, ink = 255); samplers
    convert only the drawings they pick (:meth:`drawings`). Kept as uint8 because every process
    that samples (each edge actor, a serving replica, a meta-test task) holds its own copy:
    float32 would cost 102 MB more in each. ``char_alphabet`` indexes ``alphabet_names``;
    ``char_vinyals_split`` is 0 = train, 1 = val, 2 = test (-1 where unknown, e.g. a file
    converted from a partial zip set).
    """

    pixels: torch.Tensor
    char_alphabet: np.ndarray
    char_split: np.ndarray
    char_vinyals_split: np.ndarray
    alphabet_names: np.ndarray
    character_names: np.ndarray
    path: Path
    variant: Variant = "lanczos"

    @property
    def num_characters(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def images(self) -> torch.Tensor:
        """Every drawing as float32 in [0, 1], ``[chars, 20, 28, 28]`` (a full copy: 102 MB)."""
        return to_float(self.pixels)

    def drawings(self, rows: torch.Tensor) -> torch.Tensor:
        """Drawings by flat row (``character * 20 + drawer``) as float32 ``[n, 28, 28]``."""
        flat = self.pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        return to_float(flat.index_select(0, rows.reshape(-1)))


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ink (255) to float32 ink (1.0): the one conversion every path uses."""
    return pixels.float().div_(255.0)


_cache: dict[tuple[Path, int, int, str], OmniglotData] = {}
_cache_lock = threading.Lock()


def _malformed(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid Omniglot npz: {why}. Re-create it with "
        f"`edgemeta data fetch omniglot` (see shared/data/omniglot/README.md for the layout)."
    )


def _maml_images(images105: np.ndarray) -> np.ndarray:
    """Binary nearest-neighbour 28×28 samples, as cbfinn/maml's Pillow resize really produced."""
    idx = ((np.arange(IMAGE_SIZE) + 0.5) * 105 / IMAGE_SIZE).astype(np.int64)
    rows = np.unpackbits(images105[:, idx], axis=-1, count=105)  # pick rows before unpacking
    return rows[:, :, idx] * np.uint8(255)


def _read(path: Path, variant: Variant) -> OmniglotData:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _malformed(path, f"cannot be read as npz ({err})") from err
    with npz:
        missing = sorted(set(_REQUIRED) - set(npz.files))
        if variant == "maml" and "images105" not in npz.files:
            missing.append("images105")
        if missing:
            raise _malformed(path, f"missing keys {missing}")
        arrays = {k: npz[k] for k in _REQUIRED if k != "images"}
        arrays["images"] = npz["images"] if variant == "lanczos" else _maml_images(
            npz["images105"])
    for key, ndim in _REQUIRED.items():
        if arrays[key].ndim != ndim:
            raise _malformed(path, f"{key!r} has shape {arrays[key].shape}, expected {ndim}-D")
    images, names = arrays["images"], arrays["character_names"]
    chars = len(names)
    if chars == 0:
        raise _malformed(path, "it holds no characters")
    if images.shape != (chars * DRAWERS, IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise _malformed(path, f"'images' is {images.dtype}{list(images.shape)}, expected "
                               f"uint8[{chars * DRAWERS}, {IMAGE_SIZE}, {IMAGE_SIZE}]")
    for key in ("char_alphabet", "char_split", "char_vinyals_split"):
        if arrays[key].shape != (chars,):
            raise _malformed(path, f"{key!r} has shape {arrays[key].shape}, expected ({chars},)")
    alphabet = arrays["char_alphabet"].astype(np.int64)
    if alphabet.min() < 0 or alphabet.max() >= len(arrays["alphabet_names"]):
        raise _malformed(path, "'char_alphabet' points outside 'alphabet_names'")
    tensor = torch.from_numpy(images).reshape(chars, DRAWERS, IMAGE_SIZE, IMAGE_SIZE)
    return OmniglotData(
        pixels=tensor,
        char_alphabet=alphabet,
        char_split=arrays["char_split"].astype(np.int64),
        char_vinyals_split=arrays["char_vinyals_split"].astype(np.int64),
        alphabet_names=arrays["alphabet_names"],
        character_names=names,
        path=path,
        variant=variant,
    )


def load_omniglot(path: str | Path | None = None, variant: Variant = "lanczos") -> OmniglotData:
    """Load (once per process, per file and variant) the Omniglot npz as float tensors.

    ``variant="lanczos"`` gives the npz's antialiased 28×28 images; ``"maml"`` gives the binary
    nearest-neighbour images that cbfinn/maml actually trained on (see the README's caveat).
    The cache key includes the file's size and mtime, so a replaced file is read again.
    """
    if variant not in ("lanczos", "maml"):
        raise ValueError(f"variant must be 'lanczos' or 'maml', not {variant!r}")
    found = find_omniglot(path)
    stat = found.stat()
    key = (found, stat.st_size, stat.st_mtime_ns, variant)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _read(found, variant)
        return _cache[key]


def split_characters(data: OmniglotData, split: Split) -> np.ndarray:
    """Character indices of one part of the Vinyals et al. / ProtoNets split.

    ``train`` (1028), ``val`` (172), ``test`` (423), or ``trainval`` (1200, the usual
    meta-training set when no validation is held out).
    """
    codes = {"train": (0,), "val": (1,), "test": (2,), "trainval": (0, 1)}
    if split not in codes:
        raise ValueError(f"split must be one of {sorted(codes)}, not {split!r}")
    if (data.char_vinyals_split < 0).any():
        raise ValueError(f"{data.path} has characters with an unknown Vinyals split (-1); "
                         "the standard split needs the full Omniglot set")
    return np.flatnonzero(np.isin(data.char_vinyals_split, codes[split]))


def standard_split(data: OmniglotData) -> tuple[np.ndarray, np.ndarray]:
    """(meta-train, meta-test) characters: Vinyals train+val (1200) and test (423)."""
    return split_characters(data, "trainval"), split_characters(data, "test")
