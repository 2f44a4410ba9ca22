"""A real multi-node Ray cluster on this one machine: a head for the cloud, a raylet per site.

Each node is its own ``ray start`` with its own ``--resources``, CPU and memory flags, so to Ray
the sites are separate nodes: an actor pinned to ``edge:site-1`` runs in site-1's raylet, and
killing that raylet is a node failure. Used for fault tests and the end-to-end demo.

This module is the launcher's API (``edgemeta cluster up/down/status/stop-site/restart-site``
and the fault tests' kill of a site). What it started is recorded by :mod:`cluster.state`; how
one node is started, watched and stopped (each in a session of its own, never with ``ray
stop``) is in :mod:`cluster.nodes`. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster import auth, nodes, procs
from cluster.console import Printer
from cluster.ports import free_port, port_free
from cluster.state import (
    HEAD,
    TOKEN_FILE,
    ClusterError,
    ClusterInfo,
    NodeProcess,
    default_state_dir,
    read_state,
    state_file,
)
from cluster.topology import Topology, site_resource


def print_to_stderr(msg: str) -> None:
    print(f"[edgemeta cluster] {msg}", file=sys.stderr, flush=True)


def up(topology: Topology, state_dir: str | Path | None = None, *,
       env: Mapping[str, str] | None = None, timeout_s: float = 120.0,
       autoscaling_config: Mapping[str, Any] | None = None,
       echo: Printer = print_to_stderr) -> ClusterInfo:
    """Start the head (``cloud``) and one raylet per site; return once all are alive in the GCS.

    ``env`` adds variables to every node's environment (e.g.
    ``cluster.settings.FAST_HEALTH_CHECK_ENV``). With ``autoscaling_config`` (a fake multi-node
    provider config, see :mod:`cluster.cloud_config`), only the head is started, with
    ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``, and its autoscaler
    launches the sites. On any failure the nodes already started are stopped again before the
    error is raised.
    """
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    _check_startable(topology, state_dir, echo)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    token_path = auth.write_token_file(state_dir / TOKEN_FILE)
    temp_root = nodes.temp_root(state_dir)
    if temp_root.exists():
        shutil.rmtree(temp_root, ignore_errors=True)
    temp_root.mkdir(parents=True)

    client_port = free_port()
    info = ClusterInfo(
        state_dir=str(state_dir), address=f"127.0.0.1:{topology.head_port}",
        dashboard_url=f"http://127.0.0.1:{topology.dashboard_port}",
        client_address=f"ray://127.0.0.1:{client_port}", token_path=str(token_path),
        temp_root=str(temp_root), topology=topology.model_dump(mode="json"))
    info.nodes[HEAD] = nodes.new_node_record(info, HEAD, "head", 0)
    for i, site in enumerate(topology.site_names, start=1):
        info.nodes[site] = nodes.new_node_record(info, site, "site", i)
        if autoscaling_config is not None:
            info.nodes[site].launched_by = "autoscaler"
    info.save()
    head_env = dict(env or {})
    scaler_yaml = None
    if autoscaling_config is not None:
        scaler_yaml = nodes.write_autoscaling_config(info, autoscaling_config,
                                                     topology.head_port)
        head_env["RAY_FAKE_CLUSTER"] = "1"

    t0 = time.monotonic()
    try:
        echo(f"starting head '{HEAD}' on port {topology.head_port} "
             f"(dashboard {info.dashboard_url}, temp dir {temp_root})")
        nodes.start_nodes(info, [HEAD], head_env, client_port=client_port,
                          autoscaling=scaler_yaml)
        nodes.wait_nodes(info, [HEAD], timeout_s)
        echo(f"head up in {time.monotonic() - t0:.1f} s")
        t1 = time.monotonic()
        if scaler_yaml is not None:
            echo(f"waiting for the autoscaler to launch {len(topology.sites)} site node(s)")
        else:
            echo(f"starting {len(topology.sites)} site raylet(s)")
            nodes.start_nodes(info, topology.site_names, env)
        nodes.wait_nodes(info, topology.site_names, timeout_s)
        for site in topology.site_names:
            echo(f"site '{site}' up (node {info.nodes[site].node_id[:12]}, "
                 f"resource {site_resource(site)})")
        echo(f"sites up in {time.monotonic() - t1:.1f} s")
    except BaseException:
        echo("start-up failed; stopping the nodes started so far")
        nodes.stop_nodes(info, grace_s=5.0, echo=echo)
        state_file(state_dir).unlink(missing_ok=True)
        raise
    echo(f"cluster up: head + {len(topology.sites)} site(s) in {time.monotonic() - t0:.1f} s; "
         f"state in {state_dir}")
    return info


def down(state_dir: str | Path | None = None, *, grace_s: float = 10.0,
         keep_temp: bool = False, echo: Printer = print_to_stderr) -> int:
    """Stop exactly the processes of the cluster recorded in ``state_dir``; return how many.

    Sites first, then the head: SIGTERM, up to ``grace_s`` to exit, then SIGKILL. Removes the
    state file and (unless ``keep_temp``) the nodes' temp dirs, which hold Ray's logs.
    """
    info = read_state(state_dir)
    n = nodes.stop_nodes(info, grace_s=grace_s, echo=echo)
    if not keep_temp:
        shutil.rmtree(info.temp_root, ignore_errors=True)
    state_file(info.state_dir).unlink(missing_ok=True)
    echo(f"cluster down: {n} process(es) stopped")
    return n


def status(state_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per node: name, kind, node id, GCS state, local processes, resources.

    ``alive`` is the GCS's view (None when the head cannot be reached); ``processes`` counts the
    node's local processes, so a killed site shows ``processes == 0`` before the GCS notices.
    """
    info = read_state(state_dir)
    try:
        gcs = {n["node_id"]: n for n in nodes.list_nodes(info)}
    except ClusterError:
        gcs = None
    table = procs.process_table()
    rows = []
    for name, node in info.nodes.items():
        row: dict[str, Any] = {"name": name, "kind": node.kind, "node_id": node.node_id,
                               "processes": (len(procs.session_pids(table, [node.session]))
                                             if node.launched_by == "edgemeta" else None),
                               "alive": None, "resources": {}}
        if gcs is not None:
            g = gcs.get(node.node_id)
            row["alive"] = bool(g and g.get("state") == "ALIVE")
            row["resources"] = dict(g.get("resources_total", {})) if g else {}
        rows.append(row)
    return rows


