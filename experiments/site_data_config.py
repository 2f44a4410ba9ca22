"""``federated.data``: where each site's store lives, and how ``edgemeta data shard`` makes it.

A site reads its examples from its own store (:mod:`metalearn.data.store`): the topology's
``store`` of the site (a path on that site's node; relative paths are resolved against
``stores``), else ``<stores>/<site name>``. With ``stores: null`` (the default) the stores live
in the run folder (``<run>/stores/<site>``) and the run makes them before its sites start, each
on its own site's node; with a ``stores`` folder given they must exist already (made by
``edgemeta data shard CONFIG``, or the sites' own), and a missing one is an error.

The partitioner (``partitioner``, told apart by ``name``) says which Omniglot meta-training
characters each site gets; see :mod:`metalearn.data.partition` for each one's behaviour.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field

from experiments.section import Section

PARTITIONER_NAMES = ("alphabet", "iid", "dirichlet", "quantity")


class AlphabetPartitioner(Section):
    """Whole alphabets per site (non-IID by script), balanced by character count."""

    name: Literal["alphabet"]


class IidPartitioner(Section):
    """Characters shuffled and cut into near-equal parts."""

    name: Literal["iid"]


class DirichletPartitioner(Section):
    """Label skew: each alphabet's characters spread over the sites by ``Dir(alpha)``."""

    name: Literal["dirichlet"]
    alpha: float = Field(0.5, gt=0, description="concentration: small = few alphabets a site")
    self_balancing: bool = Field(True, description="a site above the average size gets no "
                                                   "share of later alphabets (Flower's default)")


class QuantityPartitioner(Section):
    """Quantity skew: unequal numbers of (IID) characters per site, sizes by ``Dir(alpha)``."""

    name: Literal["quantity"]
    alpha: float = Field(1.0, gt=0, description="concentration of the sizes: small = skewed")


def _known_partitioner(value: Any) -> Any:
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict) and value.get("name") not in PARTITIONER_NAMES:
        raise ValueError(f"partitioner name {value.get('name')!r} is not one of "
                         f"{', '.join(PARTITIONER_NAMES)}")
    return value


PartitionerConfig = Annotated[
    Union[AlphabetPartitioner, IidPartitioner, DirichletPartitioner,  # noqa: UP007
          QuantityPartitioner],
    Field(discriminator="name"),
    BeforeValidator(_known_partitioner),
]


class SiteDataConfig(Section):
    """The sites' stores (Omniglot only; sinusoid sites have no data to store)."""

    stores: str | None = Field(
        None, description="folder of the sites' stores (relative site.store paths resolve "
                          "against it); null: <run folder>/stores, made by the run")
    partitioner: PartitionerConfig = Field(default_factory=lambda: AlphabetPartitioner(
        name="alphabet"))
    seed: int | None = Field(None, description="partition seed; default: the run seed")
    test_store: str | None = Field(
        None, description="a store on the cloud node holding the meta-test classes (e.g. made "
                          "by `edgemeta data shard --test-store`); null: Omniglot's test split")
    min_classes: int | None = Field(
        None, ge=1, description="fewest characters a site may get; default 2 x data.ways (a "
                                "held-out share and a training share of at least ways each)")
