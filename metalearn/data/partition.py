"""Splitting the meta-training data across edge sites and, within a site, across devices.

* **Omniglot sites** (:func:`partition_by_alphabet`): non-IID by construction. Each alphabet
  goes whole to one site, so sites see different scripts, as edge sites in different regions
  would. Alphabets are shuffled with the seed, then placed largest first on the site with the
  fewest characters so far (greedy longest-processing-time; the shuffle breaks ties between
  equal sizes), which keeps the character counts close. Every site gets at least one alphabet.
* **Devices of a site** (:func:`partition_devices`): the site's characters are shuffled with
  the seed and cut into ``devices`` disjoint, near-equal parts. If the site has fewer than
  ``devices * min_classes`` characters, disjoint parts would be too small to sample tasks
  from, so each device instead gets a window of ``min_classes`` consecutive characters of the
  shuffled list, with windows spread evenly (wrapping around): parts then **overlap**, and
  together they still cover every character.
* **Sinusoid sites** (:func:`sinusoid_site_ranges`): the amplitude range is cut into equal,
  contiguous sub-ranges, one per site (site 0 has the smallest amplitudes); the phase range is
  shared.
"""

from __future__ import annotations

import math

import numpy as np


def _as_index_array(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
    return arr.astype(np.int64)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def partition_by_alphabet(characters: np.ndarray, char_alphabet: np.ndarray, sites: int,
                          seed: int = 0) -> list[np.ndarray]:
    """Assign whole alphabets to ``sites`` sites; returns each site's sorted character indices.

    ``char_alphabet[c]`` is the alphabet of character ``c`` (indexed by global character id).
    """
    sites = _positive("sites", sites)
    chars = _as_index_array("characters", characters)
    if chars.size == 0:
        raise ValueError("characters is empty: nothing to partition")
    alphabet_of = _as_index_array("char_alphabet", char_alphabet)
    if chars.min() < 0 or chars.max() >= alphabet_of.size:
        raise ValueError("characters index outside char_alphabet")
    alphabets = np.unique(alphabet_of[chars])
    if sites > alphabets.size:
        raise ValueError(f"cannot give {sites} sites a whole alphabet each: the characters "
                         f"span only {alphabets.size} alphabets")
    rng = np.random.default_rng(seed)
    order = rng.permutation(alphabets)
    sizes = np.array([np.count_nonzero(alphabet_of[chars] == a) for a in order])
    order = order[np.argsort(-sizes, kind="stable")]
    members: list[list[int]] = [[] for _ in range(sites)]
    load = np.zeros(sites, dtype=np.int64)
    for alphabet in order:
        site = int(np.argmin(load))  # lowest index among the least loaded: deterministic
        members[site].append(int(alphabet))
        load[site] += np.count_nonzero(alphabet_of[chars] == alphabet)
    return [np.sort(chars[np.isin(alphabet_of[chars], m)]) for m in members]


def partition_devices(characters: np.ndarray, devices: int, seed: int = 0,
                      min_classes: int = 5) -> list[np.ndarray]:
    """Split one site's characters over ``devices`` virtual clients (see module docstring).

    Parts are disjoint when every device can have ``min_classes`` characters of its own, and
    overlapping windows otherwise. Each part is sorted.
    """
    devices = _positive("devices", devices)
    min_classes = _positive("min_classes", min_classes)
    chars = _as_index_array("characters", characters)
    if chars.size < min_classes:
        raise ValueError(f"a site with {chars.size} characters cannot give a device "
                         f"min_classes = {min_classes} characters")
    shuffled = np.random.default_rng(seed).permutation(chars)
    n = shuffled.size
    if n >= devices * min_classes:
        return [np.sort(part) for part in np.array_split(shuffled, devices)]
    starts = (np.arange(devices) * n) // devices
    return [np.sort(shuffled[(s + np.arange(min_classes)) % n]) for s in starts]


def sinusoid_site_ranges(sites: int, amplitude: tuple[float, float] = (0.1, 5.0),
                         phase: tuple[float, float] = (0.0, math.pi)) -> list[dict]:
    """Per-site keyword arguments for :class:`~metalearn.data.sinusoid.SinusoidTasks`:
    ``{"amplitude": (low, high), "phase": phase}`` with contiguous amplitude sub-ranges."""
    sites = _positive("sites", sites)
    low, high = float(amplitude[0]), float(amplitude[1])
    if not 0 < low <= high:
        raise ValueError(f"amplitude must satisfy 0 < low <= high, got {amplitude}")
    if not phase[0] <= phase[1]:
        raise ValueError(f"phase must satisfy low <= high, got {phase}")
    edges = np.linspace(low, high, sites + 1)
    edges[-1] = high  # exact upper end despite rounding
    return [{"amplitude": (float(edges[i]), float(edges[i + 1])),
             "phase": (float(phase[0]), float(phase[1]))} for i in range(sites)]