def kill_site(state_dir: str | Path | None, site: str, *, echo: Printer = print_to_stderr) -> int:
    """SIGKILL a site's raylet and every other process of that node, as a machine loss would.

    Returns at once; the GCS marks the node dead after its health checks fail (see
    ``cluster.settings.FAST_HEALTH_CHECK_ENV``); ``wait_site(..., alive=False)`` waits for that.
    """
    info = read_state(state_dir)
    node = _site_node(info, site, owned=True)
    table = procs.process_table()
    pids = nodes.node_pids(table, node)
    raylets = [p for p in pids if table[p].comm == "raylet"]
    procs.send(raylets, signal.SIGKILL)
    procs.send([p for p in pids if p not in raylets], signal.SIGKILL)
    procs.wait_gone(pids, 5.0)
    echo(f"killed site '{site}' (node {node.node_id[:12]}, {len(pids)} process(es))")
    return len(pids)


def stop_site(state_dir: str | Path | None, site: str, *, grace_s: float = 10.0,
              echo: Printer = print_to_stderr) -> int:
    """Stop one site's node as ``down`` stops every node (SIGTERM, ``grace_s``, SIGKILL),
    including what a killed raylet left behind; returns how many processes were stopped."""
    info = read_state(state_dir)
    node = _site_node(info, site, owned=True)
    n = nodes.stop_group([node], grace_s=grace_s, echo=echo)
    echo(f"site '{site}' stopped ({n} process(es))" if n else f"site '{site}' was not running")
    return n


