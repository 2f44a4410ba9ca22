"""Time for `edgemeta serve` to answer, on a quiet machine and beside busy loops on the cores.

    .venv/bin/python -m benchmarks.serve_busy [--hogs 0 2] [--repeats 2] [--ingress haproxy]
        [--serve-defaults]

For each number of busy loops (``while True: pass``, one process each), ``--repeats`` times:
start the loops, run the real ``edgemeta serve RUN`` command, and time from its start until
``GET /healthz`` answers 200 (then a prediction), or until the command exits (a failed start).
Then SIGTERM, wait for a clean exit, stop the loops. ``--serve-defaults`` sets Serve's own
timeouts (5 s proxy ready check, ...) in the environment, which :mod:`serve.patience` lets win:
what the start-up retry alone is worth. The load average is printed beside each start: on a
shared machine, other work is a competitor too.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serving_rig import make_run
from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE_DEFAULTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "5",
                  "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "10",
                  "RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S": "30"}


def one_start(run_dir: Path, hogs: int, ingress: str, env: dict[str, str],
              limit_s: float) -> tuple[bool, float, str]:
    """(answered, seconds to the first answer or to the exit, the command's last line)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="serve-busy-", suffix=".log")[1])
    t0 = time.perf_counter()
    with log.open("w") as out:
        cmd = subprocess.Popen([sys.executable, "-m", "experiments.cli", "serve", str(run_dir),
                                "--port", str(port), "--ingress", ingress],
                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    answered = False
    try:
        with httpx.Client(timeout=5) as http:
            while time.perf_counter() - t0 < limit_s and cmd.poll() is None:
                try:
                    if http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        answered = True
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        took = time.perf_counter() - t0
        if answered:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/latest/predict",
                           json={"inputs": [[[0.5] * 28] * 28]}, timeout=60)
            answered = r.status_code == 200
    finally:
        for p in loops:
            p.kill()
            p.wait()
        time.sleep(2)  # the handler for SIGTERM is set once the command says it is serving
        cmd.send_signal(signal.SIGTERM)
        cmd.wait(timeout=300)
    lines = log.read_text().strip().splitlines()
    if lines[-1:] == ["edgemeta serve: shutting down"]:
        log.unlink()
        return answered, took, lines[-1]
    return answered, took, f"{(lines[-1] if lines else '')[:90]} (whole output: {log})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hogs", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy")
    p.add_argument("--serve-defaults", action="store_true",
                   help="Serve's own start-up timeouts instead of serve.patience's")
    p.add_argument("--limit-s", type=float, default=600.0)
    args = p.parse_args(argv)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.serve_defaults:
        env.update(SERVE_DEFAULTS)
    run_dir = make_run(Path(tempfile.mkdtemp(prefix="serve-busy-")), 8)
    print(f"ingress {args.ingress}, {'Serve defaults' if args.serve_defaults else 'patient'} "
          f"timeouts, {os.cpu_count()} cores")
    print("| busy loops | try | answered | seconds | load avg (1 min) before | last line |")
    print("|---|---|---|---|---|---|")
    for hogs in args.hogs:
        for i in range(args.repeats):
            load = os.getloadavg()[0]
            ok, took, last = one_start(run_dir, hogs, args.ingress, env, args.limit_s)
            print(f"| {hogs} | {i + 1} | {'yes' if ok else 'no'} | {took:.0f} | {load:.1f} | "
                  f"{last if '(whole output' in last else last[:90]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
