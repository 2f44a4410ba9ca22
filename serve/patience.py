"""Serve's patience with its own processes on a busy machine, and a start that waits for HTTP.

Why. On a machine whose cores are all busy (training beside serving, the product's normal
state), a new Ray worker takes many seconds to import Ray and Serve. Serve's controller gives a
new proxy (Serve's own, or the HAProxy manager and its fallback proxy) 5 s to report ready
(``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S``), then kills it and starts another; the driver's
``serve.start`` waits on the first proxy and dies with ``ActorDiedError`` (measured: 2 of 2
starts beside two busy loops failed). The settings below give Serve's controller, proxies and
HAProxy time that a loaded machine needs, while a dead process is still found (a proxy that
stops answering is declared unhealthy after 3 failed checks, at most ~90 s).

Where they must be set. Serve reads them when its controller's and proxies' Python modules are
imported, i.e. in Ray worker processes: in the environment of the Ray cluster when it starts
(:func:`serve.launch.ingress_env`, which a cluster this project starts inherits) and in the
controller's ``runtime_env`` (``serve.start(controller_options=...)``; its proxies inherit it),
which also covers a cluster started elsewhere. A value already in the caller's environment wins.

And if a proxy is still replaced, :func:`start_serve` connects to the controller, which goes on
restarting it (with a longer ready check each time); :func:`deploy` does not fail a deployment
because a proxy is still starting; and :func:`wait_answering` waits until the ingress actually
answers over HTTP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import httpx

from cluster.console import Printer

#: Serve's defaults are 5 s, 10 s and 30 s; on two cores shared with training a new Python
#: worker needs 10-60 s to be ready.
PATIENT_DEFAULTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S": "90",
}


def patient_env() -> dict[str, str]:
    """Serve's start-up and health-check timeouts for a busy machine (the caller's environment
    overrides each)."""
    return {k: os.environ.get(k, v) for k, v in PATIENT_DEFAULTS.items()}


def start_serve(http_options: Mapping[str, Any], proxy_location: str, echo: Printer,
                attempts: int = 3, env_vars: Mapping[str, str] | None = None) -> None:
    """``serve.start`` that survives a proxy replaced while it started.

    ``serve.start`` waits on the proxies it created; when the controller replaces a slow one,
    that wait fails although Serve is still starting. Calling ``serve.start`` again connects to
    the running controller (which keeps restarting the proxy); :func:`wait_answering` then
    waits for the ingress itself. ``env_vars`` (the ingress switches) join the timeouts in
    the controller's runtime env, which its proxies inherit."""
    import ray
    from ray import serve

    for attempt in range(1, attempts + 1):
        try:
            serve.start(http_options=dict(http_options), proxy_location=proxy_location,
                        controller_options={"runtime_env": {
                            "env_vars": {**patient_env(), **dict(env_vars or {})}}})
            return
        except (ray.exceptions.ActorDiedError, TimeoutError) as err:
            if attempt == attempts:
                raise
            echo(f"serve: the HTTP proxy was slow to start ({type(err).__name__}; the machine "
                 f"may be busy); waiting for Serve to restart it (try {attempt + 1} of "
                 f"{attempts})")


def deploy(app: Any, name: str, route_prefix: str, echo: Printer) -> None:
    """``serve.run`` (not blocking) that goes on when only the proxies are late.

    ``serve.run`` deploys, then waits up to 60 s for every proxy to serve and raises
    ``TimeoutError`` if one is still starting: the application is deployed by then, and
    :func:`wait_answering` waits for the ingress."""
    from ray import serve

    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except TimeoutError as err:
        if "Proxies not available" not in str(err):
            raise
        echo("serve: the HTTP proxy is still starting (the machine may be busy); waiting "
             "for it to answer")


def wait_answering(url: str, timeout_s: float, path: str = "/healthz") -> None:
    """Wait until ``url + path`` answers 200 (the ingress and a replica are up)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                r = http.get(url + path)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as err:
                last = type(err).__name__
            time.sleep(0.25)
    raise TimeoutError(f"{url}{path} did not answer after {timeout_s:.0f} s (last: {last})")
