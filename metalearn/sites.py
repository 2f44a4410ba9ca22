"""Where a site's tasks come from, in pure torch: its partition of the data, split over its
virtual clients (devices), and per-round samplers seeded so that anyone can redraw them.

A site's data is its own store (:mod:`metalearn.data.store`: only its Omniglot characters, made
by ``edgemeta data shard``), or a sinusoid amplitude sub-range, split further over the site's
devices. The cloud plans from what each site reports of its store, its manifest (class counts
and names, never examples): :func:`plan_from_manifests` chooses the held-out classes in the
site's own class ids. :func:`plan_sites` is the same plan made from the whole source data set
in global character ids (the alphabet partitioner): what an in-process reference of a test
uses; a plan without a ``store`` reads the source data set, a plan with one reads the store.

The tasks a device samples in a round are a pure function of ``(seed, site, device, round)``:
each round builds the device's sampler from a seed derived from those four numbers. A
restarted actor, a resumed run and a centralized reference therefore all see the same tasks,
with no sampler state to carry around.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from metalearn.tasks import TaskBatch

SampleTasks = Callable[[int], TaskBatch]

# Stream tags: training rounds, the held-out personalization tasks, the device split, a
# malicious site's own randomness (metalearn.attacks), compression and the tasks a site
# personalizes its model on never share a seed.
_ROUND, _HOLDOUT, _DEVICES, _ATTACK, _COMPRESSION, _PERSONAL = 0, 1, 2, 3, 4, 5


def site_seed(seed: int, site: str, *extra: int) -> int:
    """A 32-bit seed from the run seed, the site's name and further integers.

    The site enters by a CRC of its name, not by its position in the topology, so adding or
    reordering sites leaves every other site's task stream unchanged.
    """
    words = [int(seed) & 0xFFFFFFFF, zlib.crc32(site.encode()), *(int(e) for e in extra)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def round_seed(seed: int, site: str, device: int, round_idx: int) -> int:
    """Seed of device ``device`` of ``site`` in round ``round_idx``."""
    return site_seed(seed, site, _ROUND, device, round_idx)


def attack_seed(seed: int, site: str, round_idx: int) -> int:
    """Seed of a malicious site's own draws in round ``round_idx`` (its Gaussian update): a
    function of (seed, site, round), so an attacked run resumes and repeats exactly."""
    return site_seed(seed, site, _ATTACK, round_idx)


def compression_seed(seed: int, site: str, round_idx: int) -> int:
    """Seed of a site's stochastic rounding in round ``round_idx`` (int8 compression): a
    function of (seed, site, round), so a compressed run resumes and repeats exactly."""
    return site_seed(seed, site, _COMPRESSION, round_idx)


# --------------------------------------------------------------------------- site partitions

def _holdout_split(site: str, characters: np.ndarray, fraction: float, minimum: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) characters of a site: a seeded ``fraction`` of its characters, at
    least ``minimum``, is kept for measuring personalization and never trained on."""
    if fraction <= 0:
        return np.sort(characters), np.array([], dtype=np.int64)
    n = characters.size
    k = max(minimum, math.ceil(fraction * n))
    if n - k < minimum:
        raise ValueError(f"site {site} has {n} characters: too few to hold out {k} and still "
                         f"train on {minimum} (lower holdout_fraction or use fewer sites)")
    perm = np.random.default_rng(site_seed(seed, site, _HOLDOUT)).permutation(characters)
    return np.sort(perm[k:]), np.sort(perm[:k])


def plan_sites(data: Mapping[str, Any], sites: Sequence[str], seed: int,
               holdout_fraction: float = 0.2) -> dict[str, dict[str, Any]]:
    """Each site's share of the meta-training set, as plain ints, floats and strings.

    The data set (:mod:`metalearn.data.registry`) partitions it: Omniglot gives whole
    alphabets of the 1200 meta-training characters per site
    (:func:`~metalearn.data.partition.partition_by_alphabet`, non-IID), an image folder a
    seeded share of its whole classes, sinusoid a contiguous amplitude sub-range per site
    (:func:`~metalearn.data.partition.sinusoid_site_ranges`). A class-based site then holds out
    ``holdout_fraction`` of its classes. The plan holds class ids and ranges only, never
    examples; it is what the cloud sends to each edge actor.
    """
    from metalearn.data.registry import get_source

    source = get_source(data)
    plans = source.partition_sites(data, sites, seed)
    if not source.class_based:
        return plans
    for site, plan in plans.items():
        part = np.asarray(plan["characters"], dtype=np.int64)
        chars, held = _holdout_split(site, part, holdout_fraction, int(data["ways"]), seed)
        plans[site] = {**plan, "characters": chars.tolist(), "holdout": held.tolist()}
    return plans


