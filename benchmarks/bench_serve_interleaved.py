"""Predict throughput, interleaved: bare server, edgemeta on Serve, and the Serve floor.

    .venv/bin/python -m benchmarks.bench_serve_interleaved [--rounds 4] [--images 1]
        [--channels 64] [--seconds 6] [--packed]

On a shared VM the speed of the machine drifts within minutes (``bench_serve`` saw its bare
server's throughput halve between the start and the end of one run), so one measurement a
server says little. Here every round measures all three servers, one after the other, each
for a few seconds (the order rotates from round to round); each ratio is taken against the
bare server *of the same round*, and the report gives the median over rounds. The bare server
runs with no Ray process alive (Ray's idle processes took 0.13 of a core here, which is part
of Serve's cost, not the floor's), so every round starts Ray and Serve afresh:

- **bare**: FastAPI + uvicorn, one process, the same store and validation, no Ray (the floor
  the serving issue names);
- **edgemeta**: edgemeta's Serve application (HAProxy ingress, ``@serve.batch`` with the
  grouped forward pass, multiplexing, gate, response schema), one replica;
- **Serve floor**: the bare server's own FastAPI app deployed as one Serve replica behind
  the same HAProxy: what Serve itself costs a request, with none of edgemeta's code path.

Besides req/s, each row gives the CPU time a request costs in the server's process (the
replica, or the bare process), read from ``/proc`` around the load: it drifts less than req/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.serving_rig import (
    bare_servers,
    image,
    make_run,
    measure_load,
    predict_body,
    serve_floor_app,
)

SERVERS = ("bare", "edgemeta", "floor")


def replica_pid(mark: str) -> int:
    """The pid of the one Serve replica whose command line holds ``mark``."""
    found = subprocess.run(["pgrep", "-f", mark], capture_output=True, text=True).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one process matching {mark!r}, found {found}")
    return int(found[0])


def measure(port: int, prefix: str, args: argparse.Namespace, pid: int) -> dict[str, float]:
    """Throughput at ``--concurrency`` and the server process's CPU a request."""
    path = f"{prefix}/v1/models/latest/predict"
    payload = predict_body([image(k) for k in range(args.images)], args.packed)
    load = measure_load(port, path, payload, concurrency=args.concurrency, seconds=args.seconds,
                        warmup_s=args.warmup_s, server_pids={pid})
    bad = {c: n for c, n in load["codes"].items() if c != 200}
    if bad:
        raise RuntimeError(f"{prefix or '/'}: non-200 answers under load: {bad}")
    return {"rps": load["rps"], "cpu_us": load["cpu_us"]["server"],
            "all_us": sum(load["cpu_us"].values())}


def bare_round(run_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """The bare server alone on the machine (no Ray process alive), measured once."""
    with bare_servers(run_dir, args.port + 1) as pids:
        return measure(args.port + 1, "", args, pids.pop())


def serve_round(run_dir: Path, args: argparse.Namespace, floor_first: bool
                ) -> dict[str, dict[str, float]]:
    """Ray and Serve started afresh with both applications; each measured once; all stopped."""
    from ray import serve

    from serve.launch import start

    served = start({"run_dirs": [str(run_dir)], "num_cpus": 1, "max_ongoing_requests": 64,
                    "batch_max_size": 32},
                   port=args.port, ingress="haproxy", num_cpus=3,
                   ray_init={"log_to_driver": False})
    try:
        serve.run(serve_floor_app(str(run_dir)), name="floor",
                  route_prefix="/floor")
        where = {"edgemeta": ("", replica_pid("ServeReplica:edgemeta:")),
                 "floor": ("/floor", replica_pid("ServeReplica:floor:"))}
        order = ["floor", "edgemeta"] if floor_first else ["edgemeta", "floor"]
        return {name: measure(args.port, where[name][0], args, where[name][1])
                for name in order}
    finally:
        served.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images", type=int, default=1, help="28×28 images per request")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=6.0, help="load per measurement")
    p.add_argument("--warmup-s", type=float, default=1.5, help="uncounted load before each")
    p.add_argument("--packed", action="store_true",
                   help="send inputs as inputs_b64 (float32, base64) instead of JSON numbers")
    p.add_argument("--port", type=int, default=8161)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.images < 1:
        p.error("--rounds and --images must be >= 1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_dir = make_run(Path(tempfile.mkdtemp(prefix="bench-serve-il-")), args.channels)
    rows: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        # The order rotates: bare before Serve in even rounds, after it in odd ones; the
        # two Serve applications swap places every other round.
        if r % 2 == 0:
            row = {"bare": bare_round(run_dir, args), **serve_round(run_dir, args, r % 4 == 2)}
        else:
            row = {**serve_round(run_dir, args, r % 4 == 3), "bare": bare_round(run_dir, args)}
        rows.append(row)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {row[n]['rps']:.0f} req/s" for n in SERVERS), file=sys.stderr, flush=True)
    print(report(rows, args))
    return 0


def report(rows: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    ratio = {n: [row[n]["rps"] / row["bare"]["rps"] for row in rows] for n in SERVERS}
    cpu_ratio = {n: [row[n]["cpu_us"] / row["bare"]["cpu_us"] for row in rows] for n in SERVERS}
    lines = [f"Predict, {args.images} 28×28 image(s) a request "
             f"({'inputs_b64' if args.packed else 'JSON numbers'}), MAML Omniglot net "
             f"({args.channels} channels), {args.concurrency} concurrent keep-alive clients, "
             f"{args.seconds:.0f} s a measurement, {args.rounds} interleaved rounds, "
             f"{os.cpu_count()} cores.", "",
             "| round | " + " | ".join(f"{n} req/s" for n in SERVERS)
             + " | edgemeta / bare | floor / bare | edgemeta / floor |",
             "|---|" + "---|" * (len(SERVERS) + 3)]
    for i, row in enumerate(rows):
        lines.append(f"| {i + 1} | " + " | ".join(f"{row[n]['rps']:.0f}" for n in SERVERS)
                     + f" | {ratio['edgemeta'][i]:.2f}× | {ratio['floor'][i]:.2f}× | "
                     f"{row['edgemeta']['rps'] / row['floor']['rps']:.2f}× |")
    med = statistics.median
    lines += ["", "| server | median req/s | median req/s vs bare (same round) | "
              "server-process CPU µs a request (median) | CPU vs bare | all processes µs |",
              "|---|---|---|---|---|---|"]
    for n in SERVERS:
        lines.append(f"| {n} | {med(r[n]['rps'] for r in rows):.0f} | {med(ratio[n]):.2f}× | "
                     f"{med(r[n]['cpu_us'] for r in rows):.0f} | {med(cpu_ratio[n]):.2f}× | "
                     f"{med(r[n]['all_us'] for r in rows):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
