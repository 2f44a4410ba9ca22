"""Batched predictions for a server: G single-request groups through one model, three ways.

    .venv/bin/python -m benchmarks.bench_group_forward [--threads 1] [--reps 30] [--images 1]

Rows: a loop of ``algorithm.predict`` (what a server without batching does), the same under
``torch.func.vmap`` (what ``predict_many`` did before), and
:func:`metalearn.folded.forward_groups` (what ``algorithm.predict_groups`` does now), for
G = 1, 4, 8, 16 and 32 groups of ``--images`` 28×28 images (default one); the MAML Omniglot net,
64 channels, batch statistics per group. Times are medians in ms; the last columns are each
fast path's largest difference to the loop (they must agree to float rounding). A fourth
column runs ``forward_groups`` in passes of at most ``--max-images`` images, as
``serve.batching.predict_many`` does. All run interleaved, so that load from other processes hits
them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from metalearn.algorithms import build_algorithm
from metalearn.models import OmniglotConvNet
from serve.batching import passes


def median_ms(fns: dict[str, Callable[[], torch.Tensor]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a replica uses 1)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--images", type=int, default=1, help="28×28 images a group (a request)")
    p.add_argument("--max-images", type=int, default=32,
                   help="the cap on a pass's images (serve's batch_max_images)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    alg = build_algorithm("maml", OmniglotConvNet(ways=5, channels=64), "classification")
    params = alg.init_params()
    print(f"| groups | loop ms | vmap ms | forward_groups ms | in passes of ≤ {args.max_images} "
          "images ms | vmap / forward_groups | max diff vmap | max diff forward_groups |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for groups in (1, 4, 8, 16, 32):
            x = torch.rand(groups, args.images, 1, 28, 28)

            def loop(x: torch.Tensor = x) -> torch.Tensor:
                return torch.stack([alg.predict(params, xg) for xg in x])

            def vmapped(x: torch.Tensor = x) -> torch.Tensor:
                return torch.func.vmap(lambda xg: alg.predict(params, xg))(x)

            def grouped(x: torch.Tensor = x) -> torch.Tensor:
                return alg.predict_groups(params, x)

            def capped(x: torch.Tensor = x) -> torch.Tensor:
                runs = passes([args.images] * len(x), args.max_images)
                return torch.cat([alg.predict_groups(params, x[run]) for run in runs])

            ms = median_ms({"loop": loop, "vmap": vmapped, "groups": grouped, "capped": capped},
                           args.reps)
            ref = loop()
            print(f"| {groups} | {ms['loop']:.2f} | {ms['vmap']:.2f} | {ms['groups']:.2f} | "
                  f"{ms['capped']:.2f} | "
                  f"{ms['vmap'] / ms['groups']:.1f}× | {(vmapped() - ref).abs().max():.1e} | "
                  f"{(grouped() - ref).abs().max():.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