def plan_from_manifests(data: Mapping[str, Any], manifests: Mapping[str, Any],
                        stores: Mapping[str, str], seed: int,
                        holdout_fraction: float = 0.2) -> dict[str, dict[str, Any]]:
    """Each site's plan from its store's manifest (:class:`~metalearn.data.store.
    StoreManifest`): the store's path and content hash, its training and held-out classes as
    site-local ids (positions in the manifest), and its groups. Counts and names in, ids out:
    no example is read. The held-out split is :func:`plan_sites`' own, so a store sharded by
    alphabet gives exactly the tasks the source data set gave."""
    need = int(data["shots"]) + int(data["queries"])
    plans = {}
    for site, manifest in manifests.items():
        short = [c.name for c in manifest.classes if c.count < need]
        if short:
            raise ValueError(f"site {site}: classes {short[:3]} hold fewer than shots + queries "
                             f"= {need} examples")
        local = np.arange(manifest.num_classes, dtype=np.int64)
        if local.size < int(data["ways"]):
            raise ValueError(f"site {site} holds {local.size} classes, fewer than ways = "
                             f"{data['ways']}")
        chars, held = _holdout_split(site, local, holdout_fraction, int(data["ways"]), seed)
        plans[site] = {"site": site, "store": str(stores[site]), "store_sha256": manifest.sha256,
                       "characters": chars.tolist(), "holdout": held.tolist(),
                       "alphabets": manifest.groups}
    return plans


def split_tasks(n: int, devices: int) -> list[int]:
    """How ``n`` tasks of a round split over ``devices`` sorted devices: as evenly as possible,
    the first ones one more when ``n`` does not divide (what :meth:`SiteTasks.round_sampler`
    draws, and what a device computes alone under device-level privacy)."""
    base, extra = divmod(int(n), int(devices))
    return [base + (i < extra) for i in range(int(devices))]


