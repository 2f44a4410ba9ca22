"""The topology: one cloud and its edge sites, the resources each declares, and how slow each is
(``speed``: a duty cycle on its compute; ``bandwidth_mbps``: its simulated link;
``availability``: when it is reachable).

A site is a Ray node that advertises the custom resource ``edge:<site>`` in a large quantity
(``SITE_RESOURCE_QUANTITY``); an edge actor asks for a small fraction of it
(``ACTOR_RESOURCE_REQUEST``), so the actor lands on that node and only there, and a site can
host more than one actor (an edge actor and a serving replica, say). The cloud node advertises
``cloud``. The same file drives the embedded cluster, the local multi-node launcher, and the
shape of ``cluster.yaml``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.traces import trace_periods

SITE_RESOURCE_QUANTITY = 1000.0
ACTOR_RESOURCE_REQUEST = 1.0
CLOUD_RESOURCE = "cloud"


def site_resource(site: str) -> str:
    """The custom resource that pins work to ``site``."""
    return f"edge:{site}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeResources(_Section):
    num_cpus: float = Field(1, gt=0)
    memory_gb: float = Field(1.5, gt=0, description="Ray's --memory for the node")
    object_store_gb: float = Field(0.3, gt=0, description="--object-store-memory")


# --------------------------------------------------------------------------- attacks
# A malicious site is configured here, as a behaviour of the site, never coded into a test.
# One model per attack, told apart by ``name``; a parameter that does not belong to the named
# attack is an unknown key. The maths is metalearn.attacks; actors.edge applies it.

class SignFlipAttack(_Section):
    """Send ``-factor`` times the honest update."""

    name: Literal["sign_flip"]
    factor: float = Field(1.0, gt=0, description="k of -k*u (a scale up as well as a flip)")


class ScaleAttack(_Section):
    """Send ``factor`` times the honest update (a boosted update, model replacement)."""

    name: Literal["scale"]
    factor: float = Field(10.0, gt=0, description="lambda of lambda*u")

    @field_validator("factor")
    @classmethod
    def _not_one(cls, value: float) -> float:
        if value == 1:
            raise ValueError("factor 1 sends the honest update: no attack")
        return value


class GaussianAttack(_Section):
    """Send Gaussian noise instead of the update, seeded by (seed, site, round)."""

    name: Literal["gaussian"]
    sigma: float = Field(1.0, gt=0, description="standard deviation per coordinate")


class AlieAttack(_Section):
    """"A little is enough" (Baruch et al., 2019): ``mean - z * std`` of honest updates that
    the site computes itself (``samples`` of them, each on fresh tasks: that many times the
    honest compute)."""

    name: Literal["alie"]
    z: float | None = Field(None, ge=0, description="null: the paper's z_max for the sites "
                                                    "called per round and the attackers")
    samples: int = Field(4, ge=2, description="honest updates to estimate mean and std")


class LabelFlipAttack(_Section):
    """Data poisoning: labels ``l -> ways - 1 - l`` (regression targets ``y -> -y``) on the
    site's support and query sets, then an honest update."""

    name: Literal["label_flip"]


ATTACKS = ("sign_flip", "scale", "gaussian", "alie", "label_flip")


def _known_attack(value: Any) -> Any:
    """Say which attacks exist when ``name`` is missing or names none."""
    if isinstance(value, dict) and value.get("name") not in ATTACKS:
        raise ValueError(f"attack name {value.get('name')!r} is not one of {', '.join(ATTACKS)}")
    return value


SiteAttack = Annotated[
    Union[SignFlipAttack, ScaleAttack, GaussianAttack, AlieAttack, LabelFlipAttack],  # noqa: UP007
    Field(discriminator="name"),
    BeforeValidator(_known_attack),
]


class Availability(_Section):
    """A site that comes and goes, one of two ways (times in seconds of the run's clock):
    ``mean_on_s`` and ``mean_off_s``, exponential on and off periods with these means seeded
    by the run seed and the site's name, on at time 0
    (:class:`metalearn.availability.OnOffSchedule`); or ``trace``, the on periods recorded in
    a file (:mod:`cluster.traces` documents its format), of the trace's site ``trace_site``
    (default: this site's name), repeated every ``repeat_s`` seconds if given
    (:class:`metalearn.availability.TraceSchedule`)."""

    mean_on_s: float | None = Field(None, gt=0, description="mean length of a period the "
                                                            "site is reachable")
    mean_off_s: float | None = Field(None, gt=0, description="mean length of a period it is "
                                                             "away")
    trace: str | None = Field(None, min_length=1, description="a trace file (.csv or .jsonl: "
                                                              "site, start_s, end_s); absolute "
                                                              "or relative to the working "
                                                              "directory")
    trace_site: str | None = Field(None, min_length=1, description="the site's name in the "
                                                                   "trace; default: its own")
    repeat_s: float | None = Field(None, gt=0, description="the trace starts over every "
                                                           "repeat_s seconds; none: away after "
                                                           "its last period")

    @model_validator(mode="after")
    def _one_kind(self) -> Availability:
        seeded = (self.mean_on_s, self.mean_off_s)
        if self.trace is None:
            if None in seeded:
                raise ValueError("availability needs mean_on_s and mean_off_s (a seeded "
                                 "on/off schedule) or trace (a trace file)")
            if self.trace_site is not None or self.repeat_s is not None:
                raise ValueError("availability.trace_site and repeat_s belong to a trace; "
                                 "set availability.trace")
        elif seeded != (None, None):
            raise ValueError("availability takes either mean_on_s/mean_off_s or trace, "
                             "not both")
        return self

    def on_periods(self, site: str) -> tuple[tuple[float, float], ...]:
        """The trace's on periods of ``site`` (``()`` for a seeded schedule)."""
        if self.trace is None:
            return ()
        return trace_periods(self.trace, self.trace_site or site)


