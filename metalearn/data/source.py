"""The data-set interface: what the rest of the code asks of a few-shot data set.

Training, the sites, evaluation, the model builder and the serving signature all reach data
through a :class:`FewShotSource` found by the config's ``data.dataset`` name in the registry
(:mod:`metalearn.data.registry`). Every method takes the config's ``data`` section (a plain
dict), so a source is a stateless adapter and can be rebuilt anywhere from a run's
``config.yaml``.

Most data sets are **classes of examples** (Omniglot, an image folder, a site's store): they
subclass :class:`ClassSource` and implement one method, :meth:`ClassSource.images`, returning
the examples as :class:`~metalearn.data.class_episodes.ClassImages`. Splits into meta-train and
meta-test classes, site partitions (whole classes), device parts, held-out classes and the task
sampler (:class:`~metalearn.data.class_episodes.ClassEpisodes`) then come with the base class;
override what differs (Omniglot: its standard split, alphabets per site, rotations).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from metalearn.data.errors import DataSetError
from metalearn.tasks import TaskBatch

TaskType = Literal["classification", "regression"]
Split = Literal["train", "test"]


class TaskSampler(Protocol):
    """What every source's sampler gives: seeded batches of tasks, and a resumable state."""

    def sample(self, batch: int) -> TaskBatch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FewShotSource(ABC):
    """A few-shot data set as the code sees it (see the module docstring).

    Class attributes: ``name`` (the registry key, ``data.dataset``), ``task_type``, ``model``
    (the architecture that fits its inputs), ``class_based`` (tasks are drawn from classes, so
    sites hold whole classes; false only for sinusoid regression, whose sites hold ranges) and
    ``reads_files`` (planning the sites needs the data, so it runs on the cloud node).
    """

    name: ClassVar[str]
    task_type: ClassVar[TaskType] = "classification"
    model: ClassVar[str] = "omniglot_conv"
    class_based: ClassVar[bool] = True
    reads_files: ClassVar[bool] = True

    def check(self, data: Mapping[str, Any]) -> None:
        """Config-time checks that need no file (raise ``ValueError`` naming the setting)."""
        return

    @abstractmethod
    def input_shape(self, data: Mapping[str, Any]) -> tuple[int, ...]:
        """The shape of one input: ``(channels, height, width)`` for images, ``(1,)`` for a
        scalar. The built-in sources read it from the config alone (no file), so a serving
        replica knows it without the data."""

    def prepare(self, data: Mapping[str, Any]) -> None:
        """Load what sampling needs now (an edge site does before its first round)."""
        return

    @abstractmethod
    def sampler(self, data: Mapping[str, Any], split: Split = "train", seed: int = 0,
                part: Any = None) -> TaskSampler:
        """A seeded sampler of ``split``'s tasks, or of ``part`` when given: a site's or
        device's share, as :meth:`partition_sites` (then :mod:`metalearn.sites`) makes it
        (class indices for a class source, an amplitude range for sinusoid)."""

    @abstractmethod
    def partition_sites(self, data: Mapping[str, Any], sites: Sequence[str],
                        seed: int) -> dict[str, dict[str, Any]]:
        """Each site's share of the meta-training data as plain values (ids, never examples).

        A class-based source names the site's classes under ``characters`` (Omniglot's word,
        kept for every class-based source); :func:`metalearn.sites.plan_sites` then holds
        some of them out for personalization and splits the rest over the site's devices."""


def seeded_class_split(names: Sequence[str], split: Mapping[str, Any] | None,
                       ways: int) -> tuple[np.ndarray, np.ndarray]:
    """(meta-train, meta-test) class indices: ``split.test_classes`` by name, else a seeded
    ``split.test_fraction`` of the classes (by ``split.seed``; default 0.2 and 0)."""
    split = dict(split or {})
    n = len(names)
    named = split.get("test_classes")
    if named:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(named) - set(index))
        if unknown:
            raise DataSetError(f"data.split.test_classes: {unknown[:5]} are not class folders "
                             f"of the data (it has {n} classes)")
        test = np.array(sorted(index[name] for name in set(named)), dtype=np.int64)
    else:
        fraction = float(split.get("test_fraction", 0.2))
        k = max(1, math.ceil(fraction * n)) if fraction > 0 else 0
        perm = np.random.default_rng(int(split.get("seed", 0))).permutation(n)
        test = np.sort(perm[:k]).astype(np.int64)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), test)
    if train.size < ways:
        raise DataSetError(f"data.split leaves {train.size} meta-training classes of {n}; "
                         f"{ways}-way tasks need at least {ways} (add classes or lower "
                         "data.split.test_fraction)")
    return train, test


class ClassSource(FewShotSource):
    """A data set of classes of images (see the module docstring): implement :meth:`images`.

    The config's ``data`` section gives ``ways``, ``shots``, ``queries`` and, for the default
    split, ``split`` (``test_fraction``, ``seed`` or ``test_classes``).
    """

    @abstractmethod
    def images(self, data: Mapping[str, Any]) -> Any:
        """All examples as :class:`~metalearn.data.class_episodes.ClassImages` (load once
        per process and cache: every sampler of a site asks for them)."""

    def input_shape(self, data: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(self.images(data).input_shape)

    def prepare(self, data: Mapping[str, Any]) -> None:
        self.images(data)

    def describe(self, data: Mapping[str, Any]) -> str:
        """How warnings and errors name this data."""
        return f"data set {self.name}"

    def split_classes(self, data: Mapping[str, Any], split: Split) -> np.ndarray:
        """The meta-training (``train``) or meta-test (``test``) class indices that can give a
        task (``shots + queries`` examples at least; the others are left out with a warning,
        so no site or device is given a class it cannot sample)."""
        from metalearn.data.class_episodes import eligible_classes

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        images = self.images(data)
        train, test = seeded_class_split(images.names, data.get("split"), int(data["ways"]))
        return eligible_classes(images, train if split == "train" else test, int(data["ways"]),
                                int(data["shots"]) + int(data["queries"]),
                                f"{self.describe(data)} (meta-{split} classes)")

    def sampler(self, data: Mapping[str, Any], split: Split = "train", seed: int = 0,
                part: Any = None) -> TaskSampler:
        from metalearn.data.class_episodes import ClassEpisodes

        classes = self.split_classes(data, split) if part is None else np.asarray(part)
        return ClassEpisodes(self.images(data), classes, ways=data["ways"], shots=data["shots"],
                             queries=data["queries"], seed=seed, what=self.describe(data))

    def partition(self, data: Mapping[str, Any], classes: np.ndarray, sites: int,
                  seed: int) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Whole classes per site, and what else a site's plan says. Default: a seeded IID
        split (shuffled, cut into near-equal parts)."""
        if sites > classes.size:
            raise DataSetError(f"cannot give {sites} sites a class each: there are only "
                             f"{classes.size} meta-training classes")
        shuffled = np.random.default_rng(seed).permutation(classes)
        return [(np.sort(part), {}) for part in np.array_split(shuffled, sites)]

    def partition_sites(self, data: Mapping[str, Any], sites: Sequence[str],
                        seed: int) -> dict[str, dict[str, Any]]:
        parts = self.partition(data, self.split_classes(data, "train"), len(sites), seed)
        return {site: {"site": site, "characters": part.tolist(), **extra}
                for site, (part, extra) in zip(sites, parts, strict=True)}
