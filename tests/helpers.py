"""Helpers shared by test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def train_tiny_run(out: Path, name: str, dataset: str) -> Path:
    """A real two-step MAML run folder (Omniglot with an 8-channel net, or sinusoid)."""
    from experiments.config import parse_config
    from experiments.train import train

    raw: dict[str, Any] = {"name": name, "output_dir": str(out), "seed": 0,
                           "train": {"steps": 2, "meta_batch": 2, "checkpoint_every": 1,
                                     "log_every": 1},
                           "eval": {"episodes": 5, "batch": 5}}
    if dataset == "omniglot":
        raw |= {"data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 3},
                "model": {"name": "omniglot_conv", "channels": 8},
                "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1,
                              "test_steps": 3}}
    else:
        raw |= {"data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
                "model": {"name": "sinusoid_mlp"},
                "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
                "eval": {"episodes": 5, "batch": 5, "steps_list": [0, 1]}}
    train(parse_config(raw), echo=lambda _: None)
    return out / name


def in_process_site_jobs(cfg: Any) -> dict[str, Any]:
    """The ``SiteJob`` of each site of ``cfg``'s federated topology, as the driver makes them
    (one device and two tasks per site), for tests that build ``EdgeNode`` objects in this
    process."""
    from experiments.site_jobs import site_jobs
    from metalearn.sites import plan_sites

    assert cfg.federated is not None
    topology = cfg.federated.resolved_topology()
    sites = topology.site_names
    plans = plan_sites(cfg.to_dict()["data"], sites, cfg.seed)
    return site_jobs(cfg, topology, plans, dict.fromkeys(sites, 1), 2)


@contextmanager
def embedded_cluster(sites: int) -> Iterator[Any]:
    """An embedded Ray cluster for a test module: a CPU per site actor plus one for cloud
    tasks; yields the uniform topology of ``sites`` sites and always shuts Ray down."""
    from cluster.connect import connect, shutdown
    from cluster.topology import uniform_topology

    topology = uniform_topology(sites)
    connect(None, topology, num_cpus=sites + 1, log_to_driver=False)
    try:
        yield topology
    finally:
        shutdown()


MB = 1024 * 1024
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def add_site_node(c: Any, site: str) -> Any:
    """One more raylet of ``c`` (a ``ray.cluster_utils.Cluster``) advertising ``site``."""
    from cluster.topology import SITE_RESOURCE_QUANTITY, site_resource

    return c.add_node(num_cpus=1, object_store_memory=100 * MB,
                      resources={site_resource(site): SITE_RESOURCE_QUANTITY})


@contextmanager
def multi_node_cluster(sites: list[str], *, fast_health_checks: bool = True) -> Iterator[Any]:
    """A real multi-node Ray cluster in this test process: a head with the ``cloud`` resource
    and one raylet per site (so a site's node can be killed), joined without auth; yields
    ``(cluster, {site: node})`` and always shuts everything down."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster import auth
    from cluster.topology import CLOUD_RESOURCE, SITE_RESOURCE_QUANTITY

    previous = auth.apply_to_process(auth.disabled_env())
    head: dict[str, Any] = {"num_cpus": 1, "resources": {CLOUD_RESOURCE: SITE_RESOURCE_QUANTITY},
                            "object_store_memory": 100 * MB, "include_dashboard": False}
    if fast_health_checks:
        head["_system_config"] = dict(FAST_HEALTH_CHECKS)
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = {s: add_site_node(c, s) for s in sites}
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        auth.restore_process(previous)


S3_BUCKET = "edgemeta-runs"


@contextmanager
def s3_server(bucket: str = S3_BUCKET) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's standalone server, HTTP on 127.0.0.1) with one
    bucket. Yields the AWS environment that points clients at it, also set in this process
    (pyarrow, boto3 and the AWS CLI all read it) until the block ends."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "edgemeta-test", "AWS_SECRET_ACCESS_KEY": "edgemeta-test",
               "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "AWS_EC2_METADATA_DISABLED": "true"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                              allow_bucket_creation=True).create_dir(bucket)
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.stop()
