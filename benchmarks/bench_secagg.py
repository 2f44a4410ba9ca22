"""Secure aggregation against plain aggregation: time and bytes per round, side by side.

Every party runs in this one process, one after another (no network, no Ray), so the numbers
are the protocol's own compute and payload. Times are CPU seconds of this process
(``time.process_time``; all the work is single-threaded, so on a quiet machine they equal wall
time, and on a busy one they leave out the time other processes held the core): per site, the
mean over sites of its time in the four steps; for the cloud, its time in the four steps; the
round, what it would take with each site on its own machine: per step the median site's time
(the sites do equal work; the median, not the slowest, because on a shared machine the slowest
is whichever site the scheduler preempted), then the cloud's part. Each row is the median of
``--repeats`` rounds. Bytes are payload (:mod:`privacy.messages` ``nbytes``: ids 4 B, keys
32 B, shares 66 B, AES-GCM nonce and tag, the ring vector), per site and round, without the
parameter broadcast, which plain and secure rounds share. "plain" is the float32 update up and
a float64 sum of the float32 vectors at the cloud.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_secagg                   # the table in BENCHMARKS.md
    .venv/bin/python -m benchmarks.bench_secagg --sites 4 16 --dims 10000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from privacy.client import MaskingClient
from privacy.config import SecAggConfig, majority_threshold
from privacy.fixed_point import clip_l2
from privacy.graph import secagg_plus_degree
from privacy.server import MaskingServer

MAML_CONV_FLOATS = 112_837  # the 4-block 64-channel Omniglot conv net, 5-way
T = TypeVar("T")


@dataclass
class Row:
    n: int
    dim: int
    mode: str
    dropped: int
    site_s: float  # mean over sites of its total time
    cloud_s: float
    critical_s: float  # sites in parallel: median site per step + cloud
    up_b: float  # per site
    down_b: float
    plain_up_b: float
    max_err: float
    bound: float


def plain_round(xs: Sequence[np.ndarray]) -> Row:
    t0 = time.process_time()
    total = np.zeros(xs[0].shape[0], dtype=np.float64)
    for x in xs:
        total += x
    cloud = time.process_time() - t0
    up = 4 + xs[0].nbytes
    return Row(len(xs), xs[0].shape[0], "plain", 0, 0.0, cloud, cloud, up, 0, up, 0.0, 0.0)


def secure_round(cfg: SecAggConfig, xs: Sequence[np.ndarray], drop: int, mode: str) -> Row:
    """One full round; the last ``drop`` sites drop after sharing keys, before their input."""
    n = len(xs)
    ids = list(range(1, n + 1))
    site_s = dict.fromkeys(ids, 0.0)
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    critical = 0.0
    cloud_s = 0.0

    def sites_step(who: Sequence[int], call: Callable[[int], T]) -> dict[int, T]:
        nonlocal critical
        out, times = {}, []
        for u in who:
            t0 = time.process_time()
            out[u] = call(u)
            times.append(time.process_time() - t0)
            site_s[u] += times[-1]
        critical += statistics.median(times)
        return out

    def cloud_step(call: Callable[[], T]) -> T:
        nonlocal critical, cloud_s
        t0 = time.process_time()
        out = call()
        dt = time.process_time() - t0
        cloud_s += dt
        critical += dt
        return out

    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in ids}
    adverts = sites_step(ids, lambda u: clients[u].advertise_keys())
    roster = cloud_step(lambda: server.collect_keys(list(adverts.values())))
    bundles = sites_step(ids, lambda u: clients[u].share_keys(roster))
    deliveries = cloud_step(lambda: server.route_shares(list(bundles.values())))
    alive = ids[: n - drop]
    masked = sites_step(alive, lambda u: clients[u].masked_input(xs[u - 1], deliveries[u]))
    request = cloud_step(lambda: server.collect_masked(list(masked.values())))
    responses = sites_step(alive, lambda u: clients[u].unmask(request))
    result = cloud_step(lambda: server.unmask(list(responses.values())))
    for u in ids:
        up[u] += adverts[u].nbytes + bundles[u].nbytes
        down[u] += roster.nbytes + deliveries[u].nbytes
    for u in alive:
        up[u] += masked[u].nbytes + responses[u].nbytes
        down[u] += request.nbytes
    true = np.sum([xs[u - 1].astype(np.float64) for u in alive], axis=0)
    err = float(np.abs(result.total - true).max())
    if err > result.error_bound:
        raise AssertionError(f"sum off by {err}, bound {result.error_bound}")
    dim = xs[0].shape[0]
    return Row(n, dim, mode, drop, statistics.fmean(site_s[u] for u in alive), cloud_s,
               critical, statistics.fmean(up[u] for u in alive),
               statistics.fmean(down[u] for u in alive), 4 + 4 * dim, err, result.error_bound)


def median_row(rows: Sequence[Row]) -> Row:
    """The round of median duration among repeats (bytes and errors are the same in each)."""
    return sorted(rows, key=lambda r: r.critical_s)[len(rows) // 2]


def fmt_bytes(b: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def table(rows: Sequence[Row]) -> str:
    head = ("| sites | floats | mode | dropped | site s (mean) | cloud s | round s (sites in "
            "parallel) | up / site | down / site | up × plain | max error (bound) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        err = "–" if r.mode == "plain" else f"{r.max_err:.1e} ({r.bound:.1e})"
        lines.append(f"| {r.n} | {r.dim:,} | {r.mode} | {r.dropped} | {r.site_s:.4f} | "
                     f"{r.cloud_s:.4f} | {r.critical_s:.4f} | {fmt_bytes(r.up_b)} | "
                     f"{fmt_bytes(r.down_b)} | {r.up_b / r.plain_up_b:.2f} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_secagg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, nargs="+", default=[4, 16, 100])
    p.add_argument("--dims", type=int, nargs="+", default=[MAML_CONV_FLOATS, 10_000])
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--drop", type=float, default=0.1,
                   help="fraction of sites that drop before sending input (one row each n)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per row (the median is shown)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    t_start = time.perf_counter()
    secure_round(SecAggConfig(16, 1.0, 32, 3, 2, None),  # warm caches and imports
                 [np.zeros(16, np.float32)] * 3, 0, "warm-up")
    for dim in args.dims:
        for n in args.sites:
            xs = [clip_l2(rng.normal(size=dim), args.clip).astype(np.float32) for _ in range(n)]
            reps = range(args.repeats)
            rows.append(median_row([plain_round(xs) for _ in reps]))
            full = SecAggConfig(dim, args.clip, args.bits, n, majority_threshold(n), None)
            drop = max(1, round(args.drop * n))
            k = secagg_plus_degree(n)
            t = majority_threshold(k + 1)
            plus = SecAggConfig(dim, args.clip, args.bits, n, t, k) if k < n - 1 else None
            for cfg, name in ((full, f"SecAgg t={full.threshold}"),
                              (plus, f"SecAgg+ k={k} t={t}")):
                if cfg is None:
                    continue
                rows.append(median_row([secure_round(cfg, xs, 0, name) for _ in reps]))
                rows.append(median_row([secure_round(cfg, xs, drop, name) for _ in reps]))
            print(f"  done: {n} sites, {dim:,} floats ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)
    print()
    print(table(rows))
    print(f"\n{args.bits}-bit ring, clip {args.clip}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
