"""Round overhead and orchestration at scale: edgemeta beside Flower, same machine, same shapes.

Flower runs in its own virtualenv (``.venv-flwr``, made by ``benchmarks/peers/flower_setup.sh``;
it pins its own ray) as a subprocess, ``-m benchmarks.peers.flower_rounds`` from the repository
root, which prints one JSON line per result. The edgemeta side runs here, in the project venv
(:func:`run_edgemeta`).

Two benchmarks, both with round 1 (cluster and actor start-up) excluded:

* ``overhead``: 4 clients/sites, 20 rounds, 0.5 s of (sleep) work each, the 113k-parameter MAML
  Omniglot conv net shipped each way; overhead = round wall - slowest client's own time.
* ``scale``: 1000 and 10,000 registered clients (Flower: virtual clients; edgemeta: devices of 4
  sites), 100 sampled a round, negligible work; orchestration time per round and peak memory
  of every process involved.

Usage (from the repo root)::

    .venv/bin/python -m benchmarks.bench_round_overhead --only flower
    .venv/bin/python -m benchmarks.bench_round_overhead            # both, with ratios
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
FLWR_VENV = ROOT / ".venv-flwr"
FLWR_PY = FLWR_VENV / "bin" / "python"


# --------------------------------------------------------------------------- Flower (peer)

def ensure_flower_venv() -> None:
    """Create ``.venv-flwr`` on first use (idempotent; ~1 min, no network beyond PyPI)."""
    if (FLWR_VENV / ".flwr-installed").is_file() and FLWR_PY.is_file():
        return
    subprocess.run(["bash", str(PEERS / "flower_setup.sh")], check=True, cwd=ROOT)


def parse_results(stdout: str) -> list[dict[str, Any]]:
    """The JSON result lines of a flower_rounds.py run (anything else on stdout is ignored)."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and '"bench"' in line:
            out.append(json.loads(line))
    return out


def run_flower(mode: str, *, clients: int, rounds: int, work_s: float | None = None,
               sampled: int | None = None, extra: Sequence[str] = (), timeout_s: float = 600,
               log_path: Path | None = None) -> dict[str, Any]:
    """One Flower simulation in its own venv and process; returns its JSON summary.

    Flower's and Ray's logs (stderr) go to ``log_path`` (or are dropped), so a failure says
    where to look.
    """
    ensure_flower_venv()
    cmd = [str(FLWR_PY), "-m", "benchmarks.peers.flower_rounds", "--mode", mode,
           "--clients", str(clients), "--rounds", str(rounds), *extra]
    if work_s is not None:
        cmd += ["--work-s", str(work_s)]
    if sampled is not None:
        cmd += ["--sampled", str(sampled)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("VIRTUAL_ENV", None)
    err = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                              text=True, timeout=timeout_s, start_new_session=True)
    finally:
        if log_path:
            err.close()
    results = parse_results(proc.stdout)
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"flower_rounds.py {mode} exited {proc.returncode} with "
                           f"{len(results)} result(s); see {log_path or 'its stderr'}")
    return results[-1]


# --------------------------------------------------------------------------- edgemeta (ours)

