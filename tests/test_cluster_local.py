"""The local multi-node launcher with real processes: a head and two site raylets.

One cluster for the module (start-up is the slow part). The tests run in file order: the
node-failure test changes site-1's node id, and the last test takes the cluster down.

Every node is started with the run-storage settings that cluster.yaml provisions: the AWS
environment of a real S3-compatible server on 127.0.0.1 (moto's) and ``EDGEMETA_RUN_STORAGE``
naming a bucket on it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import S3_BUCKET, s3_server

from cluster import auth, local, procs
from cluster.connect import SiteNodesError, check_site_nodes, connect, shutdown
from cluster.ports import first_free_port
from cluster.state import HEAD, STATE_FILE, ClusterError, ClusterInfo, read_state
from cluster.topology import Topology, TopologyError, uniform_topology
from experiments.cli import main as cli_main
from experiments.run_storage import STORAGE_ENV
from metalearn.checkpoint import list_checkpoints
from metalearn.storage import Location

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER_RUNS = f"s3://{S3_BUCKET}/cluster-runs"


def _topology() -> Topology:
    topo = uniform_topology(2, memory_gb=0.5, object_store_gb=0.1)
    return topo.model_copy(update={
        "head_port": first_free_port(6390, 6420),
        "dashboard_port": first_free_port(8270, 8300),
        "cloud": topo.cloud.model_copy(update={"memory_gb": 1.0, "object_store_gb": 0.2}),
    })


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: dict[str, str]):
    state = tmp_path_factory.mktemp("cluster") / "state"
    t0 = time.monotonic()
    info = local.up(_topology(), state,  # the launcher's own health checks, as users get
                    env={**s3, STORAGE_ENV: CLUSTER_RUNS})
    print(f"\ncluster up in {time.monotonic() - t0:.1f} s")
    yield info
    if (state / STATE_FILE).exists():
        local.down(state, grace_s=5)


def test_state_file_and_token(cluster: ClusterInfo) -> None:
    token = Path(cluster.token_path)
    assert token.parent == Path(cluster.state_dir)
    assert token.stat().st_mode & 0o777 == 0o600
    assert len(auth.read_token(token)) == 64
    saved = read_state(cluster.state_dir)
    assert saved.address == cluster.address and set(saved.nodes) == {"cloud", "site-0", "site-1"}
    assert all(n.session > 0 and n.node_id for n in saved.nodes.values())


def test_status_lists_nodes_with_their_resources(cluster: ClusterInfo) -> None:
    rows = {r["name"]: r for r in local.status(cluster.state_dir)}
    assert set(rows) == {"cloud", "site-0", "site-1"}
    assert all(r["alive"] and r["processes"] > 0 for r in rows.values())
    assert rows["cloud"]["resources"]["cloud"] == 1000
    for site in ("site-0", "site-1"):
        res = rows[site]["resources"]
        assert res[f"edge:{site}"] == 1000 and res["CPU"] == 1
        assert res["memory"] == 0.5 * 2**30
        assert not any(k.startswith("edge:") and k != f"edge:{site}" for k in res)


def test_cli_status(cluster: ClusterInfo, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["cluster", "status", "--state-dir", cluster.state_dir]) == 0
    out = capsys.readouterr().out
    assert "site-1" in out and "edge:site-1=1000" in out and "cloud=1000" in out


def test_dashboard_requires_the_token(cluster: ClusterInfo) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/v0/nodes", timeout=10)
    assert err.value.code in (401, 403)


def test_pinned_actor_runs_on_its_site(cluster: ClusterInfo) -> None:
    import ray

    info = connect(cluster.address, cluster.topo, state_dir=cluster.state_dir)
    try:
        assert info["kind"] == "cluster" and info["auth"] == "token"
        assert info["sites"] == {s: cluster.nodes[s].node_id for s in ("site-0", "site-1")}

        @ray.remote(num_cpus=0, resources={"edge:site-1": 1})
        class Probe:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        assert ray.get(Probe.remote().node.remote(), timeout=60) == info["sites"]["site-1"]
    finally:
        shutdown()
    assert os.environ.get(auth.TOKEN_PATH_ENV) != cluster.token_path  # environment restored


def test_site_pinned_replica_serves_from_the_sites_node(cluster: ClusterInfo) -> None:
    """``site: site-1`` places the Serve replica on site-1's raylet, not on the head where
    the request enters, and the response headers say where it was served. The run is in run
    storage (s3), not on a disk the nodes share: the replica reads its checkpoint from there,
    a model it adapts lands there for any node to load, and it serves one adapted elsewhere."""
    import httpx
    import torch

    from experiments.config import parse_config
    from experiments.train import train
    from serve.launch import start
    from serve.store import ModelStore

    uri = f"s3://{S3_BUCKET}/served/sine"
    train(parse_config({
        "name": "sine", "output_dir": f"s3://{S3_BUCKET}/served", "seed": 0,
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
        "model": {"name": "sinusoid_mlp"}, "algorithm": {"name": "maml", "inner_lr": 0.01},
        "train": {"steps": 2, "meta_batch": 2, "checkpoint_every": 1, "log_every": 1},
        "eval": {"episodes": 5, "batch": 5, "steps_list": [0, 1]}}), echo=lambda _: None)
    here = ModelStore([uri], cache_size=2)  # this process: the head's node, not site-1's
    elsewhere = here.adapt(here.get("latest"), torch.tensor([[0.0], [1.0]]),
                           torch.tensor([[0.0], [0.8]]), steps=1)  # targets [N, 1]
    connect(cluster.address, cluster.topo, state_dir=cluster.state_dir)
    try:
        handle = start({"run_dirs": [uri], "site": "site-1"}, ingress="proxy",
                       port=first_free_port(8470, 8500))
        try:
            with httpx.Client(base_url=handle.url, timeout=60) as http:
                health = http.get("/healthz")
                answer = http.post("/v1/models/sine@latest/predict",
                                   json={"inputs": [[0.5], [1.5]]})
                adapted = http.post("/v1/adapt", json={
                    "base_model": "sine@latest", "support_inputs": [[-1.0], [0.5], [2.0]],
                    "support_labels": [-0.8, 0.5, 0.9], "steps": 2})
                theirs = http.post(f"/v1/models/{elsewhere.ref.id}/predict",
                                   json={"inputs": [[0.5]]})
        finally:
            handle.stop()
    finally:
        shutdown()
    site_node, head_node = cluster.nodes["site-1"].node_id, cluster.nodes[HEAD].node_id
    assert health.status_code == 200 and health.headers["x-edgemeta-site"] == "site-1"
    assert health.headers["x-edgemeta-node"] == site_node != head_node
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-edgemeta-node"] == site_node
    assert len(answer.json()["values"]) == 2
    # made on site-1's node, found in s3 by this process, and the same parameters
    assert adapted.status_code == 200 and adapted.headers["x-edgemeta-node"] == site_node
    made = adapted.json()["model_id"]
    assert made.startswith("sine@ad-") and Location(f"{uri}/adapted/{made[5:]}.pt").is_file()
    assert here.get(made).id == made
    # made here, served by site-1's replica from s3
    assert theirs.status_code == 200, theirs.text
    model = here.get(elsewhere.ref.id)
    want = model.algorithm.predict(model.params, torch.tensor([[0.5]]))
    assert theirs.json()["values"][0] == pytest.approx(float(want.reshape(-1)[0]), abs=1e-5)


def test_job_submit_with_token(cluster: ClusterInfo, tmp_path: Path) -> None:
    """A job with a working dir: its driver sees every site, and actors on the sites (whose
    raylets unpack the working dir into their own temp dirs) run in it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    (tmp_path / "job.py").write_text(
        "import os, ray\n"
        "ray.init()\n"
        "print('RESOURCES', ray.cluster_resources())\n"
        "@ray.remote(num_cpus=0)\n"
        "def where():\n"
        "    return os.path.exists('job.py')\n"
        "for s in ('site-0', 'site-1'):\n"
        "    ok = ray.get(where.options(resources={f'edge:{s}': 1}).remote())\n"
        "    print('WORKING_DIR_ON', s, ok)\n")
    client = JobSubmissionClient(cluster.dashboard_url,
                                 headers=auth.bearer_headers(auth.read_token(cluster.token_path)))
    t0 = time.monotonic()
    job = client.submit_job(entrypoint="python job.py",
                            runtime_env={"working_dir": str(tmp_path)})
    while (status := client.get_job_status(job)) not in {
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() - t0 < 120, "job did not finish"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    print(f"job {status} in {time.monotonic() - t0:.1f} s")
    assert status == JobStatus.SUCCEEDED, logs
    assert "'edge:site-0': 1000.0" in logs and "'edge:site-1': 1000.0" in logs
    assert "WORKING_DIR_ON site-0 True" in logs and "WORKING_DIR_ON site-1 True" in logs

    with pytest.raises(Exception, match=r"(?i)auth|401|403"):
        JobSubmissionClient(cluster.dashboard_url).list_jobs()  # no token: refused


def _federated_config(name: str) -> dict:
    return {"name": name, "seed": 0,  # output_dir: the default, relative `runs`
            "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
            "model": {"name": "sinusoid_mlp", "hidden": 20},
            "algorithm": {"name": "maml", "inner_lr": 0.01},
            "train": {"meta_batch": 4, "steps": 3, "checkpoint_every": 1, "log_every": 1},
            "eval": {"episodes": 8, "steps_list": [0, 1], "batch": 8},
            "federated": {"topology": {"sites": 2, "devices": 2}, "personalize_episodes": 4}}


def test_submitted_job_keeps_its_run_in_run_storage(cluster: ClusterInfo, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`edgemeta submit` of a config kept outside the repository: the real federated entry
    point runs as a Ray job, trains three rounds on the sites and writes its run to the
    cluster's run storage (s3); status and logs come back through the Job API. The same job
    without run storage is refused, since its run would land in Ray's working dir."""
    from experiments.submit import job_client, submit_job, wait_for_job

    monkeypatch.setenv(auth.TOKEN_PATH_ENV, cluster.token_path)
    config = tmp_path / "private" / "fed.yaml"  # outside the working dir: never uploaded
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(_federated_config("job-run")))
    said: list[str] = []
    t0 = time.monotonic()
    refused = submit_job(str(config), address=cluster.dashboard_url, working_dir=str(REPO),
                         env_vars={STORAGE_ENV: ""}, echo=said.append)
    job = submit_job(str(config), address=cluster.dashboard_url, working_dir=str(REPO),
                     echo=said.append)
    assert f"-> the cluster's {STORAGE_ENV}/job-run" in said[1]
    client = job_client(cluster.dashboard_url)
    status = wait_for_job(client, job, echo=lambda _: None, timeout_s=150)
    logs = client.get_job_logs(job)
    print(f"job {status} in {time.monotonic() - t0:.1f} s")
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"run storage: {CLUSTER_RUNS}/job-run" in logs
    assert "round 3/3 arrived 2/2" in logs

    run = Location(f"{CLUSTER_RUNS}/job-run")
    assert list_checkpoints(run) == [1, 2, 3]
    rows = pd.read_parquet(io.BytesIO((run / "metrics.parquet").read_bytes()))
    assert rows["round"].tolist() == [1, 2, 3] and (rows["arrived"] == 2).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_steps"] == 3 and summary["federated"]["sites"] == ["site-0", "site-1"]
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "job-run"
    assert (run / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert {p["site"] for p in summary["federated"]["personalization"]} == {"site-0", "site-1"}
    assert (run / "adapted" / "site-site-0.pt").is_file()
    assert (run / "adapted" / "site-site-1.pt").is_file()
    unpacked = list(Path(cluster.temp_root).glob("**/working_dir_files/*"))
    assert unpacked and not [p for p in unpacked if (p / "runs").exists()]  # nothing left there

    assert wait_for_job(client, refused, echo=lambda _: None, timeout_s=60) == "FAILED"
    refusal = client.get_job_logs(refused)
    assert "inside the Ray job's unpacked working dir" in refusal, refusal[-2000:]
    assert "Traceback" not in refusal


def test_a_site_model_made_by_training_is_served_from_the_sites_node(
        cluster: ClusterInfo) -> None:
    """The job above made each site's personalized model at the site and wrote it to s3
    (``adapted/site-NAME.pt``). Served with ``site: site-1``, the replica runs on site-1's
    node, and the site reaches it through the replica's own server on that node (Serve's
    direct ingress), not only through the head; both answer with the site model."""
    import httpx
    import torch

    from serve.launch import start
    from serve.store import ModelStore

    uri = f"{CLUSTER_RUNS}/job-run"
    here = ModelStore([uri], cache_size=2)
    site_model, meta = here.get("job-run@site-site-1"), here.get("job-run@latest")
    assert site_model.ref.kind == "site"
    x = torch.linspace(-4, 4, 5).reshape(-1, 1)
    want = site_model.algorithm.predict(site_model.params, x).reshape(-1)
    assert not torch.allclose(want, meta.algorithm.predict(meta.params, x).reshape(-1))
    connect(cluster.address, cluster.topo, state_dir=cluster.state_dir)
    try:
        # direct: Serve's proxy on the head, the replica's own server on the site's node
        # (HAProxy's ingress is the serve API test's; here the head reaches the site's replica
        # through Ray whatever the bind address, see serve.launch)
        handle = start({"run_dirs": [uri], "site": "site-1"}, ingress="direct",
                       port=first_free_port(8610, 8640))
        try:
            assert len(handle.site_urls) == 1 and handle.site_urls[0] != handle.url
            with httpx.Client(timeout=60) as http:
                answers = {where: http.post(f"{url}/v1/models/job-run@site-site-1/predict",
                                            json={"inputs": x.tolist()})
                           for where, url in (("site", handle.site_urls[0]),
                                              ("head", handle.url))}
        finally:
            handle.stop()
    finally:
        shutdown()
    site_node = cluster.nodes["site-1"].node_id
    for where, answer in answers.items():
        assert answer.status_code == 200, (where, answer.text)
        assert answer.headers["x-edgemeta-node"] == site_node, where
        assert answer.json()["resolved_model_id"] == "job-run@site-site-1"
        assert answer.json()["values"] == pytest.approx(want.tolist(), abs=1e-5), where


def test_a_killed_raylet_is_seen_dead_then_restart_site_brings_it_back(
        cluster: ClusterInfo, tmp_path: Path) -> None:
    """The chaos case: only site-1's raylet is SIGKILLed (its log monitor and agents live on).
    ``status`` shows the node dead within seconds (the launcher's health checks), ``cluster
    restart-site`` clears the leftovers and starts it, and a federated round runs on it."""
    import pandas as pd

    from cluster import nodes
    from experiments.config import parse_config
    from experiments.federated import train_federated

    state = cluster.state_dir
    old = read_state(state).nodes["site-1"]
    table = procs.process_table()
    raylets = [p for p in nodes.node_pids(table, old) if table[p].comm == "raylet"]
    assert len(raylets) == 1
    procs.send(raylets, signal.SIGKILL)
    t0 = time.monotonic()
    while {r["name"]: r["alive"] for r in local.status(state)}["site-1"]:
        assert time.monotonic() - t0 < 10, "the GCS still reports site-1 alive after 10 s"
        time.sleep(0.2)
    print(f"\nstatus shows site-1 dead {time.monotonic() - t0:.1f} s after its raylet's SIGKILL")
    left = nodes.node_pids(procs.process_table(), old)
    print(f"processes left of site-1: {len(left)}")

    topo = cluster.topo
    connect(cluster.address, topo, state_dir=state, check_sites=False)
    try:
        with pytest.raises(SiteNodesError, match="site-1") as err:
            check_site_nodes(topo)
        assert "site-0" not in str(err.value).split("alive nodes")[0]
    finally:
        shutdown()

    assert cli_main(["cluster", "restart-site", "site-0x", "--state-dir", state]) == 2
    with pytest.raises(ClusterError, match="is running; `edgemeta cluster restart-site"):
        local.start_site(state, "site-0")
    assert cli_main(["cluster", "restart-site", "site-1", "--state-dir", state]) == 0
    new = read_state(state).nodes["site-1"]
    assert new.node_id and new.node_id != old.node_id
    assert not set(left) & set(nodes.node_pids(procs.process_table(), new))  # leftovers gone
    assert {r["name"]: r["alive"] for r in local.status(state)}["site-1"] is True

    cfg = parse_config({
        "name": "after-restart", "seed": 1, "output_dir": str(tmp_path),
        "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
        "model": {"name": "sinusoid_mlp", "hidden": 10},
        "algorithm": {"name": "maml", "inner_lr": 0.01},
        "train": {"meta_batch": 2, "steps": 2, "log_every": 1},
        "eval": {"episodes": 2, "steps_list": [0], "batch": 2},
        "federated": {"topology": topo.model_dump(mode="json"), "personalize_episodes": 0,
                      "stop_after_rounds": 1, "quorum": 2}})
    connect(cluster.address, topo, state_dir=state)
    try:
        train_federated(cfg, echo=lambda _: None)
    finally:
        shutdown()
    sites = pd.read_parquet(cfg.run_dir / "sites.parquet")
    assert sites.set_index("site")["status"].to_dict() == {"site-0": "ok", "site-1": "ok"}

    assert cli_main(["cluster", "stop-site", "site-1", "--state-dir", state, "--grace", "5"]) == 0
    assert not nodes.node_pids(procs.process_table(), read_state(state).nodes["site-1"])
    local.wait_site(state, "site-1", alive=False, timeout_s=10)


def test_second_up_is_refused(cluster: ClusterInfo, tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="already up"):
        local.up(cluster.topo, cluster.state_dir)
    with pytest.raises(ClusterError, match=f"port {cluster.topo.head_port}"):
        local.up(cluster.topo, tmp_path / "other")
    assert not (tmp_path / "other" / STATE_FILE).exists()


def test_cli_reports_bad_topology(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [{name: a, bogus: 1}]\n")
    assert cli_main(["cluster", "up", str(bad), "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "sites.0.bogus: unknown key" in err and "Traceback" not in err
    assert cli_main(["cluster", "status", "--state-dir", str(tmp_path / "none")]) == 2
    assert "no local cluster recorded" in capsys.readouterr().err
    with pytest.raises(TopologyError, match="whole number"):
        local.up(uniform_topology(1, num_cpus=1.5, actor_cpus=1), tmp_path / "s2")


def test_embedded_connect_uses_an_in_memory_token() -> None:
    import ray

    before = {k: os.environ.get(k) for k in auth.AUTH_ENV_VARS}
    os.environ.pop(auth.AUTH_MODE_ENV, None)
    try:
        info = connect(None, uniform_topology(2), num_cpus=1)
        try:
            assert info["kind"] == "embedded" and info["auth"] == "token"
            assert os.environ.get(auth.TOKEN_ENV) and not os.environ.get(auth.TOKEN_PATH_ENV)
            node = ray.get_runtime_context().get_node_id()
            assert info["sites"] == {"site-0": node, "site-1": node}
        finally:
            shutdown()
        assert {k: os.environ.get(k) for k in auth.AUTH_ENV_VARS} == {
            **before, auth.AUTH_MODE_ENV: None}
    finally:
        for k, v in before.items():
            if v is not None:
                os.environ[k] = v


def test_down_stops_every_process(cluster: ClusterInfo) -> None:
    # sessions of the original nodes and of site-1 as restarted above
    sessions = {n.session for n in cluster.nodes.values()} | {
        n.session for n in read_state(cluster.state_dir).nodes.values()}
    t0 = time.monotonic()
    assert local.down(cluster.state_dir) > 0
    print(f"down in {time.monotonic() - t0:.1f} s")
    deadline = time.monotonic() + 10
    while True:
        table = procs.process_table()
        left = [p for p in table.values() if p.live and p.pid != os.getpid()
                and (p.sid in sessions or cluster.temp_root in p.cmdline)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, [(p.pid, p.comm) for p in left]
    assert not Path(cluster.temp_root).exists()
    assert not (Path(cluster.state_dir) / STATE_FILE).exists()
    with pytest.raises(ClusterError, match="no local cluster"):
        local.status(cluster.state_dir)
