"""Join a Ray cluster (or start an embedded one) with authentication chosen on purpose.

Three shapes, one call: ``connect(None, topo)`` starts Ray inside this process with every site's
resource on the one node; ``connect("127.0.0.1:6390", topo)`` or ``connect("auto", topo)`` joins
a running cluster (the local launcher's or ``ray up``'s) as a driver; ``connect("ray://...")``
joins through Ray Client. Inside ``ray job submit`` Ray sets ``RAY_ADDRESS``, so
``connect(None, ...)`` joins that cluster instead of starting a second one.

Authentication (see :mod:`cluster.auth`) is decided here, never by what happens to lie in
``~/.ray``:

- embedded: token auth with a random in-memory token (nothing written to disk), unless the caller
  gives ``token_path`` or sets ``RAY_AUTH_MODE`` itself;
- joining: ``token_path`` if given; else ``RAY_AUTH_*`` from the environment if set (as in a job
  driver, which inherits the cluster's); else the token of the local launcher's cluster when the
  address is that cluster's; else no token (``RAY_AUTH_MODE=disabled``).
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from cluster import auth, ray_logs
from cluster.settings import RAY_SYSTEM_CONFIG
from cluster.state import address_matches, read_running_state
from cluster.topology import CLOUD_RESOURCE, Topology, site_resource

_saved_env: dict[str, str | None] | None = None


class SiteNodesError(RuntimeError):
    """Some sites of the topology have no alive node advertising their resource."""


def connect(address: str | None = None, topology: Topology | None = None, *,
            num_cpus: int | None = None, namespace: str = "edgemeta",
            token_path: str | Path | None = None, state_dir: str | Path | None = None,
            check_sites: bool = True, wait_s: float = 30.0,
            log_to_driver: bool | None = None) -> dict[str, Any]:
    """Connect this process to Ray and return a description of what it joined.

    ``address``: None (``RAY_ADDRESS`` if set, else embedded), ``"auto"`` (the local launcher's
    cluster recorded in ``state_dir`` if one is up, else Ray's own discovery), ``host:port`` of a
    GCS, or ``ray://host:port``. ``topology``: declares the embedded node's resources; when
    joining, its sites are checked (``check_site_nodes``, waiting up to ``wait_s`` for nodes
    still registering) unless ``check_sites`` is False. ``log_to_driver``: None follows
    :func:`cluster.ray_logs.verbose` (Ray's processes' output stays off the console unless
    verbose).
    """
    import ray

    global _saved_env
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; call shutdown() first")
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    logs = ray_logs.init_kwargs()
    if log_to_driver is not None:
        logs["log_to_driver"] = log_to_driver

    if address is None:
        changes = _embedded_auth(token_path)
        _saved_env = auth.apply_to_process(changes)
        resources = topology.embedded_resources() if topology else {CLOUD_RESOURCE: 1000.0}
        try:
            # "local", never None: with no address ray.init joins whatever cluster
            # /tmp/ray/ray_current_cluster names (another `ray start` on this host).
            ctx = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                           resources=resources,
                           include_dashboard=False, namespace=namespace,
                           _system_config=dict(RAY_SYSTEM_CONFIG), **logs)
        except BaseException:
            _restore_env()
            raise
        kind = "embedded"
    else:
        if num_cpus is not None:
            raise ValueError("num_cpus applies to an embedded cluster only, not when joining one")
        address, changes = _join_auth(address, token_path, state_dir)
        check_reachable(address)
        _saved_env = auth.apply_to_process(changes)
        try:
            if address.startswith("ray://"):
                ctx = ray.init(address=address, namespace=namespace)
                kind = "client"
            else:
                ctx = ray.init(address=address, namespace=namespace, **logs)
                kind = "cluster"
        except BaseException:
            _restore_env()
            raise

    info: dict[str, Any] = {
        "kind": kind,
        "address": _gcs_address(ctx),
        "dashboard_url": _http(getattr(ctx, "dashboard_url", None)),
        "namespace": namespace,
        "auth": os.environ.get(auth.AUTH_MODE_ENV, "disabled"),
        "token_path": os.environ.get(auth.TOKEN_PATH_ENV),
        "node_id": ray.get_runtime_context().get_node_id(),
        "sites": {},
    }
    if topology is not None and check_sites:
        try:
            info["sites"] = check_site_nodes(topology, wait_s=0.0 if kind == "embedded" else wait_s)
        except BaseException:
            shutdown()
            raise
    return info


def join_or_start(address: str | None, topology: Topology) -> bool:
    """What a run's driver does: join ``address`` (or ``RAY_ADDRESS``), else start an embedded
    cluster with the topology's resources.

    Returns whether this call connected (and so the driver should disconnect at the end); an
    already initialised Ray (a test's module fixture, a job's driver) is used as it is. An
    embedded cluster gets as many logical CPUs as the cloud and the edge actors ask for, even
    beyond the machine's cores: sites on one machine time-share it, as in the local launcher.
    """
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        connect(address, topology)
    else:
        cpus = topology.cloud.num_cpus + sum(s.actor_cpus for s in topology.sites)
        connect(None, topology, num_cpus=math.ceil(cpus))
    return True


def check_site_nodes(topology: Topology, *, wait_s: float = 0.0) -> dict[str, str]:
    """Map each site to the id of the alive node that advertises ``edge:<site>``.

    Raises :class:`SiteNodesError` naming every site with no such node (after waiting up to
    ``wait_s`` for nodes that are still joining) or advertised by more than one node (an actor
    pinned to it could land on either).
    """
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        found: dict[str, list[str]] = {s: [] for s in topology.site_names}
        for node in nodes:
            for site in topology.site_names:
                if node.get("Resources", {}).get(site_resource(site), 0) > 0:
                    found[site].append(node["NodeID"])
        missing = [s for s, ids in found.items() if not ids]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.5)

    doubled = {s: ids for s, ids in found.items() if len(ids) > 1}
    if missing or doubled:
        lines = []
        if missing:
            lines.append(f"no alive node advertises the resource of site(s) {missing} "
                         f"(expected resources {[site_resource(s) for s in missing]})")
        for s, ids in doubled.items():
            lines.append(f"site {s!r} is advertised by {len(ids)} nodes: {ids}")
        seen = sorted({k for n in nodes for k in n.get("Resources", {})
                       if k.startswith("edge:") or k == CLOUD_RESOURCE})
        lines.append(f"alive nodes: {len(nodes)}; custom resources seen: {seen}")
        raise SiteNodesError("; ".join(lines))
    return {s: ids[0] for s, ids in found.items()}


def shutdown() -> None:
    """Disconnect from (or stop the embedded) Ray and restore the auth environment."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _restore_env()


def _restore_env() -> None:
    global _saved_env
    if _saved_env is not None:
        auth.restore_process(_saved_env)
        _saved_env = None


def _embedded_auth(token_path: str | Path | None) -> dict[str, str | None]:
    if token_path is not None:
        return auth.token_env(auth.write_token_file(token_path))
    mode = os.environ.get(auth.AUTH_MODE_ENV)
    if mode is None:
        return auth.ephemeral_token_env()
    if mode == "token" and not (os.environ.get(auth.TOKEN_ENV)
                                or os.environ.get(auth.TOKEN_PATH_ENV)):
        # Token mode asked for with no token: Ray would write ~/.ray/auth_token; don't let it.
        return auth.ephemeral_token_env()
    return {}


def _join_auth(address: str, token_path: str | Path | None,
               state_dir: str | Path | None) -> tuple[str, dict[str, str | None]]:
    """The address to pass to Ray and the auth environment to join it with."""
    running = read_running_state(state_dir)
    if address == "auto" and running is not None:
        address = running.address
    if token_path is not None:
        return address, auth.token_env(token_path)
    if os.environ.get(auth.AUTH_MODE_ENV) is not None:
        return address, {}
    if os.environ.get(auth.TOKEN_ENV) or os.environ.get(auth.TOKEN_PATH_ENV):
        return address, {auth.AUTH_MODE_ENV: "token"}
    if running is not None and address_matches(running, address):
        return address, auth.token_env(running.token_path)
    return address, auth.disabled_env()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, in one sentence, when nothing listens at a ``host:port`` address: Ray
    itself retries for minutes, printing a warning every few seconds."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto" or ray://: Ray's own discovery and errors
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers at {address} ({err.strerror or err}): "
                              f"is it up (edgemeta cluster status), and is the address "
                              f"right?") from None


def _gcs_address(ctx: Any) -> str | None:
    info = getattr(ctx, "address_info", None)
    if isinstance(info, dict):
        return info.get("gcs_address") or info.get("address")
    return None


def _http(url: str | None) -> str | None:
    if not url:
        return None
    return url if url.startswith(("http://", "https://")) else f"http://{url}"
