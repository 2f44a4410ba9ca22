"""Flower (flwr 1.4x Message API, Ray simulation backend) round-overhead and scale probe.

Runs INSIDE ``.venv-flwr`` (see ``flower_setup.sh``), from the repository root, as
``.venv-flwr/bin/python -m benchmarks.peers.flower_rounds``, and imports nothing from edgemeta
but the standard-library ``/proc`` reader behind :mod:`benchmarks.peers.procmem`, so the peer is
measured as its users would run it and its memory is read by the same code as edgemeta's.
Prints one JSON object per result on stdout; all logging (Flower's, Ray's) goes to stderr.

Modes:

* ``overhead``: every client receives the 113k-parameter MAML Omniglot conv net, loads it into a
  torch model, spends ``--work-s`` seconds (sleep by default, like edgemeta's ``delay_s`` hook),
  and echoes the parameters with ``num-examples``; FedAvg aggregates. Per round:
  ``overhead = wall - max(client handler time)``.
* ``scale``: ``--clients`` registered virtual clients, ``--sampled`` of them per round, no
  client work. By default each sampled client still echoes the conv net: a Flower client's
  update is model-shaped, like an edgemeta site's (``--payload tiny`` isolates pure
  orchestration with a 1-float payload).

Timing hooks (flwr 1.42, ``flwr/serverapp/strategy/strategy.py``, ``Strategy.start``): a round
is ``configure_train`` -> ``grid.send_and_receive`` -> ``aggregate_train`` -> (evaluation,
switched off here). :class:`TimedFedAvg` stamps the entry of ``configure_train`` (before node
sampling) and the exit of ``aggregate_train``; that window is the round's wall time. Clients
stamp their own handler start/end (``time.time()``, same host) so the overhead splits into
dispatch (round start -> first client start) and collection (last client end -> round end).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)  # never join someone else's cluster on this host
# Ray maps a requested 127.0.0.1 node address to the host's outward address unless it thinks
# clusters are unsupported; this keeps every Ray process of the run on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

# --------------------------------------------------------------------------- the model

def maml_omniglot_net(ways: int = 5) -> nn.Module:
    """The MAML paper's Omniglot net: 4 x [3x3 conv stride 2, 64, BN, ReLU] + Linear(256, ways).

    BatchNorm keeps no running statistics (as in MAML), so the state dict is exactly the
    parameters: 113,221 floats for 5 ways.
    """
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, 3, stride=2, padding=1),
                   nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU()]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(256, ways))


def initial_arrays(payload: str) -> ArrayRecord:
    """The global model the server starts from."""
    if payload == "convnet":
        torch.manual_seed(0)
        return ArrayRecord(maml_omniglot_net().state_dict())
    return ArrayRecord([np.zeros(1, dtype=np.float32)])


# --------------------------------------------------------------------------- the client side

_CLIENT_MODEL: dict[str, nn.Module] = {}  # one model per actor process, built on first use

client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Load the global model, spend ``work-s`` seconds, echo the parameters.

    The handler times itself: ``compute-s`` is everything it does, so what the server sees
    beyond the slowest handler is Flower's (and Ray's) cost.
    """
    t_start = time.time()
    t0 = time.perf_counter()
    cfg = msg.content["config"]
    arrays = msg.content["arrays"]
    work_s = float(cfg["work-s"])
    if cfg["payload"] == "convnet":
        model = _CLIENT_MODEL.get("net")
        if model is None:
            model = _CLIENT_MODEL.setdefault("net", maml_omniglot_net())
        model.load_state_dict(arrays.to_torch_state_dict())
        if work_s > 0:
            _work(work_s - (time.perf_counter() - t0), str(cfg["work"]))
        out = ArrayRecord(model.state_dict())
    else:
        if work_s > 0:
            _work(work_s - (time.perf_counter() - t0), str(cfg["work"]))
        out = ArrayRecord(arrays.to_numpy_ndarrays())
    metrics = MetricRecord({
        "num-examples": 1,
        "compute-s": time.perf_counter() - t0,
        "t-start": t_start,
        "t-end": time.time(),
    })
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def _work(seconds: float, how: str) -> None:
    """Sleep (default: what edgemeta's delay hook does) or spin (holds a core)."""
    if seconds <= 0:
        return
    if how == "busy":
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(seconds)


