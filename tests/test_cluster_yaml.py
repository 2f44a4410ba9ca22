"""cluster.yaml (for `ray up` on AWS), checked offline, and brought up with Ray's fake provider.

The offline checks use Ray's own ``prepare_config`` and ``validate_config``: no credentials, no
network. The fake-provider test starts a head whose autoscaler launches every worker node type
of cluster.yaml as a local raylet, with that type's custom resources.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import yaml

from cluster import cloud_config, local, procs
from cluster.ports import first_free_port
from cluster.state import ClusterInfo
from cluster.topology import CLOUD_RESOURCE, SITE_RESOURCE_QUANTITY, TopologyError, load_topology

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> dict:
    return cloud_config.load_cluster_yaml(REPO / "cluster.yaml")


def test_validates_with_rays_own_schema(cfg: dict) -> None:
    from ray.autoscaler._private.util import (  # noqa: PLC2701 - Ray exposes no public validator
        prepare_config,
        validate_config,
    )

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "cloud"


def test_validator_is_not_a_no_op(cfg: dict) -> None:
    from ray.autoscaler._private.util import (  # noqa: PLC2701 - Ray exposes no public validator
        prepare_config,
        validate_config,
    )

    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["edge-site-0"]["resources"] = "edge:site-0"  # not a mapping
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's or its own errors
        validate_config(prepare_config(bad))


def test_head_declares_cloud_and_each_worker_exactly_one_site(cfg: dict) -> None:
    types = cfg["available_node_types"]
    assert types["cloud"]["resources"] == {CLOUD_RESOURCE: SITE_RESOURCE_QUANTITY}
    sites = cloud_config.site_node_types(cfg)
    assert sites == {f"edge-site-{i}": f"site-{i}" for i in range(4)}
    for name, site in sites.items():
        assert types[name]["resources"] == {f"edge:{site}": SITE_RESOURCE_QUANTITY}
        assert types[name]["min_workers"] == types[name]["max_workers"] == 1
    assert cfg["max_workers"] >= sum(types[n]["max_workers"] for n in sites)


def test_sites_match_the_local_topology(cfg: dict) -> None:
    local4 = load_topology(REPO / "cluster" / "topologies" / "local4.yaml")
    assert sorted(cloud_config.site_node_types(cfg).values()) == local4.site_names


def test_commands_auth_dashboard_and_install_order(cfg: dict) -> None:
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    for cmd in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=" in cmd
    assert "--dashboard-host=127.0.0.1" in head
    assert """--resources='{"cloud": 1000}'""" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    token_mount = cfg["file_mounts"]["~/.edgemeta/auth_token"]
    assert token_mount.endswith("cloud_auth_token")
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(setup) if '-e "$HOME/edgemeta[data]"' in c)
    assert torch_at < project_at
    assert "download.pytorch.org/whl/cpu" in setup[torch_at]


def test_every_node_gets_run_storage_and_its_own_data(cfg: dict) -> None:
    """The run-storage env file is mounted on every node and exported to every `ray start`
    (so job drivers and replicas see EDGEMETA_RUN_STORAGE); the cloud fetches the data for
    its meta-test, and each edge node fetches it and shards exactly its own site's store."""
    env_file = "~/.edgemeta/run_storage.env"
    assert cfg["file_mounts"][env_file] == env_file
    for cmd in (*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]):
        if "ray start" in cmd:
            assert cmd.index(f". {env_file}") < cmd.index("ray start"), cmd
    assert cfg["head_setup_commands"] == ["edgemeta data fetch omniglot"]
    for name, site in cloud_config.site_node_types(cfg).items():
        (command,) = cfg["available_node_types"][name]["worker_setup_commands"]
        fetch, shard = command.split(" && ")
        assert fetch == "edgemeta data fetch omniglot"
        assert shard.split() == ["edgemeta", "data", "shard", "federated_omniglot_4sites",
                                 "--site", site, "--stores", "~/edgemeta-stores"]


def test_readme_commands_match_cluster_yaml() -> None:
    """The README's cloud commands are the ones cluster.yaml's header documents."""
    readme = (REPO / "README.md").read_text()
    header = "\n".join(line[2:] for line in (REPO / "cluster.yaml").read_text().splitlines()
                       if line.startswith("#   "))
    section = readme.split("### On a public cloud: `ray up`")[1].split("\n## ")[0]
    for command in ("ray up -y cluster.yaml", "edgemeta submit federated_omniglot_4sites "
                    "--address http://127.0.0.1:8265", "--set federated.data.stores="
                    "~/edgemeta-stores", "ray down -y cluster.yaml",
                    "EDGEMETA_RUN_STORAGE=s3://YOUR-BUCKET/edgemeta/runs"):
        assert command in header, command
        assert command in section, command