def run_edgemeta(mode: str, *, clients: int, rounds: int, work_s: float = 0.0,
                 sampled: int | None = None, sites: int = 4, dataset: str | None = None,
                 queries: int = 15, cluster: str = "embedded",
                 out_dir: Path | None = None) -> dict[str, Any]:
    """THE EDGEMETA SIDE: the same benchmark through ``experiments.federated.train_federated``.

    Must return at least ``{"median_overhead_s", "p90_overhead_s", "median_wall_s", "rounds",
    "rounds_used"}`` (seconds, round 1 excluded), and where it can ``payload_down_array_bytes``
    / ``payload_up_array_bytes`` (per client/site and round), ``peak_rss_mib`` /
    ``peak_pss_mib`` (the driver and every Ray process it started) and ``per_round``.

    Shapes: ``overhead``: ``clients`` sites, one device each, ``delay_s = work_s`` (the site's
    injected sleep, as Flower's clients sleep), all called every round. ``scale``: ``sites``
    sites holding ``clients`` devices in all, ``sampled`` devices a round (``sampled / sites``
    per site, one task each), no injected work: the sites' real local update is the work.

    ``dataset``: ``omniglot`` (default for ``overhead`` when the data is found) runs the same
    113k-parameter strided conv net as Flower's clients, so the payload matches; ``sinusoid``
    (default for ``scale``: thousands of devices need no character partition, and compute stays
    small) ships the 1.8k-parameter MLP, so its payload is far smaller (reported, not hidden).

    ``queries``: query examples per class of each site's one Omniglot task. Unlike Flower's
    clients, which only sleep, each site also runs a real second-order MAML step; on two cores
    four such steps contend for the CPU and delay each other's start, which the overhead
    metric counts. A small ``queries`` keeps the step (and so that contention) small.

    ``cluster``: ``embedded`` (Ray inside this process, every site's resource on one node) or
    ``local`` (``cluster.local.up``: a head and one raylet per site, each with its own object
    store, so parameters and updates cross between raylets; the driver joins it with the
    cluster's token; peak memory then counts the cluster's processes too).
    """
    import tempfile

    # An embedded Ray node takes the host's address unless Ray believes clusters are off, in
    # which case it uses loopback: keep the benchmark on 127.0.0.1. Read when ray is imported.
    if cluster == "embedded":  # (a multi-node `ray start` refuses to run with it set)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pandas as pd

    from benchmarks.peers.procmem import PeakMemSampler
    from experiments.config import ExperimentConfig
    from experiments.federated import train_federated

    if mode == "overhead":
        topology: dict[str, Any] = {
            "cloud": {"num_cpus": 1},
            "sites": [{"name": f"site-{i}", "devices": 1, "delay_s": float(work_s),
                       "actor_cpus": 1.0 / clients} for i in range(clients)],
        }
        fed: dict[str, Any] = {"topology": topology, "tasks_per_site": 1}
    else:
        sampled = sampled or 100
        per_site = max(1, sampled // sites)
        topology = {
            "cloud": {"num_cpus": 1},
            "sites": [{"name": f"site-{i}", "devices": max(per_site, clients // sites),
                       "delay_s": float(work_s), "actor_cpus": 1.0 / sites}
                      for i in range(sites)],
        }
        fed = {"topology": topology, "devices_per_round": per_site, "tasks_per_site": per_site}
    fed.update({"personalize_episodes": 0, "quorum": 1, "deadline_s": 120})
    if dataset is None:
        dataset = "omniglot" if mode == "overhead" and _omniglot_found() else "sinusoid"
    if dataset == "omniglot":  # the MAML paper's 5-way 1-shot net, as in flower_rounds.py
        task: dict[str, Any] = {
            "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": queries},
            "model": {"name": "omniglot_conv", "channels": 64, "pooling": "stride"},
            "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 1},
            "eval": {"episodes": 1, "batch": 1},
        }
    else:
        task = {
            "data": {"dataset": "sinusoid", "shots": 10, "queries": 10},
            "model": {"name": "sinusoid_mlp", "hidden": 40},
            "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1, "test_steps": 1},
            "eval": {"episodes": 1, "steps_list": [0, 1], "batch": 1},
        }
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="bench-edgemeta-"))
    cfg = ExperimentConfig.model_validate({
        "name": f"bench_{mode}_{clients}", "seed": 0, "output_dir": str(out_dir), **task,
        "train": {"meta_batch": 4, "steps": rounds, "log_every": rounds,
                  "checkpoint_every": rounds},
        "federated": fed,
    })
    with _cluster(cluster, topology, out_dir) as (address, extra_pids):
        sampler = PeakMemSampler(root_pid=os.getpid(), interval_s=0.25, extra=extra_pids)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with sampler:
            train_federated(cfg, resume=False, address=address, echo=_to_stderr)
        total_s = time.perf_counter() - t0
    rows = pd.read_parquet(cfg.run_dir / "metrics.parquet").to_dict("records")
    used = pd.DataFrame([r for r in rows if r["round"] > 1])
    called = max(1, int(used["called"].median())) if len(used) else 1
    return {
        "bench": "edgemeta", "system": "edgemeta", "mode": mode, "clients": clients,
        "cluster": cluster,
        "dataset": dataset, "total_s": total_s,
        "sampled": sampled if mode == "scale" else clients,
        "rounds": len(rows), "rounds_used": len(used),
        "median_wall_s": float(used["wall_s"].median()),
        "p90_wall_s": float(used["wall_s"].quantile(0.9)),
        "median_overhead_s": float(used["overhead_s"].median()),
        "p90_overhead_s": float(used["overhead_s"].quantile(0.9)),
        "median_compute_max_s": float(used["compute_s_max"].median()),
        "payload_down_array_bytes": int(used["bytes_down"].median()) // called,
        "payload_up_array_bytes": int(used["bytes_up"].median()) // called,
        "round1_wall_s": float(rows[0]["wall_s"]) if rows else None,
        **sampler.result(),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "per_round": [{k: r[k] for k in ("round", "wall_s", "overhead_s", "compute_s_max")}
                      for r in rows],
    }


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextlib.contextmanager
def _cluster(kind: str, topology: dict[str, Any],
             out_dir: Path) -> Iterator[tuple[str | None, Callable[[], set[int]] | None]]:
    """(address, extra pids to sample) for an embedded run (None, None), or a local multi-node
    cluster started here, joined with its token, and always taken down."""
    if kind == "embedded":
        yield None, None
        return
    from cluster import auth, local, procs
    from cluster.ports import first_free_port
    from cluster.topology import Topology

    nodes = {"num_cpus": 1, "memory_gb": 0.5, "object_store_gb": 0.2}
    topo = Topology.model_validate({
        "cloud": {**nodes, "memory_gb": 1.0},
        "sites": [{**site, **nodes} for site in topology["sites"]],
        "head_port": first_free_port(6390, 6420),
        "dashboard_port": first_free_port(8270, 8300)})
    state = out_dir / "cluster-state"
    info = local.up(topo, state)
    saved = auth.apply_to_process(auth.token_env(info.token_path))
    sessions = info.sessions()
    try:
        yield info.address, lambda: procs.session_pids(procs.process_table(), sessions)
    finally:
        auth.restore_process(saved)
        local.down(state, grace_s=5)


