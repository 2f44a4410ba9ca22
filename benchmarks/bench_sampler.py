"""How fast the Omniglot episode sampler is, and what share of a MAML step it would take.

Run: ``.venv/bin/python -m benchmarks.bench_sampler`` (finds the data like the library does:
``--data``, ``$EDGEMETA_DATA_DIR`` or the user cache). Timings are the median of several
repeats after a warm-up, so a busy machine shows up as spread rather than a skewed mean.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metalearn.data import OmniglotEpisodes, load_omniglot, standard_split

CONFIGS = [  # (name, ways, shots, queries)
    ("5-way 1-shot", 5, 1, 15),
    ("20-way 5-shot", 20, 5, 5),
]


def episodes_per_second(sampler: OmniglotEpisodes, batch: int, repeats: int) -> tuple[float, float]:
    """(median, best) episodes per second over ``repeats`` timed batches, after one warm-up."""
    sampler.sample(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.sample(batch)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times), batch / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="omniglot.npz or a directory holding it")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--step-seconds", type=float, default=0.9,
                        help="duration of one MAML meta-step to compare sampling with")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = load_omniglot(args.data)
    load_s = time.perf_counter() - start
    train, _ = standard_split(data)
    print(f"loaded {data.path} in {load_s:.2f} s; {len(train)} meta-train characters; "
          f"torch threads = {torch.get_num_threads()}")
    print(f"{'config':<15} {'queries':>7} {'batch':>5} {'episodes/s':>11} {'best':>9} "
          f"{'ms/batch':>9} {'of a ' + format(args.step_seconds, 'g') + ' s step':>14}")
    for name, ways, shots, queries in CONFIGS:
        sampler = OmniglotEpisodes(data, train, ways, shots, queries, seed=0)
        median, best = episodes_per_second(sampler, args.batch, args.repeats)
        batch_s = args.batch / median
        print(f"{name:<15} {queries:>7} {args.batch:>5} {median:>11,.0f} {best:>9,.0f} "
              f"{batch_s * 1e3:>9.1f} {batch_s / args.step_seconds:>14.2%}")


if __name__ == "__main__":
    main()
