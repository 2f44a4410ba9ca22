"""A small image folder made by the test itself: coloured shapes, one class per (shape, colour).

Imported as ``image_folders`` (pytest puts tests/ on sys.path). Images vary in size (16 to 64
pixels a side, rarely square), position, scale, background and colour shade; a quarter of
them are saved grey, and files alternate PNG and JPEG, so a loader meets what a user's folder
holds. Class sizes are unequal (6 to 14 images), and ``small`` classes hold only 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40), "magenta": (210, 50, 200)}
CLASSES = tuple(f"{s}-{c}" for s in SHAPES for c in COLOURS)  # 30
SMALL = ("ring-green", "cross-blue")  # 3 images each: fewer than shots + queries


def _draw(draw: object, shape: str, box: tuple[float, float, float, float],
          fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)  # type: ignore[attr-defined]
    elif shape == "square":
        draw.rectangle(box, fill=fill)  # type: ignore[attr-defined]
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)  # type: ignore[attr-defined]
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)  # type: ignore[attr-defined]
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)  # type: ignore[attr-defined]
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))  # type: ignore[attr-defined]
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)  # type: ignore[attr-defined]


def make_image_folder(root: Path, seed: int = 0, classes: tuple[str, ...] = CLASSES,
                      small: tuple[str, ...] = SMALL) -> dict[str, int]:
    """Write the folder under ``root``; returns the number of images of each class."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    counts = {}
    for i, name in enumerate(classes):
        shape, colour = name.split("-")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        n = 3 if name in small else 6 + (i * 7) % 9
        for j in range(n):
            h, w = (int(v) for v in rng.integers(16, 65, size=2))
            background = tuple(int(v) for v in rng.integers(0, 60, size=3))
            img = Image.new("RGB", (w, h), background)
            side = min(h, w) * rng.uniform(0.55, 0.85)
            x0 = rng.uniform(0, w - side)
            y0 = rng.uniform(0, h - side)
            shade = rng.uniform(0.8, 1.0)
            fill = tuple(int(c * shade) for c in COLOURS[colour])
            _draw(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), fill)
            if j % 4 == 3:
                img = img.convert("L")
            if j % 2:
                img.save(folder / f"{j:03d}.jpg", quality=90)
            else:
                img.save(folder / f"{j:03d}.png")
        counts[name] = n
    return counts
