"""Second-order MAML meta-training throughput, side by side in one run.

    .venv/bin/python -m benchmarks.bench_maml [--quick] [--threads 2] [--reps N] [--tune-malloc]

Rows per workload (Omniglot 5-way 1-shot, 15 queries, meta-batch 32, the MAML paper's strided
conv net; sinusoid K=10, meta-batch 25, the 1-40-40-1 MLP; random inputs — only shapes matter):

* ``reference`` — a loop written the way higher's own ``examples/maml-omniglot.py`` is: per
  task ``innerloop_ctx``, ``diffopt.step``, ``qry_loss.backward()``. Ratio 1.0.
* ``higher`` — this project's reference path, ``MAML(impl="higher")``.
* ``func/<strategy>`` — the fast path with each strategy, and ``func/auto`` (its choice shown).

The candidates run interleaved (one of each per round) so that load from other processes on a
shared machine hits them alike; the table shows medians, ratios to the reference, the largest
gradient difference to it, and GFLOP/s (FLOPs counted once with ``FlopCounterMode``).
``--tune-malloc`` keeps freed memory mapped (see :func:`tune_malloc`); it applies to every row.
Needs a quiet machine: with other processes on the cores, two OpenMP threads wait on each other.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

import higher
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metalearn.algorithms.base import TaskType
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.maml_func import STRATEGY_CHOICES
from metalearn.models import OmniglotConvNet, SinusoidMLP
from metalearn.params import Params, module_params
from metalearn.tasks import TaskBatch

GradFn = Callable[[], Params]


def omniglot_tasks(batch: int = 32, ways: int = 5, shots: int = 1, queries: int = 15
                   ) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return TaskBatch(torch.randn(batch, ways * shots, 1, 28, 28, generator=g),
                     labels.repeat_interleave(shots).expand(batch, -1).contiguous(),
                     torch.randn(batch, ways * queries, 1, 28, 28, generator=g),
                     labels.repeat_interleave(queries).expand(batch, -1).contiguous())


def sinusoid_tasks(batch: int = 25, k: int = 10) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    amp = torch.rand(batch, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(batch, 1, 1, generator=g) * torch.pi
    xs = torch.rand(batch, 2 * k, 1, generator=g) * 10 - 5
    ys = amp * torch.sin(xs + phase)
    return TaskBatch(xs[:, :k], ys[:, :k], xs[:, k:], ys[:, k:])


def reference_step(model: nn.Module, tasks: TaskBatch, loss_fn: Callable, inner_lr: float,
                   inner_steps: int) -> Params:
    """One meta-gradient the way higher's MAML example computes it (summed, then / B)."""
    model.zero_grad()
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    x_spt, y_spt, x_qry, y_qry = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    task_num = x_spt.size(0)
    for i in range(task_num):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(inner_steps):
                spt_loss = loss_fn(fnet(x_spt[i]), y_spt[i])
                diffopt.step(spt_loss)
            qry_loss = loss_fn(fnet(x_qry[i]), y_qry[i])
            qry_loss.backward()
    return {k: p.grad / task_num for k, p in model.named_parameters()}


def candidates(model: nn.Module, task_type: TaskType, tasks: TaskBatch, inner_lr: float,
               steps: int, strategies: list[str]) -> dict[str, GradFn]:
    params = module_params(model)
    ref_model = type(model)(**_ctor_args(model))
    ref_model.load_state_dict(model.state_dict())
    loss = F.cross_entropy if task_type == "classification" else F.mse_loss
    out: dict[str, GradFn] = {
        "reference": lambda: reference_step(ref_model, tasks, loss, inner_lr, steps)}
    hig = MAML(model, task_type, inner_lr, steps, impl="higher")
    out["higher"] = lambda: hig.meta_gradient(params, tasks)[0]
    for s in strategies:
        alg = MAML(type(model)(**_ctor_args(model)), task_type, inner_lr, steps, strategy=s)
        out[f"func/{s}"] = (lambda a: lambda: a.meta_gradient(params, tasks)[0])(alg)
    return out


def _ctor_args(model: nn.Module) -> dict:
    if isinstance(model, OmniglotConvNet):
        return {"ways": model.ways, "channels": model.features[0][0].out_channels,
                "pooling": model.pooling}
    return {"hidden": model.head.in_features}


def tune_malloc() -> bool:
    """Keep freed memory mapped in glibc's heap instead of handing it back to the kernel.

    Why: each meta-step allocates and frees activations of a few MB; with glibc's defaults
    they are mmapped and unmapped again, and the page faults cost ~0.5 s of kernel time per
    Omniglot step on this machine. Equivalent to ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456`` in the environment.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(libc.mallopt(opt, val) == 1 for opt, val in (
        (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 256 << 20)))


def run_workload(name: str, batch: int, fns: dict[str, GradFn], reps: int,
                 flops: float | None) -> list[dict[str, object]]:
    ref = fns["reference"]()
    diffs = {}
    for k, fn in fns.items():  # warm-up (and auto's timing), and the gradient check
        g = fn()
        diffs[k] = max(float((g[p] - ref[p]).abs().max()) for p in ref)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["reference"])
    rows = []
    for k in fns:
        med = statistics.median(times[k])
        rows.append({"workload": name, "batch": batch, "impl": k, "median_s": med,
                     "ratio": base / med,
                     "grad_diff": diffs[k], "gflops": flops / med / 1e9 if flops else None,
                     "min_s": min(times[k])})
    return rows


def count_flops(fn: GradFn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per workload")
    ap.add_argument("--only", choices=["omniglot", "sinusoid"], default=None)
    ap.add_argument("--tune-malloc", action="store_true",
                    help="keep freed memory mapped (glibc mallopt), for every row alike")
    args = ap.parse_args()
    tuned = tune_malloc() if args.tune_malloc else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    rows: list[dict[str, object]] = []
    strategies = ["loop", "vmap", "grouped", "auto"]
    if args.only in (None, "sinusoid"):
        fns = candidates(SinusoidMLP(), "regression", sinusoid_tasks(), 0.01, 1, strategies)
        rows += run_workload("sinusoid K=10, B=25", 25, fns,
                             args.reps or (20 if args.quick else 60), None)
    if args.only in (None, "omniglot"):
        tasks = omniglot_tasks()
        fns = candidates(OmniglotConvNet(ways=5), "classification", tasks, 0.4, 1, strategies)
        flops = count_flops(fns["func/loop"])
        rows += run_workload("Omniglot 5w1s 15q, B=32", 32, fns,
                             args.reps or (3 if args.quick else 7), flops)
        print(f"Omniglot meta-gradient: {flops / 1e9:.1f} GFLOP (FlopCounterMode)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuned: "
          f"{tuned}, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| workload | implementation | median s | tasks/s | × reference | max abs Δgrad "
          "| GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["batch"]
        gf = f"{r['gflops']:.1f}" if r["gflops"] else "–"
        print(f"| {r['workload']} | {r['impl']} | {r['median_s']:.4f} | {b / r['median_s']:.1f} | "
              f"{r['ratio']:.2f} | {r['grad_diff']:.1e} | {gf} |")
    print("\nauto chose:")
    for key, c in STRATEGY_CHOICES.items():
        secs = ", ".join(f"{k} {v:.4f}s" for k, v in c.seconds.items())
        print(f"- {key[2]} inputs {key[4]}: {c.strategy} ({secs}) {c.failed or ''}")


if __name__ == "__main__":
    main()
