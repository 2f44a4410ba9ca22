"""A real multi-node Ray cluster on this one machine: a head for the cloud, a raylet per site.

Each node is its own ``ray start`` with its own ``--resources``, CPU and memory flags, so to Ray
the sites are separate nodes: an actor pinned to ``edge:site-1`` runs in site-1's raylet, and
killing that raylet is a node failure. Used for fault tests and the end-to-end demo.

How processes are owned, and why ``ray stop`` is not used: ``ray stop`` kills every Ray process
on the host by name (raylet, gcs_server, dashboard, ...), whichever cluster it belongs to, so on
a shared machine it takes down other people's clusters too. Instead every ``ray start`` is
launched as the leader of a new session (``start_new_session``); everything it spawns (GCS,
dashboard, raylet, agents, and the workers the raylet forks) inherits that session id, which
is recorded in the state file. Stopping a node signals exactly the processes of its session, plus
their descendants that opened sessions of their own (``ray job`` drivers do), plus anything
whose command line names this cluster's temp dir.

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

Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster import auth, procs
from cluster.connect import RAY_SYSTEM_CONFIG
from cluster.console import Printer
from cluster.topology import (
    CLOUD_RESOURCE,
    SITE_RESOURCE_QUANTITY,
    NodeResources,
    Topology,
    TopologyError,
    parse_topology,
    site_resource,
)

STATE_DIR_ENV = "EDGEMETA_STATE_DIR"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
HEAD = "cloud"
GIB = 2**30
MIN_OBJECT_STORE_BYTES = 78_643_200  # Ray refuses less than 75 MiB

# Faster failure detection for fault tests: with Ray's defaults the GCS declares a SIGKILLed
# raylet dead after ~15-18 s; with these, after ~2-3 s. Pass as ``up(..., env=...)``.
FAST_HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

class ClusterError(RuntimeError):
    """The local cluster cannot be started, found, or changed as asked; the message says why."""


def print_to_stderr(msg: str) -> None:
    print(f"[edgemeta cluster] {msg}", file=sys.stderr, flush=True)


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".edgemeta" / "cluster")


@dataclass
class NodeProcess:
    """One node of the local cluster: the session of its ``ray start`` and what Ray calls it."""

    name: str
    kind: str  # "head" or "site"
    temp_dir: str
    agent_port: int
    log: str
    session: int = 0
    node_id: str = ""
    launched_by: str = "edgemeta"  # or "autoscaler": a fake-provider node, in the head's session


@dataclass
class ClusterInfo:
    """What ``up`` started; saved as JSON in the state dir and read back by the other calls."""

    state_dir: str
    address: str
    dashboard_url: str
    client_address: str
    token_path: str
    temp_root: str
    topology: dict[str, Any]
    nodes: dict[str, NodeProcess] = field(default_factory=dict)

    @property
    def topo(self) -> Topology:
        return parse_topology(self.topology, "the cluster state file")

    def auth_env(self) -> dict[str, str]:
        """Environment variables a client needs to talk to this cluster."""
        return {auth.AUTH_MODE_ENV: "token", auth.TOKEN_PATH_ENV: self.token_path}

    def submit_hint(self, config: str = "CONFIG") -> str:
        """How to submit a job to this cluster, as shell lines to copy."""
        return (f"export {auth.AUTH_MODE_ENV}=token {auth.TOKEN_PATH_ENV}={self.token_path}\n"
                f"RAY_ADDRESS={self.dashboard_url} ray job submit --working-dir . -- "
                f"python -m experiments.federated {config}")

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: str | Path) -> ClusterInfo:
        raw = json.loads((Path(state_dir) / STATE_FILE).read_text())
        raw["nodes"] = {k: NodeProcess(**v) for k, v in raw["nodes"].items()}
        return cls(**raw)


# ---------------------------------------------------------------------------------------------
# Public API


def up(topology: Topology, state_dir: str | Path | None = None, *,
       env: Mapping[str, str] | None = None, timeout_s: float = 120.0,
       autoscaling_config: Mapping[str, Any] | None = None,
       echo: Printer = print_to_stderr) -> ClusterInfo:
    """Start the head (``cloud``) and one raylet per site; return once all are alive in the GCS.

    ``env`` adds variables to every node's environment (e.g. ``FAST_HEALTH_CHECK_ENV``). With
    ``autoscaling_config`` (a fake multi-node provider config, see :mod:`cluster.cloud_config`),
    only the head is started, with ``RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config=...``, and its autoscaler launches the sites. On any failure the nodes
    already started are stopped again before the error is raised.
    """
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    _check_startable(topology, state_dir, echo)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    token_path = auth.write_token_file(state_dir / TOKEN_FILE)
    temp_root = _temp_root(state_dir)
    if temp_root.exists():
        shutil.rmtree(temp_root, ignore_errors=True)
    temp_root.mkdir(parents=True)

    client_port = _free_port()
    info = ClusterInfo(
        state_dir=str(state_dir), address=f"127.0.0.1:{topology.head_port}",
        dashboard_url=f"http://127.0.0.1:{topology.dashboard_port}",
        client_address=f"ray://127.0.0.1:{client_port}", token_path=str(token_path),
        temp_root=str(temp_root), topology=topology.model_dump(mode="json"))
    info.nodes[HEAD] = _node_record(info, HEAD, "head", 0)
    for i, site in enumerate(topology.site_names, start=1):
        info.nodes[site] = _node_record(info, site, "site", i)
        if autoscaling_config is not None:
            info.nodes[site].launched_by = "autoscaler"
    info.save()
    head_env = dict(env or {})
    scaler_yaml = None
    if autoscaling_config is not None:
        scaler_yaml = _write_autoscaling_config(info, autoscaling_config, topology.head_port)
        head_env["RAY_FAKE_CLUSTER"] = "1"

    t0 = time.monotonic()
    try:
        echo(f"starting head '{HEAD}' on port {topology.head_port} "
            f"(dashboard {info.dashboard_url}, temp dir {temp_root})")
        _start_nodes(info, [HEAD], head_env, client_port=client_port, autoscaling=scaler_yaml)
        _wait_nodes(info, [HEAD], timeout_s)
        echo(f"head up in {time.monotonic() - t0:.1f} s")
        t1 = time.monotonic()
        if scaler_yaml is not None:
            echo(f"waiting for the autoscaler to launch {len(topology.sites)} site node(s)")
        else:
            echo(f"starting {len(topology.sites)} site raylet(s)")
            _start_nodes(info, topology.site_names, env)
        _wait_nodes(info, topology.site_names, timeout_s)
        for site in topology.site_names:
            echo(f"site '{site}' up (node {info.nodes[site].node_id[:12]}, "
                f"resource {site_resource(site)})")
        echo(f"sites up in {time.monotonic() - t1:.1f} s")
    except BaseException:
        echo("start-up failed; stopping the nodes started so far")
        _stop_all(info, grace_s=5.0, echo=echo)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
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
    n = _stop_all(info, grace_s=grace_s, echo=echo)
    if not keep_temp:
        shutil.rmtree(info.temp_root, ignore_errors=True)
    (Path(info.state_dir) / STATE_FILE).unlink(missing_ok=True)
    echo(f"cluster down: {n} process(es) stopped")
    return n


def status(state_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per node: name, kind, node id, GCS state, local processes, resources.

    ``alive`` is the GCS's view (None when the head cannot be reached); ``processes`` counts the
    node's local processes, so a killed site shows ``processes == 0`` before the GCS notices.
    """
    info = read_state(state_dir)
    try:
        gcs = {n["node_id"]: n for n in list_nodes(info)}
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
    ``FAST_HEALTH_CHECK_ENV``); ``wait_site(..., alive=False)`` waits for that.
    """
    info = read_state(state_dir)
    node = _site_node(info, site, owned=True)
    table = procs.process_table()
    pids = _node_pids(table, node)
    raylets = [p for p in pids if table[p].comm == "raylet"]
    procs.send(raylets, signal.SIGKILL)
    procs.send([p for p in pids if p not in raylets], signal.SIGKILL)
    procs.wait_gone(pids, 5.0)
    echo(f"killed site '{site}' (node {node.node_id[:12]}, {len(pids)} process(es))")
    return len(pids)


def start_site(state_dir: str | Path | None, site: str, *, env: Mapping[str, str] | None = None,
               timeout_s: float = 60.0, echo: Printer = print_to_stderr) -> ClusterInfo:
    """Start a site's raylet again (after ``kill_site``); it joins as a new node id."""
    info = read_state(state_dir)
    node = _site_node(info, site, owned=True)
    if _node_pids(procs.process_table(), node):
        raise ClusterError(f"site '{site}' still has running processes; kill_site it first")
    t0 = time.monotonic()
    _start_nodes(info, [site], env)
    _wait_nodes(info, [site], timeout_s)
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
            state = {n["node_id"]: n.get("state") for n in list_nodes(info)}.get(node.node_id)
            known = True
        except ClusterError as err:  # a busy dashboard: ask again until the deadline
            state, known = f"unknown ({err})", False
        if known and (state == "ALIVE") == alive:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise ClusterError(f"site '{site}' (node {node.node_id[:12]}) is still {state} "
                               f"after {timeout_s:.0f} s")
        time.sleep(0.5)


