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

Partitioners of classes over sites (:func:`partition_classes`, what ``edgemeta data shard``
uses to make the site stores). In few-shot learning the unit is the class (a character with
all its drawings): a class goes whole to one site, and a site needs whole classes to sample
episodes from. The names and behaviour follow Flower Datasets' partitioners, with the class as
the unit and the group (the alphabet) as the label:

* ``alphabet`` (:func:`partition_by_alphabet`): whole alphabets per site, balanced greedily
  (above). The natural non-IID split, like Flower's ``NaturalIdPartitioner`` with the
  alphabet as the natural id.
* ``iid`` (:func:`partition_iid`, Flower's ``IidPartitioner`` over a shuffled data set): the
  classes are shuffled with the seed and cut into near-equal contiguous parts.
* ``dirichlet`` (:func:`partition_dirichlet`, Flower's ``DirichletPartitioner`` with
  ``partition_by`` the alphabet): for each alphabet, its shuffled classes are cut among the
  sites in proportions ``p ~ Dir(alpha)``; small ``alpha`` gives each site few alphabets
  (label skew), large ``alpha`` approaches IID. With ``self_balancing`` (Flower's default) a
  site already above the average number of classes gets no share of later alphabets. If a
  site ends with fewer than ``min_classes`` classes, all proportions are drawn again (at most
  10 more times, then an error that says to raise ``alpha`` or lower ``min_classes``).
* ``quantity`` (:func:`partition_quantity`, quantity skew): sites get unequal numbers of
  classes. Each site first gets ``min_classes``; the remaining classes are shared in
  proportions ``p ~ Dir(alpha)`` (largest remainders round), and the shuffled classes are cut
  into parts of those sizes, so the content of each part is IID and only the size is skewed.

Every partitioner is a pure function of its arguments and the seed; each returns one sorted
array of class ids per site, disjoint and together covering the classes given.
"""

from __future__ import annotations

import math

import numpy as np

from metalearn.data.seeded import positive


def _as_index_array(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
    return arr.astype(np.int64)


def partition_by_alphabet(characters: np.ndarray, char_alphabet: np.ndarray, sites: int,
                          seed: int = 0) -> list[np.ndarray]:
    """Assign whole alphabets to ``sites`` sites; returns each site's sorted character indices.

    ``char_alphabet[c]`` is the alphabet of character ``c`` (indexed by global character id).
    """
    sites = positive("sites", sites)
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
    devices = positive("devices", devices)
    min_classes = positive("min_classes", min_classes)
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
    sites = positive("sites", sites)
    low, high = float(amplitude[0]), float(amplitude[1])
    if not 0 < low <= high:
        raise ValueError(f"amplitude must satisfy 0 < low <= high, got {amplitude}")
    if not phase[0] <= phase[1]:
        raise ValueError(f"phase must satisfy low <= high, got {phase}")
    edges = np.linspace(low, high, sites + 1)
    edges[-1] = high  # exact upper end despite rounding
    return [{"amplitude": (float(edges[i]), float(edges[i + 1])),
             "phase": (float(phase[0]), float(phase[1]))} for i in range(sites)]


PARTITIONERS = ("alphabet", "iid", "dirichlet", "quantity")
MAX_REDRAWS = 10


def _enough(classes: np.ndarray, sites: int, min_classes: int) -> None:
    if classes.size < sites * min_classes:
        raise ValueError(f"{classes.size} classes cannot give {sites} sites min_classes = "
                         f"{min_classes} each")


def partition_iid(classes: np.ndarray, sites: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle the classes with the seed and cut them into ``sites`` near-equal parts."""
    sites = positive("sites", sites)
    chars = _as_index_array("classes", classes)
    _enough(chars, sites, 1)
    shuffled = np.random.default_rng(seed).permutation(chars)
    return [np.sort(part) for part in np.array_split(shuffled, sites)]


def partition_dirichlet(classes: np.ndarray, group_of: np.ndarray, sites: int, alpha: float,
                        seed: int = 0, min_classes: int = 1,
                        self_balancing: bool = True) -> list[np.ndarray]:
    """Per group, its classes spread over the sites in proportions ``Dir(alpha)`` (see the
    module docstring); drawn again while a site has fewer than ``min_classes``."""
    sites = positive("sites", sites)
    min_classes = positive("min_classes", min_classes)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    chars = _as_index_array("classes", classes)
    group = _as_index_array("group_of", group_of)
    _enough(chars, sites, min_classes)
    rng = np.random.default_rng(seed)
    average = chars.size / sites
    groups = np.unique(group[chars])
    for _ in range(MAX_REDRAWS + 1):
        members: list[list[int]] = [[] for _ in range(sites)]
        for g in groups:
            members_g = rng.permutation(chars[group[chars] == g])
            share = rng.dirichlet(np.full(sites, float(alpha)))
            if self_balancing:
                full = np.array([len(m) > average for m in members])
                if not full.all():
                    share = np.where(full, 0.0, share)
                    share = share / share.sum()
            cuts = (np.cumsum(share) * members_g.size).astype(np.int64)[:-1]
            for site, part in enumerate(np.split(members_g, cuts)):
                members[site].extend(int(c) for c in part)
        if min(len(m) for m in members) >= min_classes:
            return [np.sort(np.array(m, dtype=np.int64)) for m in members]
    raise ValueError(f"dirichlet partitioner: after {MAX_REDRAWS + 1} draws with alpha "
                     f"{alpha} a site still had fewer than min_classes = {min_classes} "
                     "classes; raise alpha or lower min_classes")


def partition_quantity(classes: np.ndarray, sites: int, alpha: float, seed: int = 0,
                       min_classes: int = 1) -> list[np.ndarray]:
    """Unequal numbers of IID classes per site: ``min_classes`` each, the rest shared in
    proportions ``Dir(alpha)`` (largest remainders round)."""
    sites = positive("sites", sites)
    min_classes = positive("min_classes", min_classes)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    chars = _as_index_array("classes", classes)
    _enough(chars, sites, min_classes)
    rng = np.random.default_rng(seed)
    spare = chars.size - sites * min_classes
    ideal = rng.dirichlet(np.full(sites, float(alpha))) * spare
    extra = np.floor(ideal).astype(np.int64)
    left = spare - int(extra.sum())
    extra[np.argsort(-(ideal - extra), kind="stable")[:left]] += 1
    sizes = min_classes + extra
    shuffled = rng.permutation(chars)
    return [np.sort(part) for part in np.split(shuffled, np.cumsum(sizes)[:-1])]


def partition_classes(name: str, classes: np.ndarray, group_of: np.ndarray, sites: int,
                      seed: int, alpha: float | None = None, min_classes: int = 1,
                      self_balancing: bool = True) -> list[np.ndarray]:
    """The named partitioner (one of :data:`PARTITIONERS`) over ``classes``; ``group_of[c]`` is
    class ``c``'s group (Omniglot: its alphabet). Each site's part, sorted."""
    if name == "alphabet":
        parts = partition_by_alphabet(classes, group_of, sites, seed)
    elif name == "iid":
        parts = partition_iid(classes, sites, seed)
    elif name == "dirichlet":
        parts = partition_dirichlet(classes, group_of, sites, 0.5 if alpha is None else alpha,
                                    seed, min_classes, self_balancing)
    elif name == "quantity":
        parts = partition_quantity(classes, sites, 1.0 if alpha is None else alpha, seed,
                                   min_classes)
    else:
        raise ValueError(f"unknown partitioner {name!r}; choose one of {', '.join(PARTITIONERS)}")
    small = [i for i, p in enumerate(parts) if p.size < min_classes]
    if small:
        raise ValueError(f"partitioner {name}: sites {small} get fewer than min_classes = "
                         f"{min_classes} classes ({[parts[i].size for i in small]}); use fewer "
                         "sites or another partitioner")
    return parts
