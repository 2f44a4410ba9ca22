"""`make demo`: the whole loop on one machine, end to end.

0. Find the Omniglot data where the loader looks, or fetch it (a fresh clone has none).
1. Start a local multi-node Ray cluster: a head node (the cloud) and one raylet per edge site,
   each advertising its ``edge:<site>`` resource (``cluster/topologies/demo3.yaml``).
2. Run federated MAML on it: one pinned edge actor per site trains on its own alphabets,
   the driver aggregates meta-gradients and steps Adam; meta-test on held-out characters.
3. Serve the trained meta-model with Ray Serve on the same cluster and query it over HTTP:
   a prediction, then a few-shot adaptation to meta-test characters the model never saw,
   then predictions with the adapted model id.
4. Stop Serve and the cluster.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster import ray_logs
from cluster.console import Printer
from experiments.config import load_config
from metalearn.storage import Location

if TYPE_CHECKING:
    from experiments.progress import Bar, RunConsole

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
# Where the demo fetches the original Omniglot zips from (a mirror, or a test's server).
OMNIGLOT_URL_ENV = "EDGEMETA_OMNIGLOT_URL"


def ensure_omniglot(echo: Printer = print, timeout_s: float = 30.0) -> Path:
    """The Omniglot file the demo will read: found where the loader looks
    (``EDGEMETA_DATA_DIR``, then the user cache), else downloaded, converted and checked
    against its content checksum into that place. Without network it raises
    :class:`~metalearn.data.fetch.FetchError` saying what to do instead."""
    from metalearn.data.fetch import DEFAULT_BASE_URL, FetchError, fetch_omniglot
    from metalearn.data.omniglot import ENV_VAR, find_omniglot, user_cache_dir

    try:
        return find_omniglot()
    except FileNotFoundError:
        pass
    dest = os.environ.get(ENV_VAR) or str(user_cache_dir())
    url = os.environ.get(OMNIGLOT_URL_ENV) or DEFAULT_BASE_URL
    echo(f"Omniglot not found: fetching it from {url} into {dest} (two zips, about 10 MB; "
         "converted and checked once)")
    try:
        fetch_omniglot(dest, base_url=url, timeout=timeout_s)
    except FetchError as err:
        raise FetchError(f"the demo needs Omniglot and could not fetch it: {err} Then run "
                         "`make demo` again (or `edgemeta data fetch omniglot` first).") from None
    found = find_omniglot()
    echo(f"Omniglot ready at {found}")
    return found


def _banner(echo: Printer, text: str) -> None:
    echo(f"\n=== {text} ===")


def run_demo(overrides: list[str] | None = None, echo: Printer = print,
             progress: RunConsole | None = None) -> dict[str, Any]:
    """Run the demo; return the training summary plus what the HTTP checks measured.
    ``progress`` draws the four stages (and training's bars and site table) as bars."""
    with (nullcontext(None) if progress is None
          else progress.bar("demo", 4, "stages", summary=False,
                                      plain_lines=False)) as stages:
        return _run_demo(overrides, echo, progress, stages)


def _run_demo(overrides: list[str] | None, echo: Printer, progress: RunConsole | None,
              stages: Bar | None) -> dict[str, Any]:
    from cluster import local
    from experiments.federated import train_federated

    cfg = load_config(CONFIG, overrides)
    if cfg.data.dataset == "omniglot":
        ensure_omniglot(echo)
    topology = cfg.federated.resolved_topology()  # type: ignore[union-attr]
    state_dir = Path(cfg.output_dir).resolve() / f"{cfg.name}-cluster"
    t0 = time.perf_counter()
    _banner(echo, f"1/4 local multi-node Ray cluster: cloud + {len(topology.sites)} sites")
    from serve.launch import ingress_env

    # HAProxy's admin socket path must stay under 97 characters: keep its folder short.
    haproxy_dir = Path(tempfile.mkdtemp(prefix="emh-"))
    info = local.up(topology, state_dir, env=ingress_env("haproxy", haproxy_dir))
    saved = {k: os.environ.get(k) for k in info.auth_env()}
    os.environ.update(info.auth_env())
    try:
        _next(stages)
        _banner(echo, "2/4 federated meta-training (edge actors pinned by custom resources)")
        summary = train_federated(cfg, resume=False, address=info.address, echo=echo,
                                  progress=progress)
        _next(stages)
        _banner(echo, "3/4 serving the meta-model over HTTP (Ray Serve)")
        summary["http"] = serve_and_query(cfg.run_dir, info.address, echo)
        _next(stages)
    finally:
        _banner(echo, "4/4 stopping the cluster")
        local.down(state_dir)
        shutil.rmtree(haproxy_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _next(stages)
    echo(f"\ndemo done in {time.perf_counter() - t0:.0f} s; run folder: {cfg.run_dir}; "
         f"report: {cfg.run_dir / 'report.html'}")
    return summary


def _next(stages: Bar | None) -> None:
    if stages is not None:
        stages.advance()


def serve_and_query(run_dir: Location, address: str, echo: Printer) -> dict[str, Any]:
    """Deploy the run on the cluster, predict, adapt to unseen characters, predict again."""
    import ray

    from cluster.ports import free_port
    from experiments.runlog import read_run_config
    from metalearn.from_config import sampler_from_config
    from serve.client import EdgeMetaClient
    from serve.launch import start

    try:
        served = start({"run_dirs": [str(run_dir.resolve())]}, port=free_port(),
                       address=address, ingress="haproxy",
                       log_dir=ray_logs.log_dir_for(run_dir), echo=echo)
    except BaseException:
        ray.shutdown()
        raise
    try:
        echo(f"serving {run_dir} at {served.url} (ingress {served.ingress}, docs at /docs)")
        with EdgeMetaClient(served.url) as client:
            versions = client.models()
            echo(f"GET /v1/models -> {len(versions.get('versions', versions))} entries")
            # A new site: 5 characters of the meta-test alphabets, one labelled drawing each.
            sampler = sampler_from_config(read_run_config(run_dir)["data"], "test", seed=2026)
            task = sampler.sample(1)[0]
            # Not timed: the first requests load the model into the replica's LRU and may
            # meet the ingress reloading its configuration for the new application.
            for image in task.query_x[:10]:
                client.predict("latest", image[None])
            latencies = []
            for image in task.query_x[:20]:
                t0 = time.perf_counter()
                client.predict("latest", image[None])
                latencies.append(1000 * (time.perf_counter() - t0))
            latencies.sort()
            echo(f"POST /v1/models/latest/predict x{len(latencies)} (after 10 untimed): "
                 f"p50 {latencies[len(latencies) // 2]:.1f} ms")
            adapted = client.adapt(task.support_x, task.support_y, query_inputs=task.query_x)
            labels = adapted["predictions"]["labels"]
            truth = task.query_y.tolist()
            accuracy = sum(int(a == b) for a, b in zip(labels, truth, strict=True)) / len(truth)
            # Content-addressed: the same meta-model and support set give the same id, and a
            # model already on disk (an earlier demo, or a retried request) is reused.
            how = (f"adapted in {adapted['adapt_ms']:.0f} ms" if adapted["created"]
                   else "already on disk, reused")
            echo(f"POST /v1/adapt on 5 unseen characters (1 shot each) -> {adapted['model_id']} "
                 f"({how}); accuracy on their {len(truth)} query drawings: "
                 f"{100 * accuracy:.0f}%")
            again = client.predict(adapted["model_id"], task.query_x)
            same = again["labels"] == labels
            echo(f"POST /v1/models/{adapted['model_id']}/predict -> same labels: {same}")
        return {"url": served.url, "predict_p50_ms": latencies[len(latencies) // 2],
                "adapted_model": adapted["model_id"], "adapted_accuracy": accuracy,
                "adapted_predict_consistent": same}
    finally:
        served.stop()
        ray.shutdown()
