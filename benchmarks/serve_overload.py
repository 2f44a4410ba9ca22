"""Overload: one Serve replica offered about twice what it can answer, in an open loop.

    .venv/bin/python -m benchmarks.serve_overload [--factor 2] [--seconds 15] [--rounds 2]
        [--max-ongoing 64] [--max-queued 256]

Starts edgemeta's Serve app (HAProxy ingress, one replica, one CPU) on the serving rig's run
folder, measures its capacity (req/s with 32 keep-alive clients, closed loop), then offers
``factor`` × that rate for ``seconds`` in an open loop (arrivals never wait for answers:
:func:`benchmarks.http_load.open_loop`), ``rounds`` times. For each round: the answers by status,
the share shed (503/429) and whether each carried ``Retry-After``, the p50/p99 latency of the
accepted requests, connection errors, and the resident memory of the serving processes
(replica, HAProxy, Serve's actors) before and after; then a plain request must still be
answered. Admission is the deployment's own: ``max_ongoing_requests`` per replica,
``max_queued_requests`` beyond which Serve answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.http_load import SyncHTTP, open_loop, pct, throughput
from benchmarks.serving_rig import image, make_run
from cluster import procs

PATH = "/v1/models/latest/predict"


def serving_rss_mb() -> dict[str, float]:
    """Resident MB of this process's serving descendants, by role."""
    table = procs.process_table()
    out: dict[str, float] = {}
    for pid in procs.descendants(table, [os.getpid()]):
        cmd = table[pid].cmdline
        role = ("replica" if "ServeReplica" in cmd else
                "haproxy" if "haproxy" in cmd.split(" ", 1)[0] else
                "serve actors" if any(m in cmd for m in ("ServeController", "ProxyActor",
                                                        "HAProxyManager")) else None)
        if role is not None:
            out[role] = out.get(role, 0.0) + procs.rss_bytes(pid) / 2**20  # 0 if gone
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-ongoing", type=int, default=64)
    p.add_argument("--max-queued", type=int, default=256)
    p.add_argument("--port", type=int, default=8153)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from serve.launch import start

    run_dir = make_run(Path(tempfile.mkdtemp(prefix="serve-overload-")), 64)
    served = start({"run_dirs": [str(run_dir)], "num_cpus": 1,
                    "max_ongoing_requests": args.max_ongoing,
                    "max_queued_requests": args.max_queued, "retry_after_s": 1.0},
                   port=args.port, ingress="haproxy", num_cpus=2)
    try:
        payload = {"inputs": [image(1)]}
        throughput("127.0.0.1", args.port, PATH, payload, 32, 3.0)  # warm-up
        capacity, codes = throughput("127.0.0.1", args.port, PATH, payload, 32, 8.0)
        rate = args.factor * capacity
        print(f"capacity {capacity:.0f} req/s (32 clients, closed loop; {codes}); offering "
              f"{rate:.0f} req/s for {args.seconds:.0f} s, {args.rounds} rounds; admission "
              f"{args.max_ongoing} ongoing + {args.max_queued} queued; load avg "
              f"{os.getloadavg()[0]:.1f}")
        print("| round | offered req/s | answered 200 | shed 503/429 | with Retry-After | "
              "errors | p50 / p99 of 200 (ms) | p99 of shed (ms) | RSS MB before → after |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in range(1, args.rounds + 1):
            before = serving_rss_mb()
            t0 = time.perf_counter()
            results = open_loop("127.0.0.1", args.port, PATH, payload, rate, args.seconds)
            took = time.perf_counter() - t0
            time.sleep(2.0)
            after = serving_rss_mb()
            ok = [ms for ms, s, _ in results if s == 200]
            shed = [(ms, ra) for ms, s, ra in results if s in (429, 503)]
            errors = len(results) - len(ok) - len(shed)
            other = sorted({s for _, s, _ in results} - {200, 429, 503})
            rss = " / ".join(f"{k} {before.get(k, 0):.0f} → {v:.0f}"
                             for k, v in sorted(after.items()))
            print(f"| {r} | {len(results) / args.seconds:.0f} (sent in {took:.1f} s) | "
                  f"{len(ok)} | {len(shed)} ({100 * len(shed) / len(results):.0f} %) | "
                  f"{sum(ra for _, ra in shed)} of {len(shed)} | {errors} {other or ''} | "
                  f"{pct(ok, 50):.0f} / {pct(ok, 99):.0f} | "
                  f"{pct([ms for ms, _ in shed], 99) if shed else 0:.0f} | {rss} |",
                  flush=True)
        client = SyncHTTP("127.0.0.1", args.port)
        status, _ = client.post(PATH, payload)
        client.close()
        print(f"after the overload: a plain request answered {status}")
    finally:
        served.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