# --------------------------------------------------------------------------- the server side

class TimedFedAvg(FedAvg):
    """FedAvg that records each round's server-side window and its clients' timings.

    ``configure_train`` entry .. ``aggregate_train`` exit covers node sampling, message
    construction, push, Ray dispatch to the actor pool, client handlers, result collection
    (including Flower's polling) and aggregation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._t0_wall = 0.0
        self.payload: dict[str, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        self._t0_wall = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if server_round == 1 and messages:  # sizes once, in the excluded start-up round
            self.payload["down_array_bytes"] = arrays.count_bytes()
            self.payload["down_pickled_bytes"] = len(pickle.dumps(messages[0], protocol=5))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        t1 = time.perf_counter()
        t1_wall = time.time()
        ok = [r for r in replies if not r.has_error()]
        metrics = [r.content["metrics"] for r in ok]
        compute = [float(m["compute-s"]) for m in metrics]
        starts = [float(m["t-start"]) for m in metrics]
        ends = [float(m["t-end"]) for m in metrics]
        if server_round == 1 and ok:
            self.payload["up_array_bytes"] = ok[0].content["arrays"].count_bytes()
            self.payload["up_pickled_bytes"] = len(pickle.dumps(ok[0], protocol=5))
        wall = t1 - self._t0
        self.rows.append({
            "round": server_round,
            "wall_s": wall,
            "replies": len(ok),
            "errors": len(replies) - len(ok),
            "compute_max_s": max(compute, default=0.0),
            "compute_sum_s": sum(compute),
            "overhead_s": wall - max(compute, default=0.0),
            "dispatch_s": (min(starts) - self._t0_wall) if starts else float("nan"),
            "collect_s": (t1_wall - max(ends)) if ends else float("nan"),
            "t0_wall": self._t0_wall,
        })
        return out


# --------------------------------------------------------------------------- one run

def _patch_polls(poll_s: float) -> None:
    """Shorten Flower's two hard-coded 0.1 s polls (an ablation, not stock Flower).

    ``InMemoryGrid.send_and_receive`` sleeps ``pull_interval`` between pulls, and the
    simulation engine's ``add_messages_to_queue`` thread waits 0.1 s between scans of all
    nodes' inboxes.
    """
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid import inmemory_grid

    original_init = inmemory_grid.InMemoryGrid.__init__

    def grid_init(self: Any, state_factory: Any, pull_interval: float = poll_s) -> None:
        original_init(self, state_factory, pull_interval=poll_s)

    inmemory_grid.InMemoryGrid.__init__ = grid_init  # type: ignore[method-assign]

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(poll_s)

    vce_api.add_messages_to_queue = add_messages_to_queue


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One simulation; returns the summary (and per-round rows)."""
    import flwr
    import ray
    from flwr.simulation import run_simulation

    from benchmarks.peers.procmem import PeakMemSampler

    t_begin = time.perf_counter()
    load_before = os.getloadavg()[0]
    if args.poll_s is not None:
        _patch_polls(args.poll_s)
    sampled = args.clients if args.mode == "overhead" else min(args.sampled, args.clients)
    strategy = TimedFedAvg(
        fraction_train=sampled / args.clients,
        fraction_evaluate=0.0,  # evaluation off: a round is train only
        min_train_nodes=sampled,
        min_evaluate_nodes=0,
        min_available_nodes=sampled,
    )
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy.start(
            grid=grid,
            initial_arrays=initial_arrays(args.payload),
            num_rounds=args.rounds,
            train_config=ConfigRecord({"work-s": float(args.work_s), "work": args.work,
                                       "payload": args.payload}),
        )

    temp_dir = tempfile.mkdtemp(prefix="flwr-ray-", dir="/tmp")
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
        "init_args": {
            "address": "local",  # a fresh cluster, even if another is running here
            "num_cpus": args.ray_cpus,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "_temp_dir": temp_dir,
            "object_store_memory": args.object_store_mb * 2**20,
        },
    }
    sampler = PeakMemSampler(root_pid=os.getpid(), interval_s=args.mem_interval_s)
    try:
        with sampler:
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=args.clients, backend_config=backend_config)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    total_s = time.perf_counter() - t_begin

    rows = strategy.rows
    used = [r for r in rows if r["round"] > 1]  # round 1 carries Ray and actor start-up

    def stat(key: str, q: float) -> float | None:
        vals = [r[key] for r in used]
        return float(np.percentile(vals, q)) if vals else None

    return {
        "bench": "flower",
        "system": f"flower {flwr.__version__}",
        "mode": args.mode,
        "clients": args.clients,
        "sampled": sampled,
        "rounds": len(rows),
        "rounds_used": len(used),
        "work_s": args.work_s,
        "work": args.work,
        "payload": args.payload,
        "poll_s": args.poll_s if args.poll_s is not None else 0.1,
        "stock_polls": args.poll_s is None,
        "client_cpus": args.client_cpus,
        "actors": int(args.ray_cpus / args.client_cpus),
        "median_wall_s": stat("wall_s", 50),
        "p90_wall_s": stat("wall_s", 90),
        "median_overhead_s": stat("overhead_s", 50),
        "p90_overhead_s": stat("overhead_s", 90),
        "median_compute_max_s": stat("compute_max_s", 50),
        "median_compute_sum_s": stat("compute_sum_s", 50),
        "median_dispatch_s": stat("dispatch_s", 50),
        "median_collect_s": stat("collect_s", 50),
        # The ServerApp thread starts while Ray and the actor pool come up, so round 1's wall
        # time holds the whole start-up.
        "round1_wall_s": rows[0]["wall_s"] if rows else None,
        "total_s": total_s,
        "num_params": int(sum(p.numel() for p in maml_omniglot_net().parameters()))
        if args.payload == "convnet" else 1,
        **{f"payload_{k}": v for k, v in strategy.payload.items()},
        **sampler.result(),
        # Other work on the host skews every number here: keep the 1-min load next to them.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__,
                     "torch": torch.__version__},
        "per_round": [{k: (round(v, 5) if isinstance(v, float) else v)
                       for k, v in r.items() if k != "t0_wall"} for r in rows],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("overhead", "scale"), default="overhead")
    p.add_argument("--clients", type=int, default=4, help="registered virtual clients")
    p.add_argument("--sampled", type=int, default=100, help="clients per round (scale mode)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--work-s", type=float, default=None,
                   help="client work per round (default 0.5 overhead, 0 scale)")
    p.add_argument("--work", choices=("sleep", "busy"), default="sleep")
    p.add_argument("--payload", choices=("convnet", "tiny"), default="convnet")
    p.add_argument("--client-cpus", type=float, default=0.5,
                   help="Ray CPUs per client actor (pool size = ray-cpus / this)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--object-store-mb", type=int, default=512)
    p.add_argument("--poll-s", type=float, default=None,
                   help="ablation: replace Flower's two 0.1 s polls with this interval")
    p.add_argument("--mem-interval-s", type=float, default=0.25)
    args = p.parse_args(argv)
    if args.work_s is None:
        args.work_s = 0.5 if args.mode == "overhead" else 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result), flush=True)
    return 0 if result["rounds"] == args.rounds else 1


if __name__ == "__main__":
    # Run the copy imported as ``benchmarks.peers.flower_rounds`` so that Ray workers import the
    # ClientApp by name (as a deployed Flower app would; Ray puts the driver's working directory,
    # the repository root, on their path) instead of unpickling this module's functions by value
    # with every message.
    from benchmarks.peers import flower_rounds

    sys.exit(flower_rounds.main())
