"""The nodes of the local cluster, one ``ray start`` each: started, watched in the GCS, stopped.

:mod:`cluster.local` decides which nodes to start or stop and when; this module knows how. How
processes are owned, and why ``ray stop`` is not used: ``ray stop`` kills every Ray process on
the host by name (raylet, gcs_server, dashboard, ...), whichever cluster it belongs to, so on a
shared machine it takes down other people's clusters too. Instead every ``ray start`` is
launched as the leader of a new session (``start_new_session``); everything it spawns (GCS,
dashboard, raylet, agents, and the workers the raylet forks) inherits that session id, which is
recorded in the state file. Stopping a node signals exactly the processes of its session, plus
their descendants that opened sessions of their own (``ray job`` drivers do), plus anything
whose command line names this cluster's temp dir (see :mod:`cluster.procs`).

Other choices, each measured on Ray 2.60:

- Every node gets its own ``--temp-dir`` (a short path under /tmp: Unix socket paths are limited
  to 107 bytes). Nodes sharing one temp dir also share its ``runtime_resources`` folder, where
  ``ray job submit --working-dir`` unpacks packages; separate folders remove that coupling.
- Ports Ray would otherwise take at fixed defaults (the dashboard agent's 52365 and the Ray
  Client server's 10001) are picked free per node, so two clusters on one host do not collide.
- ``--node-ip-address=127.0.0.1`` is passed, but Ray 2.60 rewrites a loopback address to the
  host's address (``resolve_ip_for_localhost``) and its GCS and raylets listen on all
  interfaces; only the dashboard honours ``--dashboard-host=127.0.0.1``. Token authentication
  (always on here, token file 0600 in the state dir) is what keeps other hosts out.
- ``PATH`` of the nodes starts with this interpreter's folder, so the ``python`` of a job's
  entrypoint is the project's virtualenv, not the system Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from cluster import auth, procs
from cluster.console import Printer
from cluster.ports import free_port
from cluster.settings import LOCAL_HEALTH_CHECK_CONFIG, RAY_SYSTEM_CONFIG
from cluster.state import HEAD, ClusterError, ClusterInfo, NodeProcess
from cluster.topology import (
    CLOUD_RESOURCE,
    SITE_RESOURCE_QUANTITY,
    NodeResources,
    TopologyError,
    site_resource,
)

GIB = 2**30
MIN_OBJECT_STORE_BYTES = 78_643_200  # Ray refuses less than 75 MiB


# ---------------------------------------------------------------------------------------------
# Before starting


def check_node_resources(name: str, resources: NodeResources) -> None:
    """Refuse what ``ray start`` would refuse, before anything is started, naming the node."""
    if float(resources.num_cpus) != int(resources.num_cpus):
        raise TopologyError(f"node {name}: num_cpus must be a whole number for `ray start`, "
                            f"got {resources.num_cpus}")
    if resources.object_store_gb * GIB < MIN_OBJECT_STORE_BYTES:
        raise TopologyError(f"node {name}: object_store_gb {resources.object_store_gb} is below "
                            f"Ray's minimum of 75 MiB")


def temp_root(state_dir: Path) -> Path:
    """A short, per-state-dir temp root (Ray's socket paths must stay under 107 bytes)."""
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 20:
        base = Path("/tmp")
    return base / f"edgemeta-{digest}"


def new_node_record(info: ClusterInfo, name: str, kind: str, index: int) -> NodeProcess:
    """The record of a node not started yet: its temp dir and its ``ray start`` log."""
    return NodeProcess(name=name, kind=kind, temp_dir=str(Path(info.temp_root) / f"n{index}"),
                       agent_port=0, log=str(Path(info.state_dir) / "logs" / f"{name}.log"))


def write_autoscaling_config(info: ClusterInfo, config: Mapping[str, Any], head_port: int) -> Path:
    """Save the autoscaling config with the provider pointed at this head's GCS port."""
    cfg = json.loads(json.dumps(config))
    cfg.setdefault("provider", {})["gcs_address"] = f"127.0.0.1:{head_port}"
    path = Path(info.state_dir) / "autoscaling.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


# ---------------------------------------------------------------------------------------------
# Starting


def start_nodes(info: ClusterInfo, names: list[str], extra_env: Mapping[str, str] | None,
                client_port: int | None = None, autoscaling: Path | None = None) -> None:
    """Run ``ray start`` for ``names`` at once (each a new session) and wait for all to exit.

    Sites start in parallel: each ``ray start`` spends most of its ~5 s waiting on its raylet.
    Each session is saved in the state file as soon as it exists, so a failure can clean up.
    """
    launched: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for name in names:
            node = info.nodes[name]
            node.agent_port = free_port()
            node.node_id = ""
            Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
            cmd = _start_command(info, name, client_port, autoscaling)
            with open(node.log, "a") as log:
                log.write(f"\n$ {' '.join(cmd)}\n")
                log.flush()
                proc = _popen_session(cmd, _node_env(info, extra_env), log)
            node.session = proc.pid
            launched.append((name, proc))
            info.save()
        failed = []
        for name, proc in launched:
            rc = proc.wait(timeout=180)
            if rc != 0:
                failed.append(f"`ray start` for node '{name}' failed (exit {rc}); last lines of "
                              f"{info.nodes[name].log}:\n{_tail(info.nodes[name].log)}")
    except BaseException:
        for _, proc in launched:
            if proc.poll() is None:
                proc.kill()
        raise
    if failed:
        raise ClusterError("\n".join(failed))


def _start_command(info: ClusterInfo, name: str, client_port: int | None,
                   autoscaling: Path | None = None) -> list[str]:
    topo = info.topo
    node = info.nodes[name]
    resources: NodeResources = topo.cloud if name == HEAD else topo.site(name)
    custom = ({CLOUD_RESOURCE: SITE_RESOURCE_QUANTITY} if name == HEAD
              else {site_resource(name): SITE_RESOURCE_QUANTITY})
    cmd = [_ray_executable(), "start"]
    if name == HEAD:
        cmd += ["--head", f"--port={topo.head_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={topo.dashboard_port}", "--include-dashboard=true",
                f"--ray-client-server-port={client_port}", "--disable-usage-stats",
                f"--system-config={json.dumps(head_system_config())}"]
        if autoscaling is not None:
            cmd += [f"--autoscaling-config={autoscaling}"]
    else:
        cmd += [f"--address={info.address}"]
    cmd += ["--node-ip-address=127.0.0.1", f"--node-name={name}",
            f"--num-cpus={int(resources.num_cpus)}", f"--memory={int(resources.memory_gb * GIB)}",
            f"--object-store-memory={int(resources.object_store_gb * GIB)}",
            f"--resources={json.dumps(custom)}", f"--temp-dir={node.temp_dir}",
            f"--dashboard-agent-listen-port={node.agent_port}"]
    return cmd


def head_system_config() -> dict[str, int]:
    """The head's ``--system-config``: what every edgemeta cluster sets, and the local
    cluster's quick health checks (:data:`cluster.settings.LOCAL_HEALTH_CHECK_CONFIG`)."""
    return {**RAY_SYSTEM_CONFIG, **LOCAL_HEALTH_CHECK_CONFIG}


def _node_env(info: ClusterInfo, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = auth.merged_env(os.environ, auth.token_env(info.token_path))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_FAKE_CLUSTER"):
        env.pop(var, None)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.update(extra or {})
    return env


def _popen_session(cmd: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


# ---------------------------------------------------------------------------------------------
# The GCS's view


def list_nodes(info: ClusterInfo, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Nodes as the GCS sees them, through the dashboard's state API (with the token)."""
    url = f"{info.dashboard_url}/api/v0/nodes?limit=10000&timeout={int(timeout_s)}&detail=1"
    req = urllib.request.Request(url, headers=auth.bearer_headers(auth.read_token(info.token_path)))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ClusterError(f"cannot reach the dashboard at {info.dashboard_url}: {err}") from None
    result = body.get("data", {}).get("result", {})
    return list(result.get("result", [])) if isinstance(result, dict) else list(result)


def wait_nodes(info: ClusterInfo, names: Iterable[str], timeout_s: float) -> None:
    """Wait until each named node is ALIVE in the GCS with its resource, and record its id."""
    names = list(names)
    deadline = time.monotonic() + timeout_s
    last_err = ""
    while True:
        try:
            nodes = list_nodes(info)
            last_err = ""
        except ClusterError as err:
            nodes, last_err = [], str(err)
        pending = []
        for name in names:
            want = CLOUD_RESOURCE if name == HEAD else site_resource(name)
            alive = [n for n in nodes if n.get("state") == "ALIVE"
                     and want in (n.get("resources_total") or {})]
            if alive:
                info.nodes[name].node_id = alive[0]["node_id"]
            else:
                pending.append(name)
        if not pending:
            info.save()
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {log}\n{_tail(log)}"
                             for log in dict.fromkeys(_log_for(info, n) for n in pending))
            raise ClusterError(f"node(s) {pending} not alive after {timeout_s:.0f} s"
                               f"{'; ' + last_err if last_err else ''}\n{logs}")
        time.sleep(0.5)


def _log_for(info: ClusterInfo, name: str) -> str:
    """Where to look when a node does not come up: its `ray start` output, or for a node the
    autoscaler launches, the head's autoscaler log."""
    node = info.nodes[name]
    if node.launched_by == "autoscaler":
        return str(Path(info.nodes[HEAD].temp_dir, "session_latest", "logs", "monitor.log"))
    return node.log


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# Stopping


def node_pids(table: Mapping[int, procs.Proc], node: NodeProcess) -> list[int]:
    """A node's live processes: its session, users of its temp dir, and their descendants."""
    return procs.owned_pids(table, [node.session], node.temp_dir + "/")


def stop_nodes(info: ClusterInfo, *, grace_s: float, echo: Printer) -> int:
    """Stop every node of ``info``: sites, then the head; within a node Ray's own order:
    raylet, other processes, GCS. Returns how many processes were signalled.

    Measured: with that order every process exits on SIGTERM within ~1-3 s; signalled all at
    once, the GCS, the autoscaler monitor and others ignore SIGTERM until SIGKILL.
    """
    sites = [n for n in info.nodes.values() if n.kind == "site"]
    heads = [n for n in info.nodes.values() if n.kind == "head"]
    stopped = stop_group(sites, grace_s=grace_s, echo=echo)
    stopped += stop_group(heads, grace_s=grace_s, echo=echo)
    # anything that still names the cluster's temp dir (a worker re-parented mid-shutdown)
    stray = procs.owned_pids(procs.process_table(), [], info.temp_root + "/")
    procs.send(stray, signal.SIGKILL)
    return stopped + len(stray)


def stop_group(group: list[NodeProcess], *, grace_s: float, echo: Printer) -> int:
    """Stop the processes of the nodes in ``group`` in Ray's order (raylet, others, GCS):
    SIGTERM, up to ``grace_s``, then SIGKILL. Whatever is left of a node whose raylet was
    killed (its log monitor, agents, workers) is found the same way: by session and temp dir."""
    stopped = 0
    for bucket in ("raylet", "other", "gcs_server"):
        table = procs.process_table()
        pids = sorted({p for n in group for p in node_pids(table, n)
                       if _bucket(table[p].comm) == bucket})
        killed = procs.terminate(pids, grace_s)
        if killed:
            echo(f"{len(killed)} process(es) ignored SIGTERM for {grace_s:.0f} s; sent SIGKILL")
        stopped += len(pids)
    return stopped


def has_raylet(table: Mapping[int, procs.Proc], node: NodeProcess) -> bool:
    """Whether the node's raylet runs (its other processes may outlive a killed raylet)."""
    return any(table[p].comm == "raylet" for p in node_pids(table, node))


def _bucket(comm: str) -> str:
    return comm if comm in ("raylet", "gcs_server") else "other"