def restart_site(state_dir: str | Path | None, site: str, *, grace_s: float = 10.0,
                 env: Mapping[str, str] | None = None, timeout_s: float = 60.0,
                 echo: Printer = print_to_stderr) -> ClusterInfo:
    """Stop whatever runs of a site (a live node, or a killed raylet's leftovers) and start it
    again; it joins as a new node id, and actors pinned to the site come back on it."""
    stop_site(state_dir, site, grace_s=grace_s, echo=echo)
    return start_site(state_dir, site, env=env, timeout_s=timeout_s, echo=echo)


def start_site(state_dir: str | Path | None, site: str, *, env: Mapping[str, str] | None = None,
               timeout_s: float = 60.0, echo: Printer = print_to_stderr) -> ClusterInfo:
    """Start a site's raylet again (after ``kill_site`` or ``stop_site``); it joins as a new
    node id. Processes the last raylet left behind (its log monitor, say, which outlives a
    SIGKILLed raylet) are stopped first; a site whose raylet runs is refused."""
    info = read_state(state_dir)
    node = _site_node(info, site, owned=True)
    if nodes.has_raylet(procs.process_table(), node):
        raise ClusterError(f"site '{site}' is running; `edgemeta cluster restart-site {site}` "
                           "restarts it")
    left = nodes.stop_group([node], grace_s=2.0, echo=echo)
    if left:
        echo(f"stopped {left} process(es) left over from site '{site}''s last raylet")
    t0 = time.monotonic()
    nodes.start_nodes(info, [site], env)
    nodes.wait_nodes(info, [site], timeout_s)
    echo(f"site '{site}' back in {time.monotonic() - t0:.1f} s as node {node.node_id[:12]}")
    return info


def wait_site(state_dir: str | Path | None, site: str, *, alive: bool = True,
              timeout_s: float = 60.0) -> float:
    """Wait until the GCS reports ``site``'s recorded node alive (or dead); return seconds."""
    info = read_state(state_dir)
    node = _site_node(info, site)
    t0 = time.monotonic()
    while True:
        try:
            state = {n["node_id"]: n.get("state")
                     for n in nodes.list_nodes(info)}.get(node.node_id)
            known = True
        except ClusterError as err:  # a busy dashboard: ask again until the deadline
            state, known = f"unknown ({err})", False
        if known and (state == "ALIVE") == alive:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise ClusterError(f"site '{site}' (node {node.node_id[:12]}) is still {state} "
                               f"after {timeout_s:.0f} s")
        time.sleep(0.5)


def _check_startable(topology: Topology, state_dir: Path, echo: Printer) -> None:
    """Refuse to start over a running cluster or on taken ports; clear a stale state file."""
    if state_file(state_dir).exists():
        try:
            old = ClusterInfo.load(state_dir)
        except (OSError, ValueError, TypeError):
            old = None
        running = old and procs.session_pids(procs.process_table(), old.sessions())
        if running:
            raise ClusterError(
                f"a cluster is already up from {state_dir} (address {old.address}, "
                f"{len(running)} processes); stop it with `edgemeta cluster down "
                f"--state-dir {state_dir}` or use another --state-dir")
        echo(f"removing stale state in {state_dir} (its processes are gone)")
        if old:
            shutil.rmtree(old.temp_root, ignore_errors=True)
        state_file(state_dir).unlink(missing_ok=True)
    for name, node in [(HEAD, topology.cloud), *((s.name, s) for s in topology.sites)]:
        nodes.check_node_resources(name, node)
    for what, port in (("head_port", topology.head_port),
                       ("dashboard_port", topology.dashboard_port)):
        if not port_free(port):
            raise ClusterError(f"port {port} ({what} of the topology) is already in use, maybe by "
                               f"another Ray cluster; pick another {what} in the topology")


def _site_node(info: ClusterInfo, site: str, *, owned: bool = False) -> NodeProcess:
    node = info.nodes.get(site)
    if node is None or node.kind != "site":
        sites = [n for n, v in info.nodes.items() if v.kind == "site"]
        raise ClusterError(f"no site {site!r} in the cluster; sites: {sites}")
    if owned and node.launched_by != "edgemeta":
        raise ClusterError(f"site {site!r} was launched by Ray's autoscaler, not by edgemeta; "
                           f"it cannot be killed or restarted on its own")
    return node