def _omniglot_found() -> bool:
    """Whether edgemeta can find omniglot.npz (explicit env, else the shared data folder)."""
    shared = ROOT.parent / "shared" / "data"
    if "EDGEMETA_DATA_DIR" not in os.environ and (shared / "omniglot").is_dir():
        os.environ["EDGEMETA_DATA_DIR"] = str(shared)  # as the Makefile sets it
    try:
        from metalearn.data.omniglot import find_omniglot

        find_omniglot()
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- report

ROWS: tuple[tuple[str, str, float], ...] = (  # (label, key, scale to display)
    ("rounds used (round 1 excluded)", "rounds_used", 1),
    ("median round wall (s)", "median_wall_s", 1),
    ("median overhead (s)", "median_overhead_s", 1),
    ("p90 overhead (s)", "p90_overhead_s", 1),
    ("median slowest client (s)", "median_compute_max_s", 1),
    ("payload down per client (KB)", "payload_down_array_bytes", 1e-3),
    ("payload up per client (KB)", "payload_up_array_bytes", 1e-3),
    ("round 1 wall (s) [1]", "round1_wall_s", 1),
    ("whole run, start-up included (s)", "total_s", 1),
    ("peak RSS, all processes (MiB)", "peak_rss_mib", 1),
    ("peak PSS, all processes (MiB)", "peak_pss_mib", 1),
)


