"""The user's own images: one folder per class, image files inside, as a few-shot data set.

::

    root/
      cat/      001.png  002.jpg  ...     a class: any number of images, any size,
      dog/      a.jpeg   b.png    ...     grey or colour (PNG, JPEG, BMP, GIF, WebP, TIFF)
      ...

Class names are the folder names (hidden folders and files of other kinds are skipped; images
in sub-folders of a class folder belong to that class). Every image is converted to the
configured channels (``L`` grey or ``RGB``: colour images become grey by luminance, grey
images are repeated over three channels, an alpha channel is dropped) and resized to
``image_size`` with Pillow's Lanczos filter (the aspect ratio is not kept: crop beforehand
if it matters). The result is held as :class:`~metalearn.data.class_episodes.ClassImages`
(uint8), read once per process and folder state (looked at again at most every 30 s), and
sampled by :class:`~metalearn.data.class_episodes.ClassEpisodes`.

Config (``data``): ``dataset: image_folder``, ``root``, ``image_size`` (an int, or
``[height, width]``), ``channels`` (1 or 3), ``split`` (``test_fraction`` + ``seed``, or
``test_classes`` by name), plus ``ways``, ``shots``, ``queries``. Pillow comes with the
``data`` extra (``pip install 'edgemeta[data]'``).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalearn.data.class_episodes import ClassImages
from metalearn.data.errors import DataSetError
from metalearn.data.source import ClassSource

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageFolderError(DataSetError):
    """An image folder that cannot be used; the message names the setting and the files."""


def image_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``image_size`` as (height, width): an int is a square."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    else:
        try:
            h, w = (int(v) for v in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ImageFolderError(f"data.image_size must be an int or [height, width], "
                                   f"not {size!r}") from None
        hw = (h, w)
    if min(hw) < 1:
        raise ImageFolderError(f"data.image_size must be positive, got {size!r}")
    return hw


def class_files(root: str | Path) -> dict[str, list[Path]]:
    """Each class folder's image files (sorted), classes sorted by name."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ImageFolderError(f"data.root: {folder} {what} (an image folder holds one "
                               "sub-folder per class, image files inside)")
    classes = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            classes[entry.name] = sorted(
                p for p in entry.rglob("*")
                if p.suffix.lower() in EXTENSIONS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(entry).parts))
    if not classes:
        raise ImageFolderError(f"data.root: {folder} holds no class folders (one sub-folder "
                               "per class, image files inside)")
    return classes


def _fingerprint(files: dict[str, list[Path]]) -> str:
    """Changes whenever a file is added, removed, replaced or touched."""
    h = hashlib.sha256()
    for name, paths in files.items():
        h.update(name.encode() + b"\0")
        for p in paths:
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _decode(path: Path, hw: tuple[int, int], mode: str) -> np.ndarray | str:
    """One image as ``uint8 [C, H, W]``, or why it could not be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                img = img.convert("RGBA")
            resized = img.convert(mode).resize((hw[1], hw[0]), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    arr = np.asarray(resized, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(root: str | Path, image_size: int | tuple[int, int] = 28,
                      channels: int = 1, threads: int | None = None) -> ClassImages:
    """Read every class folder of ``root`` into :class:`ClassImages` (cached per process,
    keyed by the folder's files, sizes and modification times, the size and channels; the
    files are looked at again at most every :data:`RECHECK_S` seconds)."""
    if channels not in (1, 3):
        raise ImageFolderError(f"data.channels must be 1 (grey) or 3 (RGB), not {channels!r}")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImageFolderError("reading an image folder needs Pillow: pip install "
                               "'edgemeta[data]'") from None
    hw = image_hw(image_size)
    place = (str(Path(root).expanduser().resolve()), hw, channels)
    with _cache_lock:  # every sampler asks (a device, each round): look at the files seldom
        looked = _looked.get(place)
        if looked is not None and time.monotonic() - looked[0] < RECHECK_S:
            return looked[1]
    files = class_files(root)
    key = (*place, _fingerprint(files))
    with _cache_lock:
        if key in _cache:
            _looked[place] = (time.monotonic(), _cache[key])
            return _cache[key]
    paths = [p for ps in files.values() for p in ps]
    if not paths:
        raise ImageFolderError(f"data.root: the class folders of {root} hold no image files "
                               f"(looked for {', '.join(sorted(EXTENSIONS))})")
    mode = "L" if channels == 1 else "RGB"
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow decodes and resizes without the GIL
        decoded = list(pool.map(lambda p: _decode(p, hw, mode), paths))
    bad = [(p, why) for p, why in zip(paths, decoded, strict=True) if isinstance(why, str)]
    if bad:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ImageFolderError(f"data.root: {len(bad)} file(s) could not be read as images: "
                               f"{shown}{more} (remove or fix them)")
    pixels = torch.from_numpy(np.stack(decoded))  # type: ignore[arg-type]
    counts = [len(ps) for ps in files.values()]
    images = ClassImages(pixels, np.concatenate([[0], np.cumsum(counts)]), tuple(files))
    with _cache_lock:
        _cache[key] = images
        _looked[place] = (time.monotonic(), images)
    return images


#: Seconds during which a folder already read is served from memory without listing its
#: files again (listing and stat-ing a large folder for every sampler built would dominate).
RECHECK_S = 30.0
_cache: dict[tuple[str, tuple[int, int], int, str], ClassImages] = {}
_looked: dict[tuple[str, tuple[int, int], int], tuple[float, ClassImages]] = {}
_cache_lock = threading.Lock()


class ImageFolderSource(ClassSource):
    """``dataset: image_folder``: the classes of ``data.root`` (see the module docstring);
    meta-test classes by ``data.split``, sites get whole classes (seeded IID split)."""

    name = "image_folder"

    def check(self, data: Mapping[str, Any]) -> None:
        if not data.get("root"):
            raise ValueError("data.root is required for dataset image_folder: the folder "
                             "holding one sub-folder per class")
        if data.get("channels", 1) not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), not "
                             f"{data.get('channels')!r}")
        image_hw(data.get("image_size") or 28)

    def input_shape(self, data: Mapping[str, Any]) -> tuple[int, ...]:
        return (int(data.get("channels") or 1), *image_hw(data.get("image_size") or 28))

    def describe(self, data: Mapping[str, Any]) -> str:
        return f"data.root {data['root']}"

    def images(self, data: Mapping[str, Any]) -> ClassImages:
        return load_image_folder(data["root"], data.get("image_size") or 28,
                                 int(data.get("channels") or 1))
