"""The ``federated.secure_aggregation`` section: masking the sites' updates so that the cloud
learns only their sum (docs/DESIGN.md, "Secure aggregation"; threat model: docs/PRIVACY.md).

What cannot compose with it (robust rules, which need each update on its own; a clip bound
given twice, when differential privacy already bounds the updates) is checked where the whole
federated section is known (:func:`experiments.config.check_secure_aggregation`).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from experiments.section import Section


class SecureAggregationConfig(Section):
    """Secure aggregation (Bonawitz et al., 2017; SecAgg+ graph of Bell et al., 2020).

    Each site clips its update to L2 norm ``clip`` at the site, encodes it in the ring
    Z_2^``bits`` and masks it; the cloud unmasks only the sum of the updates that arrived. A
    round needs ``threshold`` sites (of each site's neighbourhood with ``neighbours``) at every
    step; fewer, and it is skipped like a round below quorum.
    """

    clip: float | None = Field(None, gt=0, description="L2 bound each site clips its update "
                               "to before masking; required without federated.privacy, "
                               "derived from privacy.clip_norm with it (leave it out)")
    bits: int = Field(32, ge=8, le=64, description="ring size k: updates travel as k-bit "
                      "integers (32 costs what float32 costs)")
    threshold: int | None = Field(None, ge=2, description="t: shares that rebuild a site's "
                                  "secrets; default a majority of the sites called per round "
                                  "(of a neighbourhood with neighbours)")
    neighbours: int | None = Field(None, ge=2, description="SecAgg+: each site masks with "
                                   "this many others (even); default every other site")
    step_deadline_s: float = Field(10.0, gt=0, description="deadline of each key exchange "
                                   "(advertise, share, unmask); the round itself keeps "
                                   "deadline_s")

    @field_validator("neighbours")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(f"neighbours must be even (a SecAgg+ graph is k-regular with k "
                             f"even), got {value}")
        return value
