"""Work done in processes of its own, pinned to a node, so that the driver never holds data.

The cloud plans the sites from what each site reports of its store, its manifest (class counts
and names, never examples): a one-shot task on each site's node reads (or, when the run makes
its stores, first shards) that site's store and returns the manifest; the plan is then
arithmetic on counts, done here (:func:`metalearn.sites.plan_from_manifests`). The meta-test
runs as a one-shot task on the ``cloud`` node. Neither the driver nor a cloud task opens a
site's store, and the driver opens no data file at all (tests hold them to that).

Every such task records the files it opens when ``EDGEMETA_AUDIT_OPENS`` is set
(:mod:`cluster.open_audit`; off by default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import ray

from cluster import open_audit
from cluster.topology import ACTOR_RESOURCE_REQUEST, CLOUD_RESOURCE, Topology, site_resource
from metalearn.data.registry import get_source
from metalearn.data.shard import ShardSpec, shard_sites
from metalearn.data.store import StoreManifest, verify_store
from metalearn.sites import plan_from_manifests, plan_sites


class SitePlanError(ValueError):
    """The data cannot be partitioned over the sites as configured (say, more sites than
    alphabets, or a missing store); the message says why."""


def check_resources(topology: Topology) -> None:
    """Fail fast, naming what is missing, if no node offers the cloud or a site's resource."""
    have = ray.cluster_resources()
    wanted = [CLOUD_RESOURCE, *(site_resource(s) for s in topology.site_names)]
    missing = [r for r in wanted if have.get(r, 0) < ACTOR_RESOURCE_REQUEST]
    if missing:
        raise RuntimeError(f"the Ray cluster has no node offering {missing}; start the sites "
                           "of the topology (edgemeta cluster up) or use an embedded cluster")


def _audited(fn: Callable[..., Any], role: str) -> Callable[..., Any]:
    """``fn``, recording the files its process opens when auditing is on."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        open_audit.install(role)
        return fn(*args, **kwargs)

    return run


def on_cloud(fn: Callable[..., Any], topology: Topology) -> Any:
    """``fn`` as a Ray task on the cloud node (its own process: the driver holds no data).

    ``max_calls=1``: the worker exits when the task ends, instead of idling in Ray's pool for
    the rest of the run with torch and the data set loaded (about 450 MB here).
    """
    return ray.remote(max_calls=1)(_audited(fn, "cloud")).options(
        num_cpus=topology.cloud.num_cpus, resources={CLOUD_RESOURCE: ACTOR_RESOURCE_REQUEST})


def on_site(fn: Callable[..., Any], site: str) -> Any:
    """``fn`` as a one-shot Ray task on ``site``'s node (no CPU asked: it runs before the
    site's actor, and only reads or writes the site's store)."""
    return ray.remote(max_calls=1)(_audited(fn, f"site-task.{site}")).options(
        num_cpus=0, resources={site_resource(site): ACTOR_RESOURCE_REQUEST})


def site_manifest(site: str, store: str, shard: ShardSpec | None) -> StoreManifest:
    """On the site's node: its store's manifest, the examples checked against its hash; with
    ``shard``, the store is first made from the source data set if not up to date."""
    if shard is not None:
        return shard_sites(shard, {site: store}, only=[site])[site][1]
    return verify_store(store)


def site_manifests(topology: Topology, stores: Mapping[str, str],
                   shard: ShardSpec | None) -> dict[str, StoreManifest]:
    """Every site's manifest, each read (or sharded) on its own node, in parallel."""
    refs = {s: on_site(site_manifest, s).remote(s, stores[s], shard) for s in topology.site_names}
    out = {}
    for site, ref in refs.items():
        try:
            out[site] = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, ValueError):
                raise SitePlanError(f"site {site}: {cause}") from None
            raise
    return out


def plan_partitions(data: Mapping[str, Any], topology: Topology, seed: int, holdout: float,
                    stores: Mapping[str, str] | None = None,
                    shard: ShardSpec | None = None) -> dict[str, dict[str, Any]]:
    """Each site's plan (ids, not data). Omniglot: from the manifests the sites report of
    their stores at ``stores`` (made first with ``shard``, if given); another data set that
    reads files (an image folder's classes) is planned by a task on the cloud node; sinusoid
    ranges are arithmetic on the config. A plan that cannot be made raises
    :class:`SitePlanError`."""
    if not get_source(data).reads_files:
        return plan_sites(data, topology.site_names, seed, holdout)
    if data["dataset"] != "omniglot":
        return _plan_on_cloud(data, topology, seed, holdout)
    if stores is None:
        raise SitePlanError("omniglot sites read their stores: give each site's store path")
    manifests = site_manifests(topology, stores, shard)
    try:
        return plan_from_manifests(data, manifests, stores, seed, holdout)
    except ValueError as err:
        raise SitePlanError(f"cannot plan the sites from their manifests: {err}") from None


def _plan_on_cloud(data: Mapping[str, Any], topology: Topology, seed: int,
                   holdout: float) -> dict[str, dict[str, Any]]:
    """A data set without site stores yet (an image folder): planned from its files by a task
    on the cloud node."""
    try:
        return ray.get(on_cloud(plan_sites, topology).remote(
            dict(data), topology.site_names, seed, holdout))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, ValueError):
            raise SitePlanError(f"cannot partition the data over the sites: {cause}") from None
        raise
