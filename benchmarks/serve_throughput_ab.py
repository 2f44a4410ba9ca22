"""Throughput of one Serve replica under one replica setting, optionally under a profiler.

    .venv/bin/python -m benchmarks.serve_throughput_ab [--access-log] [--torch-inline]
        [--separate-loop] [--disconnect-disabled] [--throughput-optimized] [--profile OUT.txt]

Starts edgemeta's Serve app (HAProxy ingress) on the benchmark's run folder, warms it up for
2 s, then drives 32 concurrent keep-alive clients for 8 s and prints req/s. With ``--profile``
(needs ``pip install py-spy``), py-spy samples the replica at 200 Hz for 6 s of that load and
writes raw stacks to OUT.txt. One setting per process: the separate-loop choice is an
environment variable that Ray's processes read when Ray starts. This is how the rows of
"What moved throughput" in docs/BENCHMARKS.md were taken (with ``--profile``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.http_load import throughput
from benchmarks.serving_rig import cpu_by_role, image, make_run

PATH = "/v1/models/latest/predict"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--torch-inline", action="store_true", help="compute_in_thread: false")
    p.add_argument("--separate-loop", action="store_true",
                   help="RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1 (Serve's own default)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="@serve.batch's wait for more requests (0: batch what is queued)")
    p.add_argument("--disconnect-disabled", action="store_true",
                   help="clients send Serve's x-request-disconnect-disabled: ?1")
    p.add_argument("--throughput-optimized", action="store_true",
                   help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's bundle of fast-path settings)")
    p.add_argument("--profile", type=Path, default=None, help="py-spy raw output file")
    p.add_argument("--port", type=int, default=8151)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "1" if args.separate_loop else "0"
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if args.throughput_optimized else "0"
    from serve.launch import start

    run_dir = make_run(Path(tempfile.mkdtemp(prefix="serve-ab-")), 64)
    served = start({"run_dirs": [str(run_dir)], "num_cpus": 1, "max_ongoing_requests": 64,
                    "batch_max_size": 32, "access_log": args.access_log,
                    "compute_in_thread": not args.torch_inline,
                    "batch_wait_timeout_s": args.batch_wait_ms / 1e3},
                   port=args.port, ingress="haproxy", num_cpus=2,
                   ray_init={"log_to_driver": False})
    try:
        payload = {"inputs": [image(1)]}
        headers = {"x-request-disconnect-disabled": "?1"} if args.disconnect_disabled else None
        throughput("127.0.0.1", args.port, PATH, payload, 32, 2.0, headers)
        profiler = None
        if args.profile:
            pid = subprocess.run(["pgrep", "-f", "ServeReplica:edgemeta"], capture_output=True,
                                 text=True, check=True).stdout.split()[0]
            profiler = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-p", pid, "-d", "6",
                 "-r", "200", "-f", "raw", "-o", str(args.profile), "--threads",
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = cpu_by_role()
        rps, codes = throughput("127.0.0.1", args.port, PATH, payload, 32, 8.0, headers)
        cpu1 = cpu_by_role()
        if profiler is not None:
            profiler.wait()
        done = max(1, sum(codes.values()))
        print("CPU µs/request: " + ", ".join(
            f"{role} {1e6 * (cpu1[role] - cpu0.get(role, 0.0)) / done:.0f}" for role in cpu1),
            flush=True)
        print(f"req/s {rps:.0f} (access_log={args.access_log}, torch_inline={args.torch_inline},"
              f" separate_loop={args.separate_loop}, batch_wait_ms={args.batch_wait_ms},"
              f" disconnect_disabled={args.disconnect_disabled},"
              f" throughput_optimized={args.throughput_optimized}) "
              f"codes {codes}", flush=True)
    finally:
        served.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