def _fmt(v: Any, scale: float) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, int) and scale == 1:
        return str(v)
    x = float(v) * scale
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def markdown_table(title: str, flower: dict[str, Any] | None,
                   edgemeta: dict[str, Any] | None) -> str:
    """Metric rows, one column per system, and edgemeta / Flower."""
    lines = [f"### {title}", "", "| metric | Flower | edgemeta | edgemeta / Flower |",
             "|---|---|---|---|"]
    for label, key, scale in ROWS:
        f = flower.get(key) if flower else None
        e = edgemeta.get(key) if edgemeta else None
        ratio = (f"{float(e) / float(f):.2f}×"
                 if isinstance(f, (int, float)) and isinstance(e, (int, float)) and f
                 and key != "rounds_used" else "–")
        lines.append(f"| {label} | {_fmt(f, scale)} | {_fmt(e, scale)} | {ratio} |")
    lines += ["", "[1] Flower's round 1 holds Ray and actor-pool start-up; edgemeta starts its "
                  "actors and waits for them before round 1."]
    if edgemeta:
        lines.append(f"edgemeta: {edgemeta.get('dataset')} model, {edgemeta.get('cluster')} "
                     f"cluster, 1-min load "
                     f"{edgemeta.get('loadavg_1m')}.")
    if flower:
        lines.append(f"Flower: {flower.get('system')} (ray {flower['versions']['ray']}), "
                     f"{flower.get('actors')} client actors, payload {flower.get('payload')}, "
                     f"{'stock 0.1 s polls' if flower.get('stock_polls') else 'polls patched'}, "
                     f"1-min load {flower.get('loadavg_1m')}.")
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    """numpy numbers stay numbers across the process boundary; anything else becomes text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class EdgemetaRunFailed(RuntimeError):
    """An isolated edgemeta run exited without a result (its log went to stderr)."""


def run_edgemeta_isolated(mode: str, timeout_s: float = 1800, **kw: Any) -> dict[str, Any]:
    """:func:`run_edgemeta` in a fresh Python process, as each Flower run gets one.

    In this long-lived process every earlier run leaves memory behind (imports, plots, Ray's
    driver state); a fresh process per run makes the peak-memory rows compare like with like.
    """
    job = json.dumps({"mode": mode, **{k: str(v) if isinstance(v, Path) else v
                                       for k, v in kw.items()}})
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_round_overhead",
                               "--edgemeta-job", job], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, check=False,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EdgemetaRunFailed(f"edgemeta {mode} run passed {timeout_s:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise EdgemetaRunFailed(f"edgemeta {mode} run failed (exit {proc.returncode}); "
                                "its log is above")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("flower", "edgemeta"), default=None)
    p.add_argument("--modes", default="overhead,scale", help="comma list: overhead,scale")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--work-s", type=float, default=0.5)
    p.add_argument("--scale-clients", default="1000,10000", help="comma list of N registered")
    p.add_argument("--sampled", type=int, default=100)
    p.add_argument("--scale-rounds", type=int, default=5)
    p.add_argument("--flower-args", default="",
                   help="extra flower_rounds.py args, e.g. '--poll-s 0.005' or '--payload tiny'")
    p.add_argument("--timeout-s", type=float, default=600, help="per Flower run")
    p.add_argument("--cluster", choices=("embedded", "local"), default="embedded",
                   help="edgemeta side: embedded Ray, or a local multi-node cluster")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_round_overhead",
                   help="folder for results.json and the Flower logs")
    p.add_argument("--edgemeta-job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.edgemeta_job:  # one isolated edgemeta run (see run_edgemeta_isolated)
        job = json.loads(args.edgemeta_job)
        result = run_edgemeta(job.pop("mode"), **job)
        print(json.dumps(result, default=_json_value), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    extra = args.flower_args.split()
    want_flower, want_ours = args.only in (None, "flower"), args.only in (None, "edgemeta")

    jobs: list[tuple[str, str, dict[str, Any]]] = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "overhead" in modes:
        jobs.append((f"overhead: {args.clients} clients × {args.rounds} rounds, "
                     f"{args.work_s} s work", "overhead",
                     {"clients": args.clients, "rounds": args.rounds, "work_s": args.work_s}))
    if "scale" in modes:
        for n in (int(x) for x in args.scale_clients.split(",") if x.strip()):
            jobs.append((f"scale: {n} registered, {args.sampled} sampled a round", "scale",
                         {"clients": n, "rounds": args.scale_rounds, "sampled": args.sampled}))

    results: list[dict[str, Any]] = []
    tables: list[str] = []
    for title, mode, kw in jobs:
        flower = edgemeta = None
        tag = f"{mode}_{kw['clients']}"
        if want_flower:
            t0 = time.perf_counter()
            flower = run_flower(mode, **kw, extra=extra, timeout_s=args.timeout_s,
                                log_path=args.out / f"flower_{tag}.log")
            print(f"flower {tag}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            results.append(flower)
        if want_ours:
            try:
                edgemeta = run_edgemeta_isolated(mode, **kw, cluster=args.cluster,
                                                 out_dir=args.out / "edgemeta")
                results.append(edgemeta)
            except EdgemetaRunFailed as exc:  # keep what was measured; report the failure
                print(f"edgemeta {tag}: {exc}", file=sys.stderr)
                results.append({"bench": "edgemeta", "mode": mode, "error": str(exc)})
        tables.append(markdown_table(title, flower, edgemeta))
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
