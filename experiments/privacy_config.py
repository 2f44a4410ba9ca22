"""The ``federated.privacy`` section: client-level differential privacy (docs/PRIVACY.md).

What cannot compose with it is checked where the whole federated section is known
(:func:`experiments.config.check_privacy`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from experiments.section import Section


class AdaptiveClipConfig(Section):
    """Adaptive clipping (Andrew et al., 2021): the bound follows a quantile of the units'
    update norms, estimated each round from a noised count of the units within the bound."""

    target_quantile: float = Field(0.5, gt=0, lt=1, description="share of units whose update "
                                   "should fall within the bound")
    clip_lr: float = Field(0.2, gt=0, description="step of the geometric update of the bound")
    count_noise_std: float = Field(gt=0, description="std of the noise on the count of units "
                                   "within the bound; about expected units per round / 20")


class PrivacyConfig(Section):
    """Client-level differential privacy (DP-FedAvg): clipping at the site, Gaussian noise on
    the sum, and an accountant (docs/PRIVACY.md).

    ``unit`` names what the guarantee protects: all the data of one ``site``, or of one
    ``device`` (a site's virtual client). Every round clips each unit's update to
    ``clip_norm`` before it leaves the site; the released sum carries Gaussian noise of std
    ``noise_multiplier * clip_norm`` (added by the cloud, ``central``, or in shares by the
    sites, ``distributed``) and is divided by the expected number of units per round.
    ``sampling`` is how units are picked each round (``fixed``: the run's ``site_fraction`` and
    ``devices_per_round`` as uniform samples without replacement; ``poisson``: each unit
    independently with that rate). Every round row records epsilon at ``delta``; with
    ``target_epsilon`` training stops after the last round within it. ``seed`` is for tests:
    without it, noise and participants come from the operating system's CSPRNG.
    """

    unit: Literal["site", "device"] = Field(description="what one guarantee protects")
    clip_norm: float = Field(gt=0, description="L2 bound C of one unit's update (the initial "
                             "bound with adaptive clipping)")
    noise_multiplier: float = Field(gt=0, description="noise std on the sum / clip_norm")
    delta: float = Field(gt=0, lt=1, description="delta of the reported (epsilon, delta); "
                         "below 1 / number of units")
    noise: Literal["central", "distributed"] = "central"
    sampling: Literal["fixed", "poisson"] = "fixed"
    accountant: Literal["rdp", "pld"] = "rdp"
    target_epsilon: float | None = Field(None, gt=0, description="stop before a round that "
                                         "would take epsilon past this")
    adaptive_clip: AdaptiveClipConfig | None = None
    seed: int | None = Field(None, description="tests only: seeded noise and participants "
                             "instead of the CSPRNG")


