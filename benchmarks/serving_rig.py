"""What the serving benchmarks share: the model, the bare server (the floor), request bodies,
and load with CPU time by process.

``bench_serve``, ``bench_serve_interleaved`` and ``serve_throughput_ab`` all measure against the
same run folder, the same bare FastAPI server and the same request bodies, so their rows can be
compared; they import them from here. The bare server runs in processes of its own:

    python -m benchmarks.serving_rig RUN_DIR --port 8152     # what bare_servers() starts
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.http_load import throughput
from cluster import procs
from cluster.ports import wait_port
from serve.client import to_packed
from serve.schemas import PredictRequest  # module level: FastAPI resolves the annotation here

ROOT = Path(__file__).resolve().parents[1]


# ---- the model ---------------------------------------------------------------------------------

def make_run(out: Path, channels: int) -> Path:
    """A run folder with the MAML Omniglot net (5-way), as training would leave it."""
    from experiments.config import parse_config
    from experiments.runlog import RunLog
    from metalearn.checkpoint import save_checkpoint
    from metalearn.from_config import algorithm_from_config

    cfg = parse_config({"name": "bench", "output_dir": str(out),
                        "data": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 15},
                        "model": {"name": "omniglot_conv", "channels": channels},
                        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1,
                                      "test_steps": 5}})
    RunLog(cfg.run_dir).write_config(cfg.to_dict())
    torch.manual_seed(0)
    save_checkpoint(cfg.run_dir, 1, {"params": algorithm_from_config(cfg.to_dict()).init_params()})
    return cfg.run_dir.path


# ---- request bodies ----------------------------------------------------------------------------

def image(seed: int) -> list[list[float]]:
    """A 28×28 image with 3-decimal pixels (finer than 8-bit grey levels; JSON stays small)."""
    g = torch.Generator().manual_seed(seed)
    return [[round(v, 3) for v in row] for row in torch.rand(28, 28, generator=g).tolist()]


def predict_body(images: list[list[list[float]]], packed: bool) -> dict[str, Any]:
    """A predict request's body: JSON numbers, or ``inputs_b64`` (float32, base64)."""
    return {"inputs_b64": to_packed(images)} if packed else {"inputs": images}


# ---- the bare server (the floor) and the Serve floor -------------------------------------------

def bare_app(run_dir: str) -> Any:
    """The floor's FastAPI app: same store and validation as edgemeta's, compute inline.

    The store is built on the first request, in whichever process serves it, so the same app
    object runs in the bare uvicorn process and, pickled, inside a Serve replica."""
    from fastapi import FastAPI

    from serve.batching import predict_one
    from serve.signature import outputs_to_prediction
    from serve.store import ModelStore

    state: dict[str, Any] = {}
    app = FastAPI()

    @app.post("/v1/models/{model_id}/predict")
    async def predict(model_id: str, body: PredictRequest) -> dict[str, Any]:
        if "store" not in state:
            torch.set_num_threads(1)
            state["store"] = ModelStore([run_dir], cache_size=16)
        model = state["store"].get(model_id)
        out = predict_one(model, model.signature.read(body.inputs, body.inputs_b64, 256))
        return {"model_id": model_id, "resolved_model_id": model.id,
                **outputs_to_prediction(model.signature.task_type, out)}

    return app


def bare_server(run_dir: str, port: int) -> None:
    """The floor: :func:`bare_app` on uvicorn, no Ray.

    The listening socket has ``SO_REUSEPORT``, so several of these processes on one port
    share the connections (the kernel balances them), as a multi-worker server does."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(bare_app(run_dir), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def bare_servers(run_dir: Path, port: int, processes: int = 1) -> Iterator[set[int]]:
    """``processes`` bare servers (:func:`bare_server`) listening on ``port``; their pids."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    servers = [subprocess.Popen([sys.executable, "-m", "benchmarks.serving_rig", str(run_dir),
                                 "--port", str(port)], cwd=ROOT, env=env)
               for _ in range(processes)]
    try:
        wait_port(port)
        time.sleep(2.0 if processes > 1 else 0.0)  # every process listening before the load
        yield {p.pid for p in servers}
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            proc.wait(timeout=30)


def serve_floor_app(run_dir: str) -> Any:
    """The same :func:`bare_app` deployed as a Serve replica (no edgemeta code path: no batching,
    multiplexing, gate or response schema): what Serve itself costs a request."""
    from ray import serve

    @serve.deployment(name="Floor", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    @serve.ingress(bare_app(run_dir))
    class Floor:
        pass

    return Floor.bind()


# ---- load and CPU ------------------------------------------------------------------------------

def process_role(pid: int, cmdline: str, server_pids: set[int]) -> str | None:
    """Which part of the serving path a process is (None: not ours to count)."""
    if pid in server_pids:
        return "server"
    if "ServeReplica" in cmdline:
        return "replica"
    if "haproxy" in cmdline.split(" ", 1)[0]:
        return "haproxy"
    if any(mark in cmdline for mark in ("ray::", "/ray/", "raylet", "gcs_server")):
        return "ray, other"
    return None


def cpu_by_role(server_pids: set[int] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes, and by this client.

    Per-request CPU is steadier than req/s on a shared 2-core VM, and says which process a
    request's cost lands in.
    """
    totals: dict[str, float] = {}
    for proc in procs.process_table().values():
        role = process_role(proc.pid, proc.cmdline, server_pids or set())
        if role is not None:
            totals[role] = totals.get(role, 0.0) + proc.cpu_s
    own = os.times()
    totals["client"] = own.user + own.system
    return totals


def measure_load(port: int, path: str, payload: dict[str, Any], *, concurrency: int,
                 seconds: float, warmup_s: float,
                 server_pids: set[int] | None = None) -> dict[str, Any]:
    """req/s at ``concurrency`` for ``seconds``, answer codes, and CPU µs a request by role
    (see :func:`cpu_by_role`), after ``warmup_s`` of uncounted load.

    The warm-up (every server gets the same): the first second of 32 new connections
    (ingress connection set-up, first batch shapes) is not the steady state a row reports.
    """
    throughput("127.0.0.1", port, path, payload, concurrency, warmup_s)
    cpu0 = cpu_by_role(server_pids)
    rps, codes = throughput("127.0.0.1", port, path, payload, concurrency, seconds)
    cpu1 = cpu_by_role(server_pids)
    done = max(1, sum(codes.values()))
    cpu_us = {role: 1e6 * (cpu1[role] - cpu0.get(role, 0.0)) / done for role in cpu1}
    return {"rps": rps, "codes": codes, "cpu_us": cpu_us}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One bare server (the floor) on 127.0.0.1:PORT.")
    p.add_argument("run_dir")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    bare_server(args.run_dir, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