class Site(NodeResources):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    devices: int = Field(1, ge=1, description="virtual clients (devices) simulated by the site")
    delay_s: float = Field(0.0, ge=0, description="injected extra compute time per round")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs the site's edge actor asks for")
    compute_nice: int = Field(
        19, ge=0, le=19,
        description="niceness (at least) of the edge actor's training compute: it yields the "
                    "CPU to the node's control plane (Ray's raylet and RPC threads, a serving "
                    "replica; Ray runs its workers at 15), so calls are delivered at once even "
                    "while the sites train; 0 leaves it as Ray started it")
    attack: SiteAttack | None = Field(
        None, description="a malicious site: how it corrupts its rounds (testing robust "
                          "aggregation); none: honest")
    store: str | None = Field(
        None, min_length=1,
        description="the site's data store, a folder on the site's node (absolute, or "
                    "relative to the run's stores root); default: <stores root>/<name>")
    speed: float = Field(
        1.0, gt=0, le=1, description="share of its node's compute the site gets: after work "
                                     "that took t seconds it idles t (1/speed - 1), so a site "
                                     "of speed 0.25 is 4x slower at any work")
    bandwidth_mbps: float | None = Field(
        None, gt=0, description="simulated link: sending b bytes either way takes "
                                "8 b / (bandwidth_mbps 1e6) s; none: no delay")
    availability: Availability | None = Field(
        None, description="seeded on/off schedule or a trace file; none: always reachable")

    @model_validator(mode="after")
    def _trace_usable(self) -> Site:
        """A trace file that holds this site's periods, within ``repeat_s``."""
        if self.availability is None or self.availability.trace is None:
            return self
        try:
            periods = self.availability.on_periods(self.name)
        except ValueError as err:
            raise ValueError(f"availability.trace: {err}") from None
        last = periods[-1][1] if periods else 0.0
        repeat = self.availability.repeat_s
        if repeat is not None and repeat < last:
            raise ValueError(f"availability.repeat_s {repeat:g} is shorter than the trace "
                             f"(the last period of {self.name} ends at {last:g} s)")
        return self


class Topology(_Section):
    """A cloud node and at least one edge site with distinct names."""

    cloud: NodeResources = NodeResources(num_cpus=1, memory_gb=2.0, object_store_gb=0.5)
    sites: list[Site]
    head_port: int = Field(6379, ge=1024, le=65535)
    dashboard_port: int = Field(8265, ge=1024, le=65535)

    @model_validator(mode="after")
    def _check(self) -> Topology:
        if not self.sites:
            raise ValueError("a topology needs at least one site")
        names = [s.name for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be distinct; repeated: {dupes}")
        if self.head_port == self.dashboard_port:
            raise ValueError(f"head_port and dashboard_port must differ (both {self.head_port})")
        stores = [s.store for s in self.sites if s.store is not None]
        shared = sorted({p for p in stores if stores.count(p) > 1})
        if shared:
            raise ValueError(f"each site needs a store of its own; shared: {shared}")
        for s in self.sites:
            if s.actor_cpus > s.num_cpus:
                raise ValueError(f"site {s.name}: actor_cpus {s.actor_cpus} exceeds the node's "
                                 f"num_cpus {s.num_cpus}")
        return self

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def attackers(self) -> list[str]:
        """The sites configured with an attack."""
        return [s.name for s in self.sites if s.attack is not None]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {self.site_names}")

    def embedded_resources(self) -> dict[str, float]:
        """Custom resources for an embedded ``ray.init``: every site on the one local node."""
        res = {CLOUD_RESOURCE: SITE_RESOURCE_QUANTITY}
        res.update({site_resource(s.name): SITE_RESOURCE_QUANTITY for s in self.sites})
        return res


class TopologyError(ValueError):
    """A topology file that cannot be used, with a message that says where and why."""


def parse_topology(raw: Any, source: str = "<dict>") -> Topology:
    if not isinstance(raw, dict):
        raise TopologyError(f"invalid topology {source}: expected a mapping at the top level")
    try:
        return Topology.model_validate(raw)
    except ValidationError as err:
        lines = [f"invalid topology {source}:"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {'unknown key' if e['type'] == 'extra_forbidden' else msg}")
        raise TopologyError("\n".join(lines)) from None


def load_topology(path: str | Path) -> Topology:
    path = Path(path)
    if not path.exists():
        raise TopologyError(f"topology file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TopologyError(f"topology {path} is not valid YAML: {err}") from None
    return parse_topology(raw, str(path))


def uniform_topology(sites: int, **site_kwargs: Any) -> Topology:
    """``sites`` identical sites named ``site-0`` ... (for tests and quick starts)."""
    if not re.fullmatch(r"\d+", str(sites)) or int(sites) < 1:
        raise TopologyError(f"sites must be a positive integer, got {sites!r}")
    return Topology(sites=[Site(name=f"site-{i}", **site_kwargs) for i in range(int(sites))])
