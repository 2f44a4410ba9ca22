"""What a malicious site does to its part of a round, in pure torch (no Ray): the maths of the
attacks that :mod:`actors.edge` applies when the topology gives a site an ``attack``.

Two families, after the robust-aggregation literature:

* **Update attacks** replace the site's honest update ``u`` (a flat vector) by a crafted one:
  :func:`sign_flip` (``-k u``), :func:`scale` (``lambda u``: a boosted update, the model
  replacement of Bagdasaryan et al., 2020), :func:`gaussian` (pure noise ``N(0, sigma^2)``)
  and :func:`alie`, "a little is enough" (Baruch et al., 2019): ``mu - z sigma`` per coordinate,
  small enough to hide among honest updates, consistent enough to steer their mean.
* **Data poisoning**: :func:`flip_labels` relabels the site's tasks before the honest update
  is computed (Fang et al., 2020's ``l -> L - 1 - l``; regression targets change sign).

ALIE needs the mean and spread of honest updates. A real site sees only its own data, so here
it estimates them from several honest updates that it computes itself on fresh tasks of its own
(``samples`` of them, the first being its honest update of the round): a stand-in for the
honest sites that Baruch et al.'s colluding attackers observe. Their spread across one site's
task draws is smaller than across non-IID sites, so this is a cautious version of the attack.

Randomness (the Gaussian update) comes from a generator the caller seeds with
:func:`metalearn.sites.attack_seed` ``(seed, site, round)``: attacked runs repeat and resume.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

from metalearn.sites import SampleTasks
from metalearn.tasks import TaskBatch


def sign_flip(update: Tensor, factor: float) -> Tensor:
    """``-factor * update``: pushes the mean against the honest direction."""
    return -float(factor) * update


def scale(update: Tensor, factor: float) -> Tensor:
    """``factor * update``: one boosted update outweighs the others in a mean."""
    return float(factor) * update


def gaussian(update: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Noise of standard deviation ``sigma`` in place of the update (same shape and dtype)."""
    return float(sigma) * torch.randn(update.shape, generator=generator,
                                      dtype=update.dtype)


def alie(honest: Tensor, z: float) -> Tensor:
    """``mean - z * std`` of ``honest`` (``[m, d]``, ``m >= 2`` honest updates) per coordinate.

    The standard deviation is the sample one (``m - 1`` in the denominator): ``m`` is a handful.
    """
    if honest.dim() != 2 or honest.shape[0] < 2:
        raise ValueError(f"alie needs at least 2 honest updates as rows of a [m, d] tensor, "
                         f"got shape {tuple(honest.shape)}")
    return honest.mean(dim=0) - float(z) * honest.std(dim=0, correction=1)


def alie_z_max(n: int, f: int) -> float:
    """Baruch et al.'s ``z``: the largest shift that still leaves the attackers' update among
    the ``s = floor(n/2 + 1) - f`` honest updates a majority needs, ``z = Phi^-1((n - s) / n)``.

    ``n``: the updates of a round; ``f``: the attackers among them. For few sites it is small,
    and 0 for ``n = 4, f = 1`` (the attack would send the honest mean): callers reject that.
    """
    if not 0 < f < n:
        raise ValueError(f"alie's z needs 0 < f < n attackers among n updates, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise ValueError(f"alie's z is unbounded for n={n}, f={f} (the attackers are a "
                         "majority): give z explicitly")
    return NormalDist().inv_cdf((n - s) / n)


def flip_labels(tasks: TaskBatch, ways: int) -> TaskBatch:
    """The same tasks with every support and query label ``l`` replaced by ``ways - 1 - l``
    (classification; with odd ``ways`` the middle class keeps its label), or every regression
    target ``y`` by ``-y``."""

    def flip(y: Tensor) -> Tensor:
        if y.is_floating_point():
            return -y
        if int(y.min()) < 0 or int(y.max()) >= ways:
            raise ValueError(f"labels outside 0..{ways - 1}: cannot flip them as {ways}-way")
        return (ways - 1) - y

    return TaskBatch(tasks.support_x, flip(tasks.support_y), tasks.query_x,
                     flip(tasks.query_y))


def flipped(sample: SampleTasks, ways: int) -> SampleTasks:
    """A task source whose tasks come from ``sample`` with their labels flipped."""

    def sample_flipped(n: int) -> TaskBatch:
        return flip_labels(sample(n), ways)

    return sample_flipped
