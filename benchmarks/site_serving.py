"""A site's model served at the site: latency at the site's own way in against the head's, and
the time ``edgemeta site onboard`` takes from its start to the first answered request.

Latency: a local multi-node cluster (a head and one site raylet, started here and stopped
after), ``RUN@site-NAME`` served with ``site: site-0``, then sequential predict requests of one
28x28 image on one keep-alive connection each, alternating blocks between the replica's own
server on the site's node (Serve's direct ingress) and the head's port.

Onboarding: ``edgemeta site onboard RUN --site site-new --store DIR --shard test
--exit-after-first`` in a subprocess, twice (the store made, then already there); the command's
own figure (from its start to the first answer) and the subprocess's wall time (with Python's
start and imports).

    python -m benchmarks.site_serving RUN_DIR --requests 300 --ingress direct
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.http_load import SyncHTTP, latencies, pct
from benchmarks.serving_rig import image, predict_body


def site_latency(run_dir: str, requests: int, ingress: str, port: int) -> dict[str, list[float]]:
    from cluster import local
    from cluster.connect import connect, shutdown
    from cluster.ports import first_free_port
    from cluster.topology import uniform_topology
    from serve.launch import start

    topo = uniform_topology(1, memory_gb=1.0, object_store_gb=0.2)
    topo = topo.model_copy(update={"head_port": first_free_port(6470, 6500),
                                   "dashboard_port": first_free_port(8350, 8380)})
    state = Path(tempfile.mkdtemp(prefix="site-serving-")) / "state"
    info = local.up(topo, state)
    out: dict[str, list[float]] = {"site": [], "head": []}
    try:
        connect(info.address, info.topo, state_dir=info.state_dir)
        try:
            served = start({"run_dirs": [run_dir], "site": "site-0"}, ingress=ingress,
                           port=port)
            try:
                name = Path(run_dir).name
                ends = {"site": urlparse(served.site_urls[0]), "head": urlparse(served.url)}
                clients = {k: SyncHTTP(u.hostname or "127.0.0.1", u.port or 80)
                           for k, u in ends.items()}
                path = f"/v1/models/{name}@site-site-0/predict"
                payloads = [predict_body([image(i)], packed=False) for i in range(8)]
                block = 50
                for c in clients.values():  # warm both (model load, connection)
                    latencies(c, path, payloads, 1, warmup=20)
                for _ in range(max(1, requests // block)):
                    for k, c in clients.items():
                        out[k] += latencies(c, path, payloads, block, warmup=0)
                for c in clients.values():
                    c.close()
            finally:
                served.stop()
        finally:
            shutdown()
    finally:
        local.down(info.state_dir, grace_s=5)
    return out


def onboarding(run_dir: str, port: int) -> list[tuple[float, float]]:
    store = Path(tempfile.mkdtemp(prefix="site-new-")) / "store"
    times = []
    for _ in range(2):
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.cli", "site", "onboard", run_dir, "--site",
             "site-new", "--store", str(store), "--shard", "test", "--port", str(port),
             "--exit-after-first"], capture_output=True, text=True, check=True)
        wall = time.monotonic() - t0
        m = re.search(r"first answer ([0-9.]+) s", proc.stdout)
        if m is None:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        print(proc.stdout.strip().splitlines()[-1], flush=True)
        times.append((float(m.group(1)), wall))
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="an omniglot run folder (its site-site-0 model is served)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--ingress", default="direct", choices=["direct", "haproxy"])
    p.add_argument("--port", type=int, default=8661)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-onboarding", action="store_true")
    args = p.parse_args()
    if not args.skip_latency:
        lat = site_latency(args.run_dir, args.requests, args.ingress, args.port)
        for k, xs in lat.items():
            print(f"{k}: n={len(xs)} p50 {pct(xs, 50):.2f} ms  p90 {pct(xs, 90):.2f} ms  "
                  f"p99 {pct(xs, 99):.2f} ms", flush=True)
    if not args.skip_onboarding:
        for i, (first, wall) in enumerate(onboarding(args.run_dir, args.port + 1)):
            what = "store made" if i == 0 else "store there"
            print(f"onboarding ({what}): first answer {first:.1f} s after the command started; "
                  f"{wall:.1f} s wall for the whole command (Python start, imports, stop)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