class SiteTasks:
    """The task source of one site: its devices' partitions and their per-round samplers.

    Devices are virtual: a device is a slice of the site's characters (or amplitude range)
    and a seed, computed on first use. Ten thousand devices cost a list of small index arrays,
    and a round builds samplers only for the devices that take part in it.

    Args:
        data: the config's ``data`` section.
        plan: this site's entry of :func:`plan_sites`.
        devices: number of virtual clients of the site.
        seed: the run seed.
    """

    def __init__(self, data: Mapping[str, Any], plan: Mapping[str, Any], devices: int = 1,
                 seed: int = 0) -> None:
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        self.data = dict(data)
        self.site = str(plan["site"])
        self.plan = dict(plan)
        self.devices = int(devices)
        self.seed = int(seed)
        from metalearn.data.registry import get_source

        self.sinusoid = not get_source(data).class_based  # sites hold ranges, not classes
        self._parts: list[np.ndarray] | None = None

    @property
    def manifest(self) -> Any:
        """The site store's manifest (None without a store: sinusoid, or a source plan)."""
        store = self.plan.get("store")
        return None if store is None else self.load().manifest  # type: ignore[union-attr]

    def load(self) -> Any:
        """Load the site's data now: the store, checked against the planned content hash
        (returned); the source data set for a plan without a store; nothing for sinusoid."""
        if self.sinusoid:
            return None
        store = self.plan.get("store")
        if store is None:
            from metalearn.data.registry import get_source

            get_source(self.data).prepare(self.data)  # the source itself (an image folder)
            return None
        from metalearn.data.store import StoreError, load_store

        loaded = load_store(store)
        planned = self.plan.get("store_sha256")
        if planned is not None and loaded.manifest.sha256 != planned:
            raise StoreError(f"site {self.site}: the store at {store} changed since the cloud "
                             "planned from its manifest (content hash differs)")
        return loaded

    def _episodes(self, characters: np.ndarray, seed: int) -> Any:
        """An episode sampler over ``characters`` (site-local ids with a store)."""
        from metalearn.from_config import sampler_from_config

        if self.plan.get("store") is None:
            return sampler_from_config(self.data, seed=seed, characters=characters)
        from metalearn.data.episodes import OmniglotEpisodes

        return OmniglotEpisodes(self.load().as_omniglot(), characters, ways=self.data["ways"],
                                shots=self.data["shots"], queries=self.data["queries"],
                                rotations=self.data.get("rotations", True), seed=seed)

    def device_part(self, device: int) -> np.ndarray | tuple[float, float]:
        """Device ``device``'s characters, or its amplitude sub-range (sinusoid)."""
        if not 0 <= device < self.devices:
            raise IndexError(f"site {self.site} has devices 0..{self.devices - 1}, not {device}")
        if self.sinusoid:
            lo, hi = (float(a) for a in self.plan["amplitude"])
            width = (hi - lo) / self.devices
            return (lo + device * width, hi if device == self.devices - 1 else
                    lo + (device + 1) * width)
        if self._parts is None:
            from metalearn.data.partition import partition_devices

            chars = np.asarray(self.plan["characters"], dtype=np.int64)
            self._parts = partition_devices(chars, self.devices, site_seed(self.seed, self.site,
                                                                           _DEVICES),
                                            min_classes=int(self.data["ways"]))
        return self._parts[device]

    def sampler(self, device: int, round_idx: int) -> Any:
        """A fresh sampler of ``device``'s tasks for round ``round_idx``."""
        from metalearn.from_config import sampler_from_config

        part = self.device_part(device)
        seed = round_seed(self.seed, self.site, device, round_idx)
        if self.sinusoid:
            return sampler_from_config(self.data, seed=seed, amplitude=part)  # type: ignore[arg-type]
        return self._episodes(part, seed)  # type: ignore[arg-type]

    def round_sampler(self, device_ids: Sequence[int], round_idx: int) -> SampleTasks:
        """``sample(n)``: ``n`` tasks split as evenly as possible over ``device_ids`` (the first
        devices get one more when ``n`` does not divide), concatenated in device order."""
        device_ids = sorted(int(d) for d in device_ids)
        if not device_ids:
            raise ValueError("a round needs at least one device")
        samplers = [self.sampler(d, round_idx) for d in device_ids]

        def sample(n: int) -> TaskBatch:
            counts = split_tasks(n, len(samplers))
            return TaskBatch.cat([s.sample(c) for s, c in zip(samplers, counts, strict=True)
                                  if c > 0])

        return sample

    def personal_sampler(self, version: int) -> SampleTasks:
        """``sample(n)``: tasks of the site's whole training share (every device's classes, or
        its amplitude range) for personalizing its model (:mod:`metalearn.site_models`), on a
        stream of their own: ``version`` (the round the model is made at) seeds it, so a
        model made again at the same round is the same model."""
        from metalearn.from_config import sampler_from_config

        seed = site_seed(self.seed, self.site, _PERSONAL, int(version))
        if self.sinusoid:
            sampler = sampler_from_config(self.data, seed=seed,
                                          amplitude=tuple(self.plan["amplitude"]))
        else:
            sampler = self._episodes(np.asarray(self.plan["characters"], dtype=np.int64), seed)
        return sampler.sample

    def holdout_sampler(self) -> Any:
        """A fixed-seed sampler of the site's held-out tasks (for personalization).

        Omniglot: the site's held-out characters (whole characters of the site's own
        alphabets that training never saw). Sinusoid: fresh tasks from the site's amplitude
        range on a stream that training never draws from.
        """
        from metalearn.from_config import sampler_from_config

        seed = site_seed(self.seed, self.site, _HOLDOUT)
        if self.sinusoid:
            return sampler_from_config(self.data, seed=seed,
                                     amplitude=tuple(self.plan["amplitude"]))
        held = np.asarray(self.plan.get("holdout", []), dtype=np.int64)
        if held.size == 0:
            raise ValueError(f"site {self.site} holds out no characters "
                             "(federated.holdout_fraction is 0): nothing to personalize on")
        return self._episodes(held, seed)