def test_site_node_types_rejects_bad_shapes(cfg: dict) -> None:
    two = copy.deepcopy(cfg)
    two["available_node_types"]["edge-site-0"]["resources"]["edge:site-9"] = 1000
    with pytest.raises(TopologyError, match="exactly one edge:<site>"):
        cloud_config.site_node_types(two)
    twice = copy.deepcopy(cfg)
    twice["available_node_types"]["edge-site-1"]["resources"] = {"edge:site-0": 1000}
    with pytest.raises(TopologyError, match="more than one node type"):
        cloud_config.site_node_types(twice)
    no_cloud = copy.deepcopy(cfg)
    no_cloud["available_node_types"]["cloud"]["resources"] = {}
    with pytest.raises(TopologyError, match="must declare the 'cloud'"):
        cloud_config.site_node_types(no_cloud)


def test_committed_fake_config_is_derived_from_cluster_yaml(cfg: dict) -> None:
    committed = (REPO / "cluster" / "fake_cluster.yaml").read_text()
    assert committed == cloud_config.fake_cluster_yaml_text(cfg), \
        "cluster/fake_cluster.yaml is stale: run `python -m cluster.cloud_config`"
    fake = yaml.safe_load(committed)
    assert fake["provider"]["type"] == "fake_multinode"
    for name, spec in fake["available_node_types"].items():
        if name == cloud_config.FAKE_HEAD_TYPE:
            assert spec["resources"][CLOUD_RESOURCE] == SITE_RESOURCE_QUANTITY
        else:
            assert spec["resources"][f"edge:{cloud_config.site_node_types(cfg)[name]}"] == 1000


def test_fake_config_follows_a_new_site(cfg: dict) -> None:
    grown = copy.deepcopy(cfg)
    grown["available_node_types"]["edge-site-4"] = {
        "min_workers": 1, "max_workers": 1, "resources": {"edge:site-4": 1000},
        "node_config": {"InstanceType": "m5.large"}}
    fake = cloud_config.fake_cluster_config(grown)
    assert "edge:site-4" in fake["available_node_types"]["edge-site-4"]["resources"]
    assert cloud_config.topology_from_cluster_config(grown).site_names[-1] == "site-4"


@pytest.mark.slow
def test_fake_provider_launches_every_site(cfg: dict, tmp_path: Path) -> None:
    from cluster.connect import check_site_nodes, connect, shutdown

    topo = cloud_config.topology_from_cluster_config(
        cfg, head_port=first_free_port(6395, 6420),
        dashboard_port=first_free_port(8275, 8300))
    state = tmp_path / "state"
    t0 = time.monotonic()
    info = local.up(topo, state, autoscaling_config=cloud_config.fake_cluster_config(cfg),
                    timeout_s=150)
    try:
        started = time.monotonic() - t0
        connect(info.address, topo, state_dir=state, check_sites=False)
        try:
            deadline = time.monotonic() + 60
            while True:  # up() waited already; this is the driver's own view, by ray.nodes()
                try:
                    sites = check_site_nodes(topo)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            import ray

            head_id = ray.get_runtime_context().get_node_id()
            assert len(set(sites.values())) == len(topo.sites)  # one node per site
            assert head_id not in sites.values()
        finally:
            shutdown()
        print(f"fake cluster with {len(topo.sites)} sites up in {started:.1f} s")
    finally:
        local.down(state, grace_s=5)
    _assert_no_processes(info)


def _assert_no_processes(info: ClusterInfo) -> None:
    deadline = time.monotonic() + 10
    while True:
        table = procs.process_table()
        sessions = {n.session for n in info.nodes.values() if n.session}
        left = [p for p in table.values() if p.live
                and (p.sid in sessions or info.temp_root in p.cmdline) and p.pid != os.getpid()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, [(p.pid, p.comm) for p in left]
    assert not Path(info.temp_root).exists()


def test_head_starts_with_the_same_ray_system_config_as_local_clusters(cfg: dict) -> None:
    import json
    import re

    from cluster.settings import RAY_SYSTEM_CONFIG

    head = " ".join(cfg["head_start_ray_commands"])
    found = re.search(r"--system-config='([^']*)'", head)
    assert found, "cluster.yaml's head `ray start` sets no --system-config"
    assert json.loads(found.group(1)) == dict(RAY_SYSTEM_CONFIG)
