"""Serving benchmark: Ray Serve (default proxy, HAProxy ingress) against a bare FastAPI server.

    .venv/bin/python -m benchmarks.bench_serve [--quick] [--channels 64] [--replicas N]
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

The load generator is a minimal keep-alive HTTP/1.1 client on raw sockets
(:mod:`benchmarks.http_load`), so that on a 2-core machine the client takes as little CPU from
the servers as possible; the model, the bare server and the request bodies are those of
:mod:`benchmarks.serving_rig`, shared with the other serving benchmarks.

``--replicas N`` (N > 1) runs Serve with N replicas and adds a bare server of N processes
(one listening port shared with ``SO_REUSEPORT``, as a multi-worker uvicorn or gunicorn would
serve), so that throughput is compared process for process as well as against the
single-process floor. Each replica, like each bare process, runs Python under one GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.http_load import SyncHTTP, latencies, pct
from benchmarks.serving_rig import (
    bare_servers,
    image,
    make_run,
    measure_load,
    predict_body,
    serve_floor_app,
)

# ---- measurements ------------------------------------------------------------------------------

def measure_predict(port: int, args: argparse.Namespace,
                    server_pids: set[int] | None = None, prefix: str = "") -> dict[str, Any]:
    path = f"{prefix}/v1/models/latest/predict"
    payloads = [predict_body([image(i * args.images + k) for k in range(args.images)],
                             args.packed) for i in range(8)]
    client = SyncHTTP("127.0.0.1", port)
    lat = latencies(client, path, payloads, args.requests)
    client.close()
    return {"p50": pct(lat, 50), "p99": pct(lat, 99),
            **measure_load(port, path, payloads[0], concurrency=args.concurrency,
                           seconds=args.seconds, warmup_s=args.warmup_s,
                           server_pids=server_pids)}


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
    args = p.parse_args(argv)
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