def read_state(state_dir: str | Path | None = None) -> ClusterInfo:
    state_dir = Path(state_dir or default_state_dir()).expanduser()
    if not (state_dir / STATE_FILE).exists():
        raise ClusterError(f"no local cluster recorded in {state_dir} "
                           f"(start one with `edgemeta cluster up TOPOLOGY`)")
    return ClusterInfo.load(state_dir)


def read_state_quietly(state_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The state file as a dict if a cluster is recorded there and its head runs, else None."""
    try:
        info = read_state(state_dir)
    except (ClusterError, OSError, ValueError, TypeError):
        return None
    if not procs.session_pids(procs.process_table(), [info.nodes[HEAD].session]):
        return None
    return asdict(info)


def address_matches(state: Mapping[str, Any], address: str) -> bool:
    """Whether ``address`` names the recorded cluster (its GCS port on this host)."""
    port = str(state["address"]).rsplit(":", 1)[-1]
    if address.startswith("ray://"):
        return address == state.get("client_address")
    host, _, addr_port = address.rpartition(":")
    return addr_port == port and host in {"127.0.0.1", "localhost", _host_ip(), ""}


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


# ---------------------------------------------------------------------------------------------
# Starting nodes


def _check_startable(topology: Topology, state_dir: Path, echo: Printer) -> None:
    if (state_dir / STATE_FILE).exists():
        try:
            old = ClusterInfo.load(state_dir)
        except (OSError, ValueError, TypeError):
            old = None
        running = old and procs.session_pids(procs.process_table(),
                                             [n.session for n in old.nodes.values()])
        if running:
            raise ClusterError(
                f"a cluster is already up from {state_dir} (address {old.address}, "
                f"{len(running)} processes); stop it with `edgemeta cluster down "
                f"--state-dir {state_dir}` or use another --state-dir")
        echo(f"removing stale state in {state_dir} (its processes are gone)")
        if old:
            shutil.rmtree(old.temp_root, ignore_errors=True)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    for name, spec in [(HEAD, topology.cloud), *((s.name, s) for s in topology.sites)]:
        _check_spec(name, spec)
    for what, port in (("head_port", topology.head_port),
                       ("dashboard_port", topology.dashboard_port)):
        if not _port_free(port):
            raise ClusterError(f"port {port} ({what} of the topology) is already in use, maybe by "
                               f"another Ray cluster; pick another {what} in the topology")


def _check_spec(name: str, spec: NodeResources) -> None:
    if float(spec.num_cpus) != int(spec.num_cpus):
        raise TopologyError(f"node {name}: num_cpus must be a whole number for `ray start`, "
                            f"got {spec.num_cpus}")
    if spec.object_store_gb * GIB < MIN_OBJECT_STORE_BYTES:
        raise TopologyError(f"node {name}: object_store_gb {spec.object_store_gb} is below Ray's "
                            f"minimum of 75 MiB")


def _node_record(info: ClusterInfo, name: str, kind: str, index: int) -> NodeProcess:
    return NodeProcess(name=name, kind=kind, temp_dir=str(Path(info.temp_root) / f"n{index}"),
                       agent_port=0, log=str(Path(info.state_dir) / "logs" / f"{name}.log"))


def _start_command(info: ClusterInfo, name: str, client_port: int | None,
                   autoscaling: Path | None = None) -> list[str]:
    topo = info.topo
    node = info.nodes[name]
    spec: NodeResources = topo.cloud if name == HEAD else topo.site(name)
    resources = ({CLOUD_RESOURCE: SITE_RESOURCE_QUANTITY} if name == HEAD
                 else {site_resource(name): SITE_RESOURCE_QUANTITY})
    cmd = [_ray_executable(), "start"]
    if name == HEAD:
        cmd += ["--head", f"--port={topo.head_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={topo.dashboard_port}", "--include-dashboard=true",
                f"--ray-client-server-port={client_port}", "--disable-usage-stats",
                f"--system-config={json.dumps(dict(RAY_SYSTEM_CONFIG))}"]
        if autoscaling is not None:
            cmd += [f"--autoscaling-config={autoscaling}"]
    else:
        cmd += [f"--address={info.address}"]
    cmd += ["--node-ip-address=127.0.0.1", f"--node-name={name}",
            f"--num-cpus={int(spec.num_cpus)}", f"--memory={int(spec.memory_gb * GIB)}",
            f"--object-store-memory={int(spec.object_store_gb * GIB)}",
            f"--resources={json.dumps(resources)}", f"--temp-dir={node.temp_dir}",
            f"--dashboard-agent-listen-port={node.agent_port}"]
    return cmd


def _node_env(info: ClusterInfo, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = auth.merged_env(os.environ, auth.token_env(info.token_path))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_FAKE_CLUSTER"):
        env.pop(var, None)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.update(extra or {})
    return env


def _start_nodes(info: ClusterInfo, names: list[str], extra_env: Mapping[str, str] | None,
                 client_port: int | None = None, autoscaling: Path | None = None) -> None:
    """Run ``ray start`` for ``names`` at once (each a new session) and wait for all to exit.

    Sites start in parallel: each ``ray start`` spends most of its ~5 s waiting on its raylet.
    """
    launched = []
    try:
        for name in names:
            node = info.nodes[name]
            node.agent_port = _free_port()
            node.node_id = ""
            Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
            cmd = _start_command(info, name, client_port, autoscaling)
            with open(node.log, "a") as log:
                log.write(f"\n$ {' '.join(cmd)}\n")
                log.flush()
                proc = _popen_session(cmd, _node_env(info, extra_env), log)
            node.session = proc.pid
            launched.append((name, proc))
            info.save()  # sessions are recorded before waiting, so a failure can clean up
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


def _write_autoscaling_config(info: ClusterInfo, config: Mapping[str, Any], head_port: int) -> Path:
    """Save the autoscaling config with the provider pointed at this head's GCS port."""
    cfg = json.loads(json.dumps(config))
    cfg.setdefault("provider", {})["gcs_address"] = f"127.0.0.1:{head_port}"
    path = Path(info.state_dir) / "autoscaling.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


def _popen_session(cmd: list[str], env: dict[str, str], log: Any) -> Any:
    import subprocess

    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_nodes(info: ClusterInfo, names: Iterable[str], timeout_s: float) -> None:
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


# ---------------------------------------------------------------------------------------------
# Stopping nodes


def _node_pids(table: Mapping[int, procs.Proc], node: NodeProcess) -> list[int]:
    """A node's live processes: its session, users of its temp dir, and their descendants."""
    return procs.owned_pids(table, [node.session], node.temp_dir + "/")


def _stop_all(info: ClusterInfo, *, grace_s: float, echo: Printer) -> int:
    """Sites, then the head; within a node Ray's own order: raylet, other processes, GCS.

    Measured: with that order every process exits on SIGTERM within ~1-3 s; signalled all at
    once, the GCS, the autoscaler monitor and others ignore SIGTERM until SIGKILL.
    """
    sites = [n for n in info.nodes.values() if n.kind == "site"]
    heads = [n for n in info.nodes.values() if n.kind == "head"]
    stopped = 0
    for group in (sites, heads):
        for bucket in ("raylet", "other", "gcs_server"):
            table = procs.process_table()
            pids = sorted({p for n in group for p in _node_pids(table, n)
                           if _bucket(table[p].comm) == bucket})
            killed = procs.terminate(pids, grace_s)
            if killed:
                echo(f"{len(killed)} process(es) ignored SIGTERM for {grace_s:.0f} s; "
                    f"sent SIGKILL")
            stopped += len(pids)
    # anything that still names the cluster's temp dir (a worker re-parented mid-shutdown)
    stray = procs.owned_pids(procs.process_table(), [], info.temp_root + "/")
    procs.send(stray, signal.SIGKILL)
    return stopped + len(stray)


def _bucket(comm: str) -> str:
    return comm if comm in ("raylet", "gcs_server") else "other"


# ---------------------------------------------------------------------------------------------
# Small helpers


def _site_node(info: ClusterInfo, site: str, *, owned: bool = False) -> NodeProcess:
    node = info.nodes.get(site)
    if node is None or node.kind != "site":
        sites = [n for n, v in info.nodes.items() if v.kind == "site"]
        raise ClusterError(f"no site {site!r} in the cluster; sites: {sites}")
    if owned and node.launched_by != "edgemeta":
        raise ClusterError(f"site {site!r} was launched by Ray's autoscaler, not by edgemeta; "
                           f"it cannot be killed or restarted on its own")
    return node


def _temp_root(state_dir: Path) -> Path:
    """A short, per-state-dir temp root (Ray's socket paths must stay under 107 bytes)."""
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 20:
        base = Path("/tmp")
    return base / f"edgemeta-{digest}"


def _ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def first_free_port(start: int, stop: int) -> int:
    """The first port in [start, stop) nothing listens on (tests use it to stay off defaults)."""
    for port in range(start, stop):
        if _port_free(port):
            return port
    raise ClusterError(f"no free port in {start}-{stop - 1}")


def _port_free(port: int) -> bool:
    for host in ("", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _host_ip() -> str:
    try:
        from ray._private.services import get_node_ip_address

        return str(get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

