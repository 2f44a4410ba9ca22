"""The local cluster's state: what ``cluster.local.up`` started, kept as JSON in a state folder.

The launcher (:mod:`cluster.local`) writes it and reads it back for every later command (down,
status, kill a site); :mod:`cluster.connect` reads it to join that cluster with its token when
a driver names its address (or ``"auto"``). Both import this module and neither imports the
other.

The state folder (``~/.edgemeta/cluster``, or ``$EDGEMETA_STATE_DIR``, or ``--state-dir``) holds
the state file, the cluster's token (mode 0600) and the ``ray start`` logs of its nodes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster import auth, procs
from cluster.topology import Topology, parse_topology

STATE_DIR_ENV = "EDGEMETA_STATE_DIR"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
HEAD = "cloud"  # the head node's name in the state file (sites go by their own names)


class ClusterError(RuntimeError):
    """The local cluster cannot be started, found, or changed as asked; the message says why."""


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

    def sessions(self) -> list[int]:
        """The session ids of the nodes' ``ray start`` (0 for a node not started yet)."""
        return [n.session for n in self.nodes.values()]

    def save(self) -> None:
        """Write the state file atomically (a reader never sees half of it)."""
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: str | Path) -> ClusterInfo:
        raw = json.loads((Path(state_dir) / STATE_FILE).read_text())
        raw["nodes"] = {k: NodeProcess(**v) for k, v in raw["nodes"].items()}
        return cls(**raw)


def state_file(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


def read_state(state_dir: str | Path | None = None) -> ClusterInfo:
    """The cluster recorded in ``state_dir`` (default :func:`default_state_dir`)."""
    state_dir = Path(state_dir or default_state_dir()).expanduser()
    if not state_file(state_dir).exists():
        raise ClusterError(f"no local cluster recorded in {state_dir} "
                           f"(start one with `edgemeta cluster up TOPOLOGY`)")
    return ClusterInfo.load(state_dir)


def read_running_state(state_dir: str | Path | None = None) -> ClusterInfo | None:
    """The recorded cluster if there is one and its head still runs, else None (never raises
    for a missing or unreadable state file: a driver then joins without the launcher's token)."""
    try:
        info = read_state(state_dir)
    except (ClusterError, OSError, ValueError, TypeError, KeyError):
        return None
    head = info.nodes.get(HEAD)
    if head is None or not procs.session_pids(procs.process_table(), [head.session]):
        return None
    return info


def address_matches(info: ClusterInfo, address: str) -> bool:
    """Whether ``address`` names the recorded cluster: its Ray Client address, or its GCS port
    on this host by any of the host's names."""
    if address.startswith("ray://"):
        return address == info.client_address
    port = info.address.rsplit(":", 1)[-1]
    host, _, addr_port = address.rpartition(":")
    return addr_port == port and host in _this_host_names()


def _this_host_names() -> set[str]:
    """Loopback, the empty host, and the address Ray advertises for this host (which Ray 2.60
    uses instead of loopback for multi-node clusters)."""
    names = {"127.0.0.1", "localhost", ""}
    try:
        from ray.util import get_node_ip_address

        names.add(str(get_node_ip_address()))
    except Exception:  # Ray missing or no route: loopback names are still right
        pass
    return names
