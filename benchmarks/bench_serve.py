"""Serving benchmark: Ray Serve (default proxy, HAProxy ingress) against a bare FastAPI server.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--channels 64] [--replicas N]
        [--images 1] [--packed] [--no-floor]

One command, one run, one markdown report on stdout:

1. predict latency (p50/p99, one client, ``--images`` 28×28 images per request) and
   throughput (32 concurrent clients) over loopback, for a bare FastAPI + uvicorn process
   holding the same model (the floor: same store, same validation, no Ray), then Serve with its
   default Python proxy, then Serve with the HAProxy ingress (Ray is restarted in between: the
   ingress is chosen when Ray starts). With HAProxy, the *Serve floor* follows: the bare
   server's own FastAPI app deployed as one Serve replica, which separates what Serve costs a
   request from what edgemeta's application (batching, multiplexing, gate, schema) adds or
   saves. The bare server is measured again at the end to show drift.
2. ``/v1/adapt`` latency, 5-way 1-shot, 1 / 5 / 10 inner steps (a fresh support set every
   request, so every request runs the inner loop).
3. multiplexing: predict latency with 4 / 32 / 256 distinct adapted models in rotation, with
   the replica's LRU holding ``--lru`` of them (beyond that, every request loads from disk).

The load generator is a minimal keep-alive HTTP/1.1 client on raw sockets, so that on a 2-core
machine the client takes as little CPU from the servers as possible.

``--replicas N`` (N > 1) runs Serve with N replicas and adds a bare server of N processes
(one listening port shared with ``SO_REUSEPORT``, as a multi-worker uvicorn or gunicorn would
serve), so that throughput is compared process for process as well as against the
single-process floor. Each replica, like each bare process, runs Python under one GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from serve.client import to_packed
from serve.schemas import PredictRequest  # module level: FastAPI resolves the annotation here

ROOT = Path(__file__).resolve().parents[1]


# ---- a tiny HTTP client ------------------------------------------------------------------------

def _request(path: str, body: bytes, host: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def _parse_head(head: bytes) -> tuple[int, int]:
    """Status and body length; length -1 means a chunked body."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        key = k.strip().lower()
        if key == b"content-length":
            length = int(v)
        elif key == b"transfer-encoding" and b"chunked" in v.lower():
            length = -1
    return status, length


class SyncHTTP:
    """One keep-alive connection; returns (status, body)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.reconnects = host, port, 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, payload: dict[str, Any] | bytes) -> tuple[int, bytes]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        raw = _request(path, body, f"{self.host}:{self.port}")
        try:
            return self._exchange(raw)
        except (ConnectionError, OSError):
            # An ingress reload may close idle keep-alive connections: reconnect once, as
            # HTTP clients do.
            self.reconnects += 1
            self.close()
            self._connect()
            return self._exchange(raw)

    def _exchange(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, length = _parse_head(head)
        if length >= 0:
            return status, self._take(length)
        out = b""
        while True:
            size = int(self._line(), 16)
            out += self._take(size)
            self._take(2)
            if size == 0:
                return status, out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self._recv()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


async def _worker(host: str, port: int, raw: bytes, stop_at: float, codes: dict[int, int]
                  ) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    done = 0
    try:
        while time.perf_counter() < stop_at:
            writer.write(raw)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()  # closed by an ingress reload: reconnect and go on
                codes[-1] = codes.get(-1, 0) + 1
                reader, writer = await asyncio.open_connection(host, port)
                continue
            status, length = _parse_head(head[:-4])
            if length >= 0:
                await reader.readexactly(length)
            else:
                while (size := int(await reader.readuntil(b"\r\n"), 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readexactly(2)
            codes[status] = codes.get(status, 0) + 1
            done += 1
    finally:
        writer.close()
    return done


def throughput(host: str, port: int, path: str, payload: dict[str, Any], concurrency: int,
               seconds: float, headers: dict[str, str] | None = None
               ) -> tuple[float, dict[int, int]]:
    raw = _request(path, json.dumps(payload).encode(), f"{host}:{port}", headers)
    codes: dict[int, int] = {}

    async def run() -> int:
        stop_at = time.perf_counter() + seconds
        counts = await asyncio.gather(*[_worker(host, port, raw, stop_at, codes)
                                        for _ in range(concurrency)])
        return sum(counts)

    t0 = time.perf_counter()
    n = asyncio.run(run())
    return n / (time.perf_counter() - t0), codes


def latencies(client: SyncHTTP, path: str, payloads: list[Any], n: int,
              warmup: int = 20) -> list[float]:
    for i in range(warmup):
        client.post(path, payloads[i % len(payloads)])
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        status, body = client.post(path, payloads[i % len(payloads)])
        out.append((time.perf_counter() - t0) * 1e3)
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status}: {body[:300]!r}")
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# ---- the model and the bare server -------------------------------------------------------------

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
    return cfg.run_dir


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


def serve_floor_app(run_dir: str) -> Any:
    """The same :func:`bare_app` deployed as a Serve replica (no edgemeta code path: no batching,
    multiplexing, gate or response schema): what Serve itself costs a request."""
    from ray import serve

    @serve.deployment(name="Floor", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    @serve.ingress(bare_app(run_dir))
    class Floor:
        pass

    return Floor.bind()


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


# ---- measurements ------------------------------------------------------------------------------

def image(seed: int) -> list[list[float]]:
    """A 28×28 image with 3-decimal pixels (finer than 8-bit grey levels; JSON stays small)."""
    g = torch.Generator().manual_seed(seed)
    return [[round(v, 3) for v in row] for row in torch.rand(28, 28, generator=g).tolist()]


def predict_body(images: list[list[list[float]]], packed: bool) -> dict[str, Any]:
    """A predict request's body: JSON numbers, or ``inputs_b64`` (float32, base64)."""
    return {"inputs_b64": to_packed(images)} if packed else {"inputs": images}


CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            cmdline = raw.replace(b"\0", b" ").decode("utf-8", "replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = process_role(int(entry.name), cmdline, server_pids or set())
        if role is not None:  # utime, stime: fields 14, 15 of stat (12, 13 after the name)
            totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    own = os.times()
    totals["client"] = own.user + own.system
    return totals


def measure_predict(port: int, args: argparse.Namespace,
                    server_pids: set[int] | None = None, prefix: str = "") -> dict[str, Any]:
    path = f"{prefix}/v1/models/latest/predict"
    payloads = [predict_body([image(i * args.images + k) for k in range(args.images)],
                             args.packed) for i in range(8)]
    client = SyncHTTP("127.0.0.1", port)
    lat = latencies(client, path, payloads, args.requests)
    client.close()
    return {"p50": pct(lat, 50), "p99": pct(lat, 99),
            **measure_load(port, path, payloads[0], args, server_pids)}


def measure_load(port: int, path: str, payload: dict[str, Any], args: argparse.Namespace,
                 server_pids: set[int] | None = None) -> dict[str, Any]:
    """req/s at ``args.concurrency`` for ``args.seconds``, answer codes, and CPU µs a request
    by role (see :func:`cpu_by_role`), after ``args.warmup_s`` of uncounted load.

    The warm-up (every server gets the same): the first second of 32 new connections
    (ingress connection set-up, first batch shapes) is not the steady state a row reports.
    """
    throughput("127.0.0.1", port, path, payload, args.concurrency, args.warmup_s)
    cpu0 = cpu_by_role(server_pids)
    rps, codes = throughput("127.0.0.1", port, path, payload, args.concurrency, args.seconds)
    cpu1 = cpu_by_role(server_pids)
    done = max(1, sum(codes.values()))
    cpu_us = {role: 1e6 * (cpu1[role] - cpu0.get(role, 0.0)) / done for role in cpu1}
    return {"rps": rps, "codes": codes, "cpu_us": cpu_us}


def measure_adapt(port: int, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    client = SyncHTTP("127.0.0.1", port)
    out: dict[int, dict[str, float]] = {}
    seed = 1000
    for steps in (1, 5, 10):
        lat, inner = [], []
        for i in range(args.adapt_requests + 3):
            seed += 1
            body = {"base_model": "latest", "support_inputs": [image(seed * 10 + k)
                                                                for k in range(5)],
                    "support_labels": [0, 1, 2, 3, 4], "steps": steps}
            t0 = time.perf_counter()
            status, raw = client.post("/v1/adapt", body)
            ms = (time.perf_counter() - t0) * 1e3
            if status != 200:
                raise RuntimeError(f"/v1/adapt: HTTP {status}: {raw[:300]!r}")
            if i >= 3:  # warm-up
                lat.append(ms)
                inner.append(json.loads(raw)["adapt_ms"])
        out[steps] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "inner": pct(inner, 50)}
    client.close()
    return out


def measure_multiplex(port: int, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    client = SyncHTTP("127.0.0.1", port)
    out: dict[int, dict[str, float]] = {}
    for k in (4, 32, 256):
        ids = []
        for i in range(k):
            body = {"base_model": "latest", "support_inputs": [image(50_000 + i * 5 + j)
                                                                for j in range(5)],
                    "support_labels": [0, 1, 2, 3, 4], "steps": 1}
            status, raw = client.post("/v1/adapt", body)
            if status != 200:
                raise RuntimeError(f"/v1/adapt: HTTP {status}: {raw[:300]!r}")
            ids.append(json.loads(raw)["model_id"])
        payload = {"inputs": [image(7)]}
        for i in ids:  # one pass so every model exists on disk and the LRU is warm
            client.post(f"/v1/models/{i}/predict", payload)
        n = max(args.requests, 2 * k)
        lat = []
        for r in range(n):
            t0 = time.perf_counter()
            status, raw = client.post(f"/v1/models/{ids[r % k]}/predict", payload)
            lat.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise RuntimeError(f"predict: HTTP {status}: {raw[:300]!r}")
        out[k] = {"p50": pct(lat, 50), "p99": pct(lat, 99)}
    client.close()
    return out


def serve_phase(run_dir: Path, ingress: str, port: int, args: argparse.Namespace,
                extras: bool) -> dict[str, Any]:
    from serve.launch import start

    t0 = time.perf_counter()
    served = start({"run_dirs": [str(run_dir)], "max_models_per_replica": args.lru,
                    "num_cpus": 1, "max_ongoing_requests": 64, "batch_max_size": 32,
                    "access_log": args.access_log, "num_replicas": args.replicas},
                   port=port, ingress=ingress,  # type: ignore[arg-type]
                   num_cpus=max(2, args.replicas + 1),
                   ray_init={"log_to_driver": False})  # the client must not print replica logs
    up = time.perf_counter() - t0
    try:
        result: dict[str, Any] = {"startup_s": up, **measure_predict(port, args)}
        if args.floor and ingress == "haproxy":
            from ray import serve

            # Deployed once edgemeta's load is over; its idle replica stays up beside.
            serve.run(serve_floor_app(str(run_dir)), name="floor", route_prefix="/floor")
            result["floor"] = measure_predict(port, args, prefix="/floor")
        if extras:
            result["adapt"] = measure_adapt(port, args)
            result["multiplex"] = measure_multiplex(port, args)
    finally:
        served.stop()
    return result


@contextmanager
def bare_servers(run_dir: Path, port: int, processes: int = 1) -> Iterator[set[int]]:
    """``processes`` bare servers (:func:`bare_server`) listening on ``port``; their pids."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "--bare-server", str(run_dir),
                               "--port", str(port)], env=env) for _ in range(processes)]
    try:
        wait_port(port)
        time.sleep(2.0 if processes > 1 else 0.0)  # every process listening before the load
        yield {p.pid for p in procs}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def bare_phase(run_dir: Path, port: int, args: argparse.Namespace,
               processes: int = 1) -> dict[str, Any]:
    with bare_servers(run_dir, port, processes) as pids:
        return {**measure_predict(port, args, server_pids=pids), "processes": processes}


def bare_label(b: dict[str, Any]) -> str:
    n = b.get("processes", 1)
    return f"bare FastAPI + uvicorn{f', {n} processes' if n > 1 else ''} ({b['when']})"


# ---- report ------------------------------------------------------------------------------------

FLOOR_LABEL = "Serve floor: the bare app as one Serve replica, HAProxy"


def report(bare: list[dict[str, Any]], serve: dict[str, dict[str, Any]],
           args: argparse.Namespace) -> str:
    ones = [b for b in bare if b.get("processes", 1) == 1]
    many = [b for b in bare if b.get("processes", 1) > 1]
    floor = {k: statistics.mean(b[k] for b in ones) for k in ("p50", "p99", "rps")}
    same = statistics.mean(b["rps"] for b in many) if many else None
    lines = [f"Predict, {args.images} 28×28 image(s) (3-decimal pixels"
             f"{'; sent as inputs_b64' if args.packed else ''}) per request, MAML "
             f"Omniglot net "
             f"({args.channels} channels),"
             f" loopback, {os.cpu_count()} cores; latency over {args.requests} sequential "
             f"requests, throughput with {args.concurrency} concurrent keep-alive clients for "
             f"{args.seconds:.0f} s after {args.warmup_s:.0f} s of uncounted warm-up at that "
             f"concurrency. Serve's access log: {'on' if args.access_log else 'off'}"
             f" (the bare server logs nothing). Serve replicas: {args.replicas}.", "",
             "| server | p50 ms | p99 ms | req/s @" + str(args.concurrency)
             + " | p50 vs bare (≤2×) | p99 vs bare (≤3×) | req/s vs bare (≥1×) |"
             + (f" req/s vs bare, {args.replicas} processes |" if same else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if same else "")]
    for b in bare:
        lines.append(f"| {bare_label(b)} | {b['p50']:.2f} | {b['p99']:.2f} | "
                     f"{b['rps']:.0f} | | | |" + (" |" if same else ""))
    names = {"proxy": "Ray Serve, default proxy", "haproxy": "Ray Serve, HAProxy ingress"}
    if args.replicas > 1:
        names = {k: f"{v}, {args.replicas} replicas" for k, v in names.items()}
    rows = [(names[k], r) for k, r in serve.items()]
    rows += [(FLOOR_LABEL, r["floor"]) for r in serve.values() if "floor" in r]
    for label, r in rows:
        lines.append(f"| {label} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | "
                     f"{r['p50'] / floor['p50']:.2f}× | {r['p99'] / floor['p99']:.2f}× | "
                     f"{r['rps'] / floor['rps']:.2f}× |"
                     + (f" {r['rps'] / same:.2f}× |" if same else ""))
    roles = ("server", "replica", "haproxy", "ray, other", "client")
    lines += ["", "CPU per request under the throughput load (µs, user + system, by process):",
              "", "| server | " + " | ".join(roles) + " | all |",
              "|---|" + "---|" * (len(roles) + 1)]
    rows = [(bare_label(b), b) for b in bare] + rows
    for label, r in rows:
        cpu = r.get("cpu_us", {})
        lines.append(f"| {label} | " + " | ".join(f"{cpu[k]:.0f}" if k in cpu else "–"
                                                  for k in roles)
                     + f" | {sum(cpu.values()):.0f} |")
    non200 = {k: {c: n for c, n in r["codes"].items() if c != 200} for k, r in serve.items()}
    lines += ["", f"Non-200 answers under load (-1: keep-alive connection closed by the "
              f"ingress, client reconnected): {non200}; Serve start-up: "
              + ", ".join(f"{k} {r['startup_s']:.1f} s" for k, r in serve.items())]
    extra = next((r for r in serve.values() if "adapt" in r), None)
    if extra:
        lines += ["", "`/v1/adapt`, 5-way 1-shot, a new support set each request "
                  f"({args.adapt_requests} requests per row; target p50 < 25 ms at 5 steps):", "",
                  "| steps | p50 ms | p99 ms | inner loop p50 ms |", "|---|---|---|---|"]
        for steps, a in extra["adapt"].items():
            lines.append(f"| {steps} | {a['p50']:.2f} | {a['p99']:.2f} | {a['inner']:.2f} |")
        lines += ["", f"Multiplexing: predict with adapted models in rotation, replica LRU of "
                  f"{args.lru} models (beyond it each request loads from the run folder):", "",
                  "| distinct models | p50 ms | p99 ms |", "|---|---|---|"]
        for k, m in extra["multiplex"].items():
            lines.append(f"| {k} | {m['p50']:.2f} | {m['p99']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests, shorter load")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--lru", type=int, default=16, help="max_models_per_replica")
    p.add_argument("--port", type=int, default=8151)
    p.add_argument("--access-log", action="store_true",
                   help="Serve's per-request access log on (the bare server logs nothing)")
    p.add_argument("--ingress", choices=["both", "proxy", "haproxy"], default="both")
    p.add_argument("--replicas", type=int, default=1,
                   help="Serve replicas; > 1 also measures a bare server of as many processes")
    p.add_argument("--images", type=int, default=1, help="28×28 images per predict request")
    p.add_argument("--packed", action="store_true",
                   help="predict inputs as inputs_b64 (float32, base64) instead of JSON numbers")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the Serve floor (the bare app deployed through Serve, HAProxy)")
    p.add_argument("--bare-server", metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_server:
        bare_server(args.bare_server, args.port)
        return 0
    args.requests = 150 if args.quick else 400
    args.seconds = 4.0 if args.quick else 10.0
    args.adapt_requests = 20 if args.quick else 50
    args.warmup_s = 1.0 if args.quick else 2.0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_dir = make_run(Path(tempfile.mkdtemp(prefix="bench-serve-")), args.channels)
    ingresses = ["proxy", "haproxy"] if args.ingress == "both" else [args.ingress]
    if args.replicas < 1:
        p.error("--replicas must be >= 1")
    counts = [1] if args.replicas == 1 else [1, args.replicas]
    bare = [{**bare_phase(run_dir, args.port + 1, args, n), "when": "before"} for n in counts]
    serve: dict[str, dict[str, Any]] = {}
    for ingress in ingresses:
        serve[ingress] = serve_phase(run_dir, ingress, args.port, args,
                                     extras=ingress == ingresses[-1])
        print(f"[{ingress} done]", file=sys.stderr, flush=True)
    bare += [{**bare_phase(run_dir, args.port + 1, args, n), "when": "after"} for n in counts]
    print(report(bare, serve, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
