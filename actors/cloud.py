"""Work the cloud does in processes of its own, so that the driver never holds a data set.

Planning the sites' partitions needs Omniglot's metadata, and the meta-test needs its test
characters: both run as one-shot Ray tasks pinned to the ``cloud`` node. The driver process
itself opens no data file (a test holds it to that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ray

from cluster.topology import ACTOR_RESOURCE_REQUEST, CLOUD_RESOURCE, Topology, site_resource
from metalearn.data.registry import get_source
from metalearn.sites import plan_sites


class SitePlanError(ValueError):
    """The data cannot be partitioned over the sites as configured (say, more sites than
    alphabets); the message says why."""


def check_resources(topology: Topology) -> None:
    """Fail fast, naming what is missing, if no node offers the cloud or a site's resource."""
    have = ray.cluster_resources()
    wanted = [CLOUD_RESOURCE, *(site_resource(s) for s in topology.site_names)]
    missing = [r for r in wanted if have.get(r, 0) < ACTOR_RESOURCE_REQUEST]
    if missing:
        raise RuntimeError(f"the Ray cluster has no node offering {missing}; start the sites "
                           "of the topology (edgemeta cluster up) or use an embedded cluster")


def on_cloud(fn: Callable[..., Any], topology: Topology) -> Any:
    """``fn`` as a Ray task on the cloud node (its own process: the driver holds no data).

    ``max_calls=1``: the worker exits when the task ends, instead of idling in Ray's pool for
    the rest of the run with torch and the data set loaded (about 450 MB here).
    """
    return ray.remote(max_calls=1)(fn).options(
        num_cpus=topology.cloud.num_cpus, resources={CLOUD_RESOURCE: ACTOR_RESOURCE_REQUEST})


def plan_partitions(data: Mapping[str, Any], topology: Topology, seed: int,
                    holdout: float) -> dict[str, dict[str, Any]]:
    """Each site's partition (ids, not data). A data set that reads files (Omniglot's metadata,
    an image folder's classes) is planned by a task on the cloud node; sinusoid ranges are
    arithmetic on the config, computed here. A plan that cannot be made raises
    :class:`SitePlanError`."""
    if not get_source(data).reads_files:
        return plan_sites(data, topology.site_names, seed, holdout)
    try:
        return ray.get(on_cloud(plan_sites, topology).remote(
            dict(data), topology.site_names, seed, holdout))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, ValueError):
            raise SitePlanError(f"cannot partition the data over the sites: {cause}") from None
        raise
