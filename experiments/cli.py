"""The ``edgemeta`` command: train, evaluate, fetch data, and run the demo."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.config import ConfigError
from experiments.entry import add_run_arguments, config_from_args
from experiments.run_storage import STORAGE_ENV, where_line
from experiments.stopping import exit_code
from metalearn.data.errors import DataSetError
from metalearn.storage import StorageError

if TYPE_CHECKING:  # experiments.progress imports rich: only when a command runs
    from experiments.progress import RunConsole


def _console() -> RunConsole:
    from experiments.progress import RunConsole

    return RunConsole()


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.train import train

    cfg = config_from_args(args)
    out = _console()
    out.echo(where_line(cfg))
    return exit_code(train(cfg, resume=not args.fresh, echo=out.echo, progress=out))


def cmd_federated(args: argparse.Namespace) -> int:
    from experiments.federated import QUORUM_LOST_EXIT, QuorumLost, train_federated

    cfg = config_from_args(args)
    out = _console()
    out.echo(where_line(cfg))
    try:
        return exit_code(train_federated(cfg, resume=not args.fresh, address=args.address,
                                         echo=out.echo, progress=out))
    except QuorumLost as err:  # an outcome of the run, not a bug: one line, no traceback
        print(f"edgemeta federated: {err}", file=sys.stderr)
        return QUORUM_LOST_EXIT


def cmd_submit(args: argparse.Namespace) -> int:
    from experiments.submit import submit

    try:
        return submit(args.config, address=args.address, storage=args.storage,
                      overrides=args.set, working_dir=args.working_dir, wait=args.wait)
    except ConnectionError as err:  # the Job API client's "failed to connect"
        print(f"edgemeta submit: error: {err}", file=sys.stderr)
        return 2


def cmd_evaluate(args: argparse.Namespace) -> int:
    from experiments.train import evaluate_run

    out = _console()
    evaluate_run(args.run_dir, step=args.step, episodes=args.episodes, overrides=args.set,
                 echo=out.echo, progress=out)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from metalearn.data.fetch import FetchError, fetch_omniglot

    dest = args.dest or os.environ.get("EDGEMETA_DATA_DIR")
    try:
        path = fetch_omniglot(dest) if dest else fetch_omniglot()
    except FetchError as err:
        print(f"edgemeta data fetch: error: {err}", file=sys.stderr)
        return 2
    print(f"omniglot ready at {path}")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    """Make each site's store from the source data set (idempotent: an unchanged store is
    reported "up to date" and left alone)."""
    from experiments.config import load_config, resolve_config
    from experiments.site_jobs import federated_section, shard_spec, site_stores
    from metalearn.data.shard import shard_sites

    overrides = list(args.set) + ([f"federated.data.stores={args.stores}"] if args.stores
                                  else [])
    cfg = load_config(resolve_config(args.config), overrides)
    topology = federated_section(cfg).resolved_topology()
    spec = shard_spec(cfg, topology)
    stores = site_stores(cfg, topology)
    try:
        done = shard_sites(spec, stores, only=args.site or None)
    except ValueError as err:
        print(f"edgemeta data shard: error: {err}", file=sys.stderr)
        return 2
    name = spec.partitioner["name"]
    for site, (status, manifest) in done.items():
        what = (f"{manifest.num_classes} classes, {manifest.rows} examples, "
                f"{len(manifest.groups)} alphabets")
        print(f"{site}: {status} ({what}; {name}) at {stores[site]}")
    if args.test_store:
        from metalearn.data.shard import shard_split

        status, manifest = shard_split(args.test_store, "test", cfg.data.path)
        print(f"meta-test: {status} ({manifest.num_classes} classes, {manifest.rows} examples) "
              f"at {args.test_store}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import run_demo
    from metalearn.data.fetch import FetchError

    out = _console()
    try:
        run_demo(args.set, echo=out.echo, progress=out)
    except FetchError as err:
        print(f"edgemeta demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.launch import StartError, run

    out = _console()
    try:
        return run(args.run_dir, host=args.host, port=args.port, token_file=args.token_file,
                   ingress=None if args.ingress == "auto" else args.ingress, site=args.site,
                   num_replicas=args.replicas, address=args.address,
                   proxy_location=args.proxy_location, access_log=args.access_log,
                   adapted_max_models=args.adapted_max_models,
                   adapted_max_bytes=args.adapted_max_bytes, echo=out.echo)
    except StartError as err:
        print(f"edgemeta serve: could not start: {err}", file=sys.stderr)
        return 1


def cmd_site_onboard(args: argparse.Namespace) -> int:
    """Onboard a site that joins after training (experiments.onboard), then serve its model
    until interrupted (or stop after the first answer, ``--exit-after-first``)."""
    import time

    from experiments.onboard import onboard
    from serve.launch import StartError, wait_for_stop_signal

    started = time.monotonic()
    out = _console()
    try:
        done = onboard(args.run_dir, args.site, args.store, shard=args.shard, steps=args.steps,
                       episodes=args.episodes, port=args.port, host=args.host,
                       address=args.address,
                       ingress=None if args.ingress == "auto" else args.ingress,
                       echo=out.echo, started=started)
    except (StartError, ValueError) as err:
        print(f"edgemeta site onboard: error: {err}", file=sys.stderr)
        return 2
    print(f"onboarded {done.model_id}: first answer {done.first_answer_s:.2f} s after the "
          f"command started (model written at {done.model_s:.2f} s)", flush=True)
    try:
        if not args.exit_after_first:
            wait_for_stop_signal()
    finally:
        done.served.stop()
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from experiments.config import resolve_config
    from experiments.search import tune_config_file

    out = _console()
    tune_config_file(resolve_config(args.config), args.space, overrides=args.set,
                     fresh=args.fresh, echo=out.echo, progress=out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from experiments.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


def _cluster_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a cluster or topology problem as one clear line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from cluster.state import ClusterError
        from cluster.topology import TopologyError

        try:
            return fn(args)
        except (ClusterError, TopologyError) as err:
            print(f"edgemeta cluster: error: {err}", file=sys.stderr)
            return 2

    return wrapper


def _cluster_state_dir(args: argparse.Namespace) -> Path:
    from cluster.state import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


@_cluster_errors
def cmd_cluster_up(args: argparse.Namespace) -> int:
    from cluster.local import up
    from cluster.topology import load_topology

    topo = load_topology(args.topology)
    # Jobs run in Ray's unpacked copy of their working dir, deleted with the cluster: their
    # runs go to run storage instead, by default ./runs made absolute (what `edgemeta
    # federated` uses here), or the EDGEMETA_RUN_STORAGE of this shell.
    storage = os.environ.get(STORAGE_ENV, "").strip() or str(Path("runs").resolve())
    info = up(topo, _cluster_state_dir(args), env={STORAGE_ENV: storage})
    print(f"\nLocal cluster up: GCS {info.address}, dashboard {info.dashboard_url}, "
          f"sites {', '.join(topo.site_names)}")
    print(f"Jobs write their runs to {storage} ({STORAGE_ENV} of every node; it outlives the "
          "cluster)")
    print(f"Token (mode 0600): {info.token_path}\n\nSubmit a job:\n{info.submit_hint()}")
    print(f"or, with a config from anywhere: edgemeta submit CONFIG --address "
          f"{info.dashboard_url} --wait")
    print(f"\nOr connect a driver: cluster.connect.connect('auto', topology)"
          f"\nStop it: edgemeta cluster down"
          f"{' --state-dir ' + args.state_dir if args.state_dir else ''}")
    return 0


@_cluster_errors
def cmd_cluster_down(args: argparse.Namespace) -> int:
    from cluster.local import down

    down(_cluster_state_dir(args), grace_s=args.grace)
    return 0


@_cluster_errors
def cmd_cluster_status(args: argparse.Namespace) -> int:
    from cluster.local import status
    from cluster.state import read_state

    info = read_state(_cluster_state_dir(args))
    print(f"cluster {info.address}  dashboard {info.dashboard_url}  state {info.state_dir}")
    print(f"{'node':<14} {'kind':<5} {'node id':<14} {'alive':<6} {'procs':>5}  resources")
    for row in status(_cluster_state_dir(args)):
        alive = "?" if row["alive"] is None else ("yes" if row["alive"] else "no")
        custom = {k: v for k, v in row["resources"].items() if ":" in k or k == "cloud"}
        custom = {k: v for k, v in custom.items() if not k.startswith("node:")}
        cpu = row["resources"].get("CPU")
        res = " ".join([f"CPU={cpu:g}" if cpu else "", *(f"{k}={v:g}" for k, v in custom.items())])
        print(f"{row['name']:<14} {row['kind']:<5} {row['node_id'][:12]:<14} {alive:<6} "
              f"{row['processes']:>5}  {res.strip()}")
    return 0


@_cluster_errors
def cmd_cluster_stop_site(args: argparse.Namespace) -> int:
    from cluster.local import stop_site

    stop_site(_cluster_state_dir(args), args.site, grace_s=args.grace)
    return 0


@_cluster_errors
def cmd_cluster_restart_site(args: argparse.Namespace) -> int:
    from cluster.local import restart_site

    info = restart_site(_cluster_state_dir(args), args.site, grace_s=args.grace,
                        timeout_s=args.timeout)
    print(f"site {args.site} up as node {info.nodes[args.site].node_id[:12]}")
    return 0


def cmd_cluster_token(args: argparse.Namespace) -> int:
    from cluster.auth import write_token_file

    path = write_token_file(args.path)
    print(f"token in {path} (mode 0600); cluster.yaml's file_mounts copies it to every node")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Ray's own log lines stay in log files unless asked for (cluster.ray_logs).
    loud = argparse.ArgumentParser(add_help=False)
    loud.add_argument("--verbose", action="store_true",
                      help="also print Ray's and Serve's own log lines (default: log files)")

    p = sub.add_parser("train", parents=[loud],
                       help="centralized meta-training from a YAML config")
    add_run_arguments(p, "the config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("federated", parents=[loud],
                       help="federated meta-training across edge sites on Ray")
    add_run_arguments(p, "a config with a federated section")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: federated.address, else embedded)")
    p.set_defaults(func=cmd_federated)

    p = sub.add_parser("submit", help="submit federated training to a cluster as a Ray job "
                                      "(the config travels with the job)")
    p.add_argument("config", help="a YAML file (anywhere: it is sent inline), a bundled name, "
                                  "or a file in run storage")
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: "
                        "RAY_ADDRESS)")
    p.add_argument("--storage", default=None, metavar="ROOT",
                   help="run storage root for the job: a URI (s3://BUCKET/runs) or an absolute "
                        "folder on the cluster (default: an absolute output_dir, else the "
                        "cluster's EDGEMETA_RUN_STORAGE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--working-dir", default=".",
                   help="the code the job runs (default: this folder, the repository)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("evaluate", parents=[loud],
                       help="re-evaluate a run folder's checkpoint on meta-test")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate differently from the run's config, e.g. --set eval.steps=10")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("data", help="data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download and convert a data set")
    f.add_argument("dataset", choices=["omniglot"])
    f.add_argument("--dest", default=None, help="folder (default: EDGEMETA_DATA_DIR or cache)")
    f.set_defaults(func=cmd_data_fetch)
    f = data_sub.add_parser("shard", help="make each site's store from the source data set "
                                          "with the config's partitioner (federated.data)")
    f.add_argument("config", help="a YAML file with a federated section, or a bundled name")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set federated.data.partitioner=iid")
    f.add_argument("--stores", default=None,
                   help="the stores root (default: federated.data.stores, else <run>/stores)")
    f.add_argument("--site", action="append", default=[],
                   help="make only this site's store (repeatable), e.g. on that site's node")
    f.add_argument("--test-store", default=None, metavar="PATH",
                   help="also write Omniglot's meta-test split as a store at PATH (for "
                        "federated.data.test_store on the cloud node)")
    f.set_defaults(func=cmd_data_shard)

    p = sub.add_parser("demo", parents=[loud], help="the end-to-end demo that `make demo` runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", parents=[loud],
                       help="serve a run folder's models over HTTP with Ray Serve")
    p.add_argument("run_dir", nargs="+", help="run folder(s); the first is `latest`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None,
                   help="require this bearer token (default: EDGEMETA_SERVE_TOKEN, else none)")
    p.add_argument("--ingress", choices=["auto", "haproxy", "proxy", "direct"], default="auto",
                   help="HTTP ingress: HAProxy where available (auto), Serve's own proxy, or "
                        "direct (Serve's proxy on the head and each ingress replica's own "
                        "server on its node; auto with --site on a loopback host)")
    p.add_argument("--site", default=None,
                   help="pin replicas to this edge site's node; the site's own way in (a server "
                        "on its node) is printed")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--address", default=None, help="join a running Ray cluster")
    p.add_argument("--proxy-location", choices=["HeadOnly", "EveryNode"], default="HeadOnly")
    p.add_argument("--access-log", action="store_true",
                   help="Serve's per-request log line in each replica (off by default: it "
                        "cost 15-24%% of throughput here; HAProxy can log at the ingress)")
    p.add_argument("--adapted-max-models", type=int, default=1000,
                   help="adapted models kept per run folder (least recently used deleted)")
    p.add_argument("--adapted-max-bytes", type=int, default=1 << 30,
                   help="bytes of adapted models kept per run folder (default 1 GiB)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("site", help="edge sites of a trained run")
    site_sub = p.add_subparsers(dest="site_command", required=True)
    o = site_sub.add_parser("onboard", parents=[loud],
                            help="a site that joins after training: its store, its "
                                 "personalized model (RUN@site-NAME), served at the site")
    o.add_argument("run_dir", help="the federated run (a folder or a URI in run storage)")
    o.add_argument("--site", required=True, help="the new site's name (lowercase, digits, -)")
    o.add_argument("--store", required=True, help="the site's store (a folder on this node)")
    o.add_argument("--shard", choices=["test"], default=None,
                   help="make the store first from omniglot's meta-test split (classes no "
                        "training site held); default: the store must exist")
    o.add_argument("--steps", type=int, default=None,
                   help="personalization meta-steps (default: the run's personalize_steps)")
    o.add_argument("--episodes", type=int, default=None,
                   help="held-out episodes scored (default: the run's personalize_episodes)")
    o.add_argument("--host", default="127.0.0.1")
    o.add_argument("--port", type=int, default=8000)
    o.add_argument("--address", default=None,
                   help="join this Ray cluster (the replica goes to the site's node); "
                        "default: this machine is the site's node")
    o.add_argument("--ingress", choices=["auto", "haproxy", "proxy", "direct"], default="auto")
    o.add_argument("--exit-after-first", action="store_true",
                   help="stop serving after the first answered request (benchmarks, tests)")
    o.set_defaults(func=cmd_site_onboard)

    p = sub.add_parser("tune", parents=[loud],
                       help="hyper-parameter search with Ray Tune (ASHA early stopping)")
    p.add_argument("config", help="a centralized YAML config, or a bundled name")
    p.add_argument("--space", required=True, help="the search space YAML (experiments.search)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value for every trial")
    p.add_argument("--fresh", action="store_true",
                   help="start the search over (default: restore the experiment)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="write a run folder's self-contained report.html")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default: RUN_DIR/report.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cluster", help="a local multi-node Ray cluster (a raylet per site)")
    cluster_sub = p.add_subparsers(dest="cluster_command", required=True)
    state_help = "where the cluster's state, token and logs live (default: EDGEMETA_STATE_DIR " \
                 "or ~/.edgemeta/cluster)"
    c = cluster_sub.add_parser("up", help="start a head (cloud) and one raylet per edge site")
    c.add_argument("topology", help="a topology YAML, e.g. cluster/topologies/local4.yaml")
    c.add_argument("--state-dir", default=None, help=state_help)
    c.set_defaults(func=cmd_cluster_up)
    c = cluster_sub.add_parser("down", help="stop exactly the processes `cluster up` started")
    c.add_argument("--state-dir", default=None, help=state_help)
    c.add_argument("--grace", type=float, default=10.0, help="seconds to wait before SIGKILL")
    c.set_defaults(func=cmd_cluster_down)
    c = cluster_sub.add_parser("status", help="nodes, alive state and resources")
    c.add_argument("--state-dir", default=None, help=state_help)
    c.set_defaults(func=cmd_cluster_status)
    c = cluster_sub.add_parser("stop-site", help="stop one site's node (and what a killed "
                               "raylet left behind); restart-site brings it back")
    c.add_argument("site")
    c.add_argument("--state-dir", default=None, help=state_help)
    c.add_argument("--grace", type=float, default=10.0, help="seconds to wait before SIGKILL")
    c.set_defaults(func=cmd_cluster_stop_site)
    c = cluster_sub.add_parser("restart-site", help="stop what runs of a site, start it again "
                               "(it joins as a new node; its actors come back on it)")
    c.add_argument("site")
    c.add_argument("--state-dir", default=None, help=state_help)
    c.add_argument("--grace", type=float, default=10.0, help="seconds to wait before SIGKILL")
    c.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the node to be alive")
    c.set_defaults(func=cmd_cluster_restart_site)
    c = cluster_sub.add_parser("token", help="write a new auth token file for cluster.yaml")
    c.add_argument("path", nargs="?", default="~/.edgemeta/cloud_auth_token")
    c.set_defaults(func=cmd_cluster_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from cluster.ray_logs import set_verbose

        set_verbose(True)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, StorageError, DataSetError, ConnectionError) as err:
        print(f"edgemeta: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from cluster.ray_logs import verbose

        if verbose():
            raise
        print(f"edgemeta {args.command}: failed: {_one_line(err)} (traceback: "
              f"{_save_traceback(args.command, err)}; --verbose shows it here)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """An exception as one line: its type, the first line of its message and, for a message
    of several lines (a process's log tail, a nested traceback), its last, where the cause
    usually is."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _save_traceback(command: str, err: BaseException) -> str:
    """Write the traceback to a file of its own (a command's console stays one line)."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"edgemeta-{command}-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(err)))
    return path


if __name__ == "__main__":
    sys.exit(main())
