"""Read ``cluster.yaml`` (the ``ray up`` config) and derive from it what runs on one machine.

The cloud config is the source of truth for the node types; the fake multi-node config
(``cluster/fake_cluster.yaml``) and the matching :class:`Topology` are computed from it, so a
site added to one cannot be missing from the other (a test compares the committed fake file with
:func:`fake_cluster_config`). Regenerate the fake file with ``python -m cluster.cloud_config``.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...``) has the head's autoscaler start each worker node type as a local
raylet with the type's ``resources``: the same mechanism and the same custom resources as on the
cloud, without instances. (``ray up`` with that provider is broken in Ray 2.60: its defaults
file is missing from the wheel.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from cluster.topology import CLOUD_RESOURCE, Site, Topology, TopologyError

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
FAKE_CLUSTER_YAML = Path(__file__).resolve().parent / "fake_cluster.yaml"
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider names its head node type so

# Each fake node is a raylet on this machine: keep it small (1 CPU, 100 MiB object store). The
# fake provider cannot limit a node's `memory` (Ray rejects it as a custom resource), so each
# fake node advertises most of the host's memory; fine for a test, wrong for capacity planning.
FAKE_NODE_CPUS = 1
FAKE_NODE_OBJECT_STORE = 100 * 2**20

_HEADER = """\
# GENERATED from cluster.yaml by `python -m cluster.cloud_config`; do not edit by hand.
# The same node types and custom resources as cluster.yaml, for Ray's fake multi-node provider:
#   RAY_FAKE_CLUSTER=1 ray start --head --resources='{"cloud": 1000}' \\
#       --autoscaling-config=cluster/fake_cluster.yaml
# (set provider.gcs_address if the head does not listen on port 6379; cluster.local.up does.)
"""


def load_cluster_yaml(path: str | Path = CLUSTER_YAML) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise TopologyError(f"cluster config {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TopologyError(f"cluster config {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict) or "available_node_types" not in cfg:
        raise TopologyError(f"cluster config {path} has no available_node_types")
    return cfg


def site_node_types(cfg: dict[str, Any]) -> dict[str, str]:
    """Worker node type -> the site it serves, checking each declares exactly one site resource
    and the head declares ``cloud``."""
    types = cfg["available_node_types"]
    head = cfg.get("head_node_type")
    if head not in types:
        raise TopologyError(f"head_node_type {head!r} is not one of {sorted(types)}")
    if CLOUD_RESOURCE not in (types[head].get("resources") or {}):
        raise TopologyError(f"head node type {head!r} must declare the {CLOUD_RESOURCE!r} "
                            f"resource")
    sites: dict[str, str] = {}
    for name, node_type in types.items():
        if name == head:
            continue
        edge = [r for r in (node_type.get("resources") or {}) if r.startswith("edge:")]
        if len(edge) != 1:
            raise TopologyError(f"worker node type {name!r} must declare exactly one edge:<site> "
                                f"resource, found {edge}")
        site = edge[0].split(":", 1)[1]
        if site in sites.values():
            raise TopologyError(f"site {site!r} is declared by more than one node type")
        sites[name] = site
    if not sites:
        raise TopologyError("the cluster config declares no edge site node types")
    return sites


def fake_cluster_config(cfg: dict[str, Any], *, gcs_address: str | None = None) -> dict[str, Any]:
    """An autoscaling config for the fake multi-node provider with ``cfg``'s node types."""
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    node_types: dict[str, Any] = {
        FAKE_HEAD_TYPE: {"resources": {"CPU": FAKE_NODE_CPUS,
                                       **types[head].get("resources", {})},
                         "node_config": {}, "max_workers": 0},
    }
    for name in site_node_types(cfg):
        node_type = types[name]
        node_types[name] = {
            "resources": {"CPU": FAKE_NODE_CPUS, "object_store_memory": FAKE_NODE_OBJECT_STORE,
                          **node_type.get("resources", {})},
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": node_type.get("max_workers", node_type.get("min_workers", 0)),
        }
    provider: dict[str, Any] = {"type": "fake_multinode", "use_node_id_as_ip": True,
                                "disable_node_updaters": True,
                                "disable_launch_config_check": True}
    if gcs_address:
        provider["gcs_address"] = gcs_address
    return {
        "cluster_name": f"{cfg.get('cluster_name', 'edgemeta')}-fake",
        "max_workers": cfg.get("max_workers", len(node_types) - 1),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": cfg.get("idle_timeout_minutes", 10),
        "provider": provider,
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def fake_cluster_yaml_text(cfg: dict[str, Any]) -> str:
    return _HEADER + yaml.safe_dump(fake_cluster_config(cfg), sort_keys=False)


def topology_from_cluster_config(cfg: dict[str, Any], *, head_port: int = 6379,
                                 dashboard_port: int = 8265) -> Topology:
    """The topology of ``cfg``'s sites, with nodes sized like the fake provider's raylets."""
    gib = 2**30
    size = {"num_cpus": FAKE_NODE_CPUS, "object_store_gb": FAKE_NODE_OBJECT_STORE / gib}
    return Topology(sites=[Site(name=s, **size) for s in site_node_types(cfg).values()],
                    head_port=head_port, dashboard_port=dashboard_port)


def main(argv: list[str] | None = None) -> int:
    """Regenerate cluster/fake_cluster.yaml from cluster.yaml."""
    args = argv if argv is not None else sys.argv[1:]
    src = Path(args[0]) if args else CLUSTER_YAML
    dest = Path(args[1]) if len(args) > 1 else FAKE_CLUSTER_YAML
    dest.write_text(fake_cluster_yaml_text(load_cluster_yaml(src)))
    print(f"wrote {dest} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
