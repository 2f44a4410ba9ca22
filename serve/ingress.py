"""The HTTP side of the application: a FastAPI ingress that checks, resolves and forwards.

Request path of a prediction, and why each step is where it is:

1. :class:`serve.auth.Gate` (ASGI) checks the token and ``Content-Length`` before the body is
   read, and stamps where-served headers (``x-edgemeta-node`` / ``-site`` / ``-replica``) on
   answers that no model replica computed.
2. FastAPI + pydantic reject non-numbers, booleans, NaN/inf and malformed JSON (4xx).
3. The id is resolved here, once (``latest`` → ``RUN@STEP`` by a throttled stat of the pointer),
   and the inputs are decoded and checked against the run's signature (404/413/422), before
   any model replica is involved.
4. The models (:class:`serve.host.ModelHost`) answer. With one replica they live in this
   process. With several they are a deployment of their own, called through a handle whose
   ``multiplexed_model_id`` is the canonical id: Serve's router prefers a replica that reports
   that id loaded (else one holding the fewest models), and the replica's cache is keyed by the
   same string, so a request for ``latest`` lands where ``RUN@STEP`` already is.

Why a deployment behind the ingress for routing: with the HAProxy ingress, HTTP requests go
straight from HAProxy to the ingress replicas, balanced by connection count; nothing reads
``serve_multiplexed_model_id`` there, so a multiplexed ingress can never route by model (Ray
issue 61227; later Ray versions refuse ``@serve.multiplexed`` on an ingress deployment).
Model-aware routing lives in a ``DeploymentHandle``'s router, between deployments. That hop
cost ~5 ms a request on the 2-core test host (Serve's handle, not the model), which is why one
replica keeps its models in the ingress, and ``route_by_model: false`` does so for several.

``/v1/adapt`` is balanced by load, not routed by model: its inner loop costs far more than
loading the base model, which every replica soon holds anyway.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
# (through Serve's ingress wrapper), and string annotations leave `Response` unrecognised.
import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Response
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve.auth import Gate, GateSettings, load_token
from serve.errors import ERROR_RESPONSES, BadInput, RequestError, add_error_handlers
from serve.host import ModelHost, Reply
from serve.schemas import (
    AdaptRequest,
    AdaptResponse,
    HealthResponse,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    ServeSettings,
    document_input_shapes,
)
from serve.store import ModelRef, ModelStore


class _GateHolder:
    """Per-process settings of the gate; an ingress replica fills it in when it starts."""

    settings: GateSettings | None = None


_gate = _GateHolder()

api = FastAPI(
    title="edgemeta serving API",
    version="1",
    description="Predict with meta-model versions and adapted models; adapt a meta-model on a "
                "support set with the same inner loop as training.",
)
api.add_middleware(Gate, holder=lambda: _gate.settings)
add_error_handlers(api, logging.getLogger("ray.serve"))


async def remote_reply(call: DeploymentResponse) -> Reply:
    """A model replica's reply.

    A client error raised in the replica (a model file deleted since it was resolved, say)
    arrives wrapped in Ray's ``RayTaskError``: unwrap it, so it keeps its status and message.
    """
    try:
        return await call
    except RayTaskError as err:
        if isinstance(err.cause, RequestError):
            raise err.cause from None
        raise


@serve.deployment(name="EdgeMeta", graceful_shutdown_timeout_s=5,
                  graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class Ingress:
    """One ingress replica: a store to resolve ids and read signatures, and the models: its
    own (``model_replicas`` None) or a handle to the model replicas."""

    def __init__(self, settings: dict[str, Any],
                 model_replicas: DeploymentHandle | None = None) -> None:
        import ray

        self.settings = s = ServeSettings.model_validate(settings)
        self.store = ModelStore(s.run_dirs, poll_s=s.latest_poll_ms / 1e3, cache_size=0,
                                quota=s.adapted_quota())
        self.replicas = model_replicas
        self.local = ModelHost(settings, multiplexed=False) if model_replicas is None else None
        shapes = {name: list(run.signature.input_shape) for name, run in self.store.runs.items()}
        api.openapi_schema = document_input_shapes(api.openapi(), shapes)  # FastAPI's cache
        _gate.settings = GateSettings(
            load_token(s.token_file), s.max_body_bytes,
            {"x-edgemeta-node": ray.get_runtime_context().get_node_id(),
             "x-edgemeta-site": s.site or "-",
             "x-edgemeta-replica": serve.get_replica_context().replica_id.unique_id})

    async def _ask(self, response: Response, route: ModelRef | None, method: str,
                   *args: Any) -> dict[str, Any]:
        """``method`` of the models, in this process or on a model replica (one that holds
        ``route``, by its canonical id, if given); where it was served goes on ``response``."""
        if self.local is not None:
            reply: Reply = await getattr(self.local, method)(*args)
        else:
            assert self.replicas is not None
            handle = (self.replicas if route is None
                      else self.replicas.options(multiplexed_model_id=route.id))
            reply = await remote_reply(getattr(handle, method).remote(*args))
        response.headers.update(reply.served_by)
        return reply.body

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self, response: Response) -> dict[str, Any]:
        """Liveness of the path to the models; open without a token (load balancers call it).
        The body and headers name the replica that holds the models and answered."""
        return await self._ask(response, None, "health")

    @api.get("/v1/models", response_model=ModelsResponse, responses=ERROR_RESPONSES)
    async def models(self) -> dict[str, Any]:
        """Meta-model versions (with step), per-site models, and adapted models."""
        return await asyncio.to_thread(self.store.listing, self.settings.models_list_limit)

    @api.post("/v1/models/{model_id}/predict", response_model=PredictResponse,
              response_model_exclude_none=True, responses=ERROR_RESPONSES)
    async def predict(self, model_id: str, body: PredictRequest,
                      response: Response) -> dict[str, Any]:
        """Predict a batch of inputs with a meta-model version or an adapted model."""
        ref = self.store.resolve(model_id)
        signature = self.store.run_of(ref).signature
        if signature.ways is None and signature.task_type == "classification" \
                and ref.kind == "meta":
            raise BadInput(f"a {signature.algorithm} meta-model is an embedding with no "
                           "classes: adapt it on a support set (POST /v1/adapt) and predict "
                           "with the id it returns")
        x = signature.read(body.inputs, body.inputs_b64, self.settings.max_inputs)
        out = await self._ask(response, ref, "predict", ref.id, x)
        return {"model_id": model_id, "resolved_model_id": ref.id, "run": ref.run,
                "step": ref.step, **out}

    @api.post("/v1/adapt", response_model=AdaptResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES)
    async def adapt(self, body: AdaptRequest, response: Response) -> dict[str, Any]:
        """Adapt a model on a support set; optionally predict query inputs with the result."""
        s = self.settings
        if body.steps is not None and body.steps > s.max_adapt_steps:
            raise BadInput(f"steps: {body.steps} exceeds this server's limit of "
                           f"{s.max_adapt_steps}")
        base = self.store.resolve(body.base_model)
        signature = self.store.run_of(base).signature
        sx = signature.read(body.support_inputs, body.support_inputs_b64, s.max_support,
                            "support_inputs")
        sy = signature.targets(body.support_labels, int(sx.shape[0]))
        qx = (signature.read(body.query_inputs, body.query_inputs_b64, s.max_inputs,
                             "query_inputs")
              if body.query_inputs or body.query_inputs_b64 else None)
        return await self._ask(response, None, "adapt", base.id, sx, sy, body.steps, qx)
