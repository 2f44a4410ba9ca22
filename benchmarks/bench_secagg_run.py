"""A federated run with secure aggregation on against the same run with it off, side by side.

Both runs go through ``experiments.federated.train_federated`` on one embedded Ray cluster
(every site's actor on this machine), with the same config, seed and sites; the only
difference is ``federated.secure_aggregation`` (the config's own section, or none). Runs
alternate (off, on, off, on, ...) so that a change of machine load hits both. Round 1 (actors
warming up) is left out; each column is the median over the remaining rounds of all repeats:

* ``wall_s``: the round as the driver lives it (``metrics.parquet``); ``compute_s_max``: the
  slowest site's own compute; ``overhead_s``: wall minus that (what the federation costs beyond
  the work, less sensitive to the machine's load than the wall time); ``calls_s``: the round
  call alone (for secure rounds, the masked-input step), ``secagg_*_s``: the key exchanges
  (``advertise``, ``share``, ``unmask``: calls to the sites and the cloud's work) and the
  cloud's sum of the masked inputs (``sum``).
* bytes per round: ``up`` the updates (float32 vectors, or masked ring vectors with their site
  id), ``keys up`` / ``keys down`` what the protocol adds (public keys, sealed shares, unmasking
  shares; the roster, the routed shares, the unmask requests), and ``down`` the parameters.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_secagg_run                    # BENCHMARKS.md's table
    .venv/bin/python -m benchmarks.bench_secagg_run --rounds 40 --repeats 3
    .venv/bin/python -m benchmarks.bench_secagg_run --config federated_omniglot_4sites \
        --set 'federated.secure_aggregation={clip: 10}' --rounds 10 --repeats 1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run(config: str, secure: bool, rounds: int, out: Path, name: str,
        extra: list[str]) -> list[dict[str, Any]]:
    """One run's round rows, round 1 left out."""
    import pandas as pd

    from experiments.config import load_config, resolve_config
    from experiments.federated import train_federated

    overrides = [f"name={name}", f"output_dir={out}", f"train.steps={rounds}",
                 "train.checkpoint_every=1000", f"train.log_every={rounds}",
                 "eval.episodes=10", "eval.batch=10", "federated.personalize_episodes=0",
                 *extra]
    if not secure:
        overrides.append("federated.secure_aggregation=null")
    cfg = load_config(resolve_config(config), overrides)
    assert cfg.federated is not None and (cfg.federated.secure_aggregation is not None) == secure
    train_federated(cfg, echo=lambda _: None)
    rows = pd.read_parquet(cfg.run_dir / "metrics.parquet")
    return rows[rows["round"] > 1].to_dict("records")


def median(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if key in r and r[key] == r[key]]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="federated_sinusoid_secagg",
                   help="a bundled config or a path, with a secure_aggregation section")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for both modes, e.g. "
                        "'federated.secure_aggregation={clip: 10}'")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded: loopback

    from cluster.connect import connect, shutdown
    from experiments.config import load_config, resolve_config

    fed = load_config(resolve_config(args.config), args.set).federated
    assert fed is not None, "the config needs a federated section"
    topology = fed.resolved_topology()
    cpus = topology.cloud.num_cpus + sum(s.actor_cpus for s in topology.sites)
    connect(None, topology, num_cpus=math.ceil(cpus), log_to_driver=False)
    rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                for secure in (False, True):
                    name = f"{'secagg' if secure else 'plain'}-{i}"
                    rows[secure] += run(args.config, secure, args.rounds, Path(tmp), name,
                                        args.set)
    finally:
        shutdown()
    print(f"{args.config}: {len(topology.sites)} sites, {args.rounds} rounds x {args.repeats} "
          f"repeats per mode, round 1 left out; {time.time() - t0:.0f} s in all")
    print("| mode | rounds | wall_s | compute_s_max | overhead_s | calls_s | advertise_s "
          "| share_s | sum_s | unmask_s | up B | keys up B | keys down B | down B | up x plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plain_up = median(rows[False], "bytes_up")
    for secure in (False, True):
        r = rows[secure]
        up = median(r, "bytes_up") + (median(r, "secagg_bytes_up") if secure else 0.0)
        cells = [("secure" if secure else "plain"), str(len(r))]
        cells += [f"{median(r, k):.4f}"
                  for k in ("wall_s", "compute_s_max", "overhead_s", "calls_s")]
        cells += ([f"{median(r, f'secagg_{k}_s'):.4f}" for k in ("advertise", "share", "sum",
                                                                 "unmask")]
                  if secure else ["–"] * 4)
        cells += [f"{median(r, 'bytes_up'):.0f}",
                  f"{median(r, 'secagg_bytes_up'):.0f}" if secure else "–",
                  f"{median(r, 'secagg_bytes_down'):.0f}" if secure else "–",
                  f"{median(r, 'bytes_down'):.0f}", f"{up / plain_up:.3f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
