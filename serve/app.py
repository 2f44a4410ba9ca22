"""The Ray Serve application: an HTTP ingress and the models, in one or two deployments.

* :class:`serve.ingress.Ingress` (FastAPI) checks requests, resolves model ids once and decodes
  inputs, then hands them to the models (:class:`serve.host.ModelHost`).
* One replica (or ``route_by_model: false``): each ingress replica holds its models itself.
  HAProxy balances requests over the replicas by connection count; no extra hop.
* Several replicas: the models are ``ModelReplicas``, a deployment of their own behind the
  ingress, and each request is routed by its canonical model id to a replica that holds the
  model (Serve's model-aware routing). ``num_replicas``, ``num_cpus`` and ``site`` place the
  model replicas; the ingress, which holds no model, is light and sits wherever Serve puts it.

``/v1/adapt`` runs the run's own ``algorithm.adapt`` — the code training uses — and writes the
adapted parameters into the run folder under a content-derived id, so any replica can serve it.
"""

from __future__ import annotations

import math
from typing import Any

from ray import serve

from cluster.topology import ACTOR_RESOURCE_REQUEST, site_resource
from serve.host import ModelHost
from serve.ingress import Ingress
from serve.schemas import ServeSettings

ModelReplicas = serve.deployment(name="EdgeMetaModels", graceful_shutdown_timeout_s=5,
                                 graceful_shutdown_wait_loop_s=0.5)(ModelHost)


def ray_actor_options(settings: ServeSettings, env: dict[str, str] | None = None,
                      num_cpus: float | None = None) -> dict[str, Any]:
    """CPUs per replica, the site's custom resource when they belong near an edge, and the
    ingress's environment (``env``: Serve reads its HAProxy and direct-ingress switches in
    each replica's own process, which on a running cluster the driver's environment never
    reaches)."""
    options: dict[str, Any] = {"num_cpus": settings.num_cpus if num_cpus is None else num_cpus}
    if settings.site:
        options["resources"] = {site_resource(settings.site): ACTOR_RESOURCE_REQUEST}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return options


def routes_by_model(settings: ServeSettings) -> bool:
    """Whether the models are a deployment of their own, with requests routed by model id."""
    return settings.num_replicas > 1 and settings.route_by_model


def build_app(settings: ServeSettings | dict[str, Any],
              env: dict[str, str] | None = None) -> serve.Application:
    """The bound application for ``serve.run`` (deployment options from the settings).

    Admission and backpressure (503 + ``Retry-After``) happen at the ingress. In front of model
    replicas it admits as many requests as they hold (``max_ongoing_requests`` each), so a
    request is refused before it is decoded rather than queued behind the replicas. With a
    ``site`` the ingress replicas are pinned to the site's node as well: each runs its own
    HTTP server there under the HAProxy ingress (Serve's direct ingress), the site's own way
    in (:func:`serve.launch.site_entry_points`).
    """
    s = ServeSettings.model_validate(settings) if isinstance(settings, dict) else settings
    name = f"EdgeMeta-{s.site}" if s.site else "EdgeMeta"
    logging_config = {"enable_access_log": s.access_log}
    admission: dict[str, Any] = {
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": s.backpressure_status,
                                "retry_after_s": s.retry_after_s},
        "logging_config": logging_config}
    settings_dict = s.model_dump()
    if not routes_by_model(s):
        return Ingress.options(
            name=name, num_replicas=s.num_replicas, max_ongoing_requests=s.max_ongoing_requests,
            ray_actor_options=ray_actor_options(s, env), **admission).bind(settings_dict)
    models = ModelReplicas.options(
        name=f"{name}-models", num_replicas=s.num_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=-1,  # bounded by what the ingress admits
        ray_actor_options=ray_actor_options(s, env), logging_config=logging_config)
    ingress = Ingress.options(
        name=name, num_replicas=s.ingress_replicas,
        max_ongoing_requests=math.ceil(s.max_ongoing_requests * s.num_replicas
                                       / s.ingress_replicas),
        ray_actor_options=ray_actor_options(s, env, s.ingress_num_cpus), **admission)
    return ingress.bind(settings_dict, models.bind(settings_dict))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path: serve.app:app_builder``)."""
    return build_app(dict(args))
