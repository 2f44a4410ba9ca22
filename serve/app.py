"""The Ray Serve application: a FastAPI ingress over the model store.

Request path of a prediction, and why each step is where it is:

1. :class:`serve.auth.Gate` (ASGI) checks the token and ``Content-Length`` before the body is
   read, and stamps ``x-edgemeta-node`` / ``x-edgemeta-site`` / ``x-edgemeta-replica`` on the
   response so a client can see where it was served.
2. FastAPI + pydantic reject non-numbers, booleans, NaN/inf and malformed JSON (4xx).
3. The store resolves the id (``latest`` → ``RUN@STEP`` by a throttled stat of the pointer),
   then ``@serve.multiplexed`` returns the loaded model from this replica's LRU, keyed by the
   resolved id, so a new checkpoint is a new cache entry and never a restart.
4. The model checks shapes and float32 range (422). A lone request runs at once; requests
   that overlap go through ``@serve.batch``, which groups them (see
   :func:`serve.models.predict_many`). Either way torch runs on one dedicated thread: the event
   loop stays free for health checks and 4xx answers, and one thread because functional calls
   borrow the run's shared module.

``/v1/adapt`` runs the run's own ``algorithm.adapt`` — the code training uses — and writes the
adapted parameters into the run folder under a content-derived id, so any replica can serve it.
"""


import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.topology import ACTOR_RESOURCE_REQUEST, site_resource
from serve.auth import Gate, GateSettings, load_token
from serve.models import (
    BadInput,
    LoadedModel,
    ModelStore,
    StoreError,
    outputs_to_prediction,
    predict_many,
    predict_one,
)
from serve.schemas import (
    AdaptRequest,
    AdaptResponse,
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    ServeSettings,
)

logger = logging.getLogger("ray.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "malformed JSON"), (401, "missing or wrong bearer token"),
        (404, "unknown model id"), (413, "body or batch too large"),
        (422, "wrong shape, type or value"),
        (503, "overloaded: retry after the Retry-After header's seconds")]}


class _GateHolder:
    """Per-process settings of the gate; a replica fills it in when it starts."""

    settings: GateSettings | None = None


_gate = _GateHolder()

api = FastAPI(
    title="edgemeta serving API",
    version="1",
    description="Predict with meta-model versions and adapted models; adapt a meta-model on a "
                "support set with the same inner loop as training.",
)
api.add_middleware(Gate, holder=lambda: _gate.settings)

_UNION_BRANCH = re.compile(r"^(float|int|list\[.*\])$")


def _where(loc: list[Any]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def summarise_validation(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """One readable line from pydantic's errors (a union reports once per branch: keep the
    branch that got furthest into the value, which names the real culprit)."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}"
    best: dict[tuple[Any, ...], tuple[list[Any], str]] = {}
    for e in errors:
        loc = [p for p in e["loc"] if not (isinstance(p, str) and _UNION_BRANCH.match(p))]
        key = tuple(loc[:3])
        if key not in best or len(loc) > len(best[key][0]):
            best[key] = (loc, e["msg"])
    items = [f"{_where(loc)}: {msg}" for loc, msg in best.values()]
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    return 422, "invalid request: " + "; ".join(items[:5]) + more


@api.exception_handler(RequestValidationError)
async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    status, detail = summarise_validation(list(exc.errors()))
    return JSONResponse({"detail": detail}, status_code=status)


@api.exception_handler(StoreError)
async def _on_store_error(_: Request, exc: StoreError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"[:500]},
                        status_code=500)


@serve.deployment(name="EdgeMeta", graceful_shutdown_timeout_s=5,
                  graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class EdgeMetaServer:
    """One replica: a model store, a model LRU, and a torch thread."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import ray

        self.settings = s = ServeSettings.model_validate(settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.store = ModelStore(s.run_dirs, poll_s=s.latest_poll_ms / 1e3, cache_size=0)
        for run in self.store.runs.values():
            _ = run.algorithm  # build now: a broken config fails the deploy, not a request
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        _gate.settings = GateSettings(
            load_token(s.token_file), s.max_body_bytes,
            {"x-edgemeta-node": self.node_id, "x-edgemeta-site": s.site or "-",
             "x-edgemeta-replica": self.replica})
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemeta-torch")
        self._inflight = 0

        async def load(model_id: str) -> LoadedModel:
            ref = self.store.resolve(model_id)
            return await asyncio.to_thread(self.store.load, ref)

        self._models = serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)(
            load)
        # Serve wants max_ongoing_requests >= batch size: a batch can't exceed what is admitted.
        self._predict_batch.set_max_batch_size(min(s.batch_max_size, s.max_ongoing_requests))
        self._predict_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    async def _in_torch(self, fn: Any, *args: Any) -> Any:
        if not self.settings.compute_in_thread:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    async def _model(self, model_id: str) -> LoadedModel:
        ref = self.store.resolve(model_id)  # 404 before the LRU can evict anything for it
        return await self._models(ref.id)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _predict_batch(self, items: list[tuple[LoadedModel, torch.Tensor]]
                             ) -> list[torch.Tensor | BaseException]:
        def run() -> list[torch.Tensor | BaseException]:
            try:
                return list(predict_many(items, self.settings.batch_max_images))
            except Exception:  # one bad group must not fail the others: retry one by one
                out: list[torch.Tensor | BaseException] = []
                for model, x in items:
                    try:
                        out.append(predict_one(model, x))
                    except Exception as err:
                        out.append(err)
                return out

        return await self._in_torch(run)

    @staticmethod
    def _check_predictable(model: LoadedModel) -> None:
        if model.spec.algorithm == "protonet" and model.ref.kind == "meta":
            raise BadInput("a ProtoNet meta-model is an embedding with no classes: adapt it on "
                           "a support set (POST /v1/adapt) and predict with the id it returns")

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> dict[str, Any]:
        """Liveness; open without a token (load balancers call it)."""
        return {"status": "ok", "node_id": self.node_id, "site": self.settings.site,
                "replica": self.replica}

    @api.get("/v1/models", response_model=ModelsResponse, responses=_ERRORS)
    async def models(self) -> dict[str, Any]:
        """Meta-model versions (with step), per-site models, and adapted models."""
        return await asyncio.to_thread(self.store.listing, self.settings.models_list_limit)

    @api.post("/v1/models/{model_id}/predict", response_model=PredictResponse,
              response_model_exclude_none=True, responses=_ERRORS)
    async def predict(self, model_id: str, body: PredictRequest) -> dict[str, Any]:
        """Predict a batch of inputs with a meta-model version or an adapted model."""
        model = await self._model(model_id)
        self._check_predictable(model)
        x = model.spec.read(body.inputs, body.inputs_b64, self.settings.max_inputs)
        # Batch only when there is company: a lone request skips the batching machinery
        # (queue, events, metrics: ~ms here), requests that overlap are grouped.
        self._inflight += 1
        try:
            if self._inflight == 1 or self.settings.batch_max_size == 1:
                out = await self._in_torch(predict_one, model, x)
            else:
                out = await self._predict_batch((model, x))
        finally:
            self._inflight -= 1
        if isinstance(out, BaseException):
            raise out
        ref = model.ref
        return {"model_id": model_id, "resolved_model_id": ref.id, "run": ref.run,
                "step": ref.step, **outputs_to_prediction(model.spec.task_type, out)}

    @api.post("/v1/adapt", response_model=AdaptResponse, response_model_exclude_none=True,
              responses=_ERRORS)
    async def adapt(self, body: AdaptRequest) -> dict[str, Any]:
        """Adapt a model on a support set; optionally predict query inputs with the result."""
        s = self.settings
        if body.steps is not None and body.steps > s.max_adapt_steps:
            raise BadInput(f"steps: {body.steps} exceeds this server's limit of "
                           f"{s.max_adapt_steps}")
        base = await self._model(body.base_model)
        sx = base.spec.read(body.support_inputs, body.support_inputs_b64, s.max_support,
                            "support_inputs")
        sy = base.spec.targets(body.support_labels, int(sx.shape[0]))
        qx = (base.spec.read(body.query_inputs, body.query_inputs_b64, s.max_inputs,
                             "query_inputs")
              if body.query_inputs or body.query_inputs_b64 else None)

        def run() -> dict[str, Any]:
            result = self.store.adapt(base, sx, sy, body.steps)
            out: dict[str, Any] = {"model_id": result.ref.id, "base_model": base.ref.id,
                                   "steps": result.steps, "created": result.created,
                                   "adapt_ms": round(result.adapt_ms, 3), "predictions": None}
            if qx is not None:
                with torch.no_grad():
                    logits = base.algorithm.predict(result.params, qx)
                out["predictions"] = outputs_to_prediction(base.spec.task_type, logits)
            return out

        return await self._in_torch(run)


def ray_actor_options(settings: ServeSettings) -> dict[str, Any]:
    """CPUs per replica, and the site's custom resource when replicas belong near an edge."""
    options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.site:
        options["resources"] = {site_resource(settings.site): ACTOR_RESOURCE_REQUEST}
    return options


def build_app(settings: ServeSettings | dict[str, Any]) -> serve.Application:
    """The bound application for ``serve.run`` (deployment options from the settings)."""
    s = ServeSettings.model_validate(settings) if isinstance(settings, dict) else settings
    name = f"EdgeMeta-{s.site}" if s.site else "EdgeMeta"
    deployment = EdgeMetaServer.options(
        name=name,
        num_replicas=s.num_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": s.backpressure_status,
                             "retry_after_s": s.retry_after_s},
        ray_actor_options=ray_actor_options(s),
        logging_config={"enable_access_log": s.access_log},
    )
    return deployment.bind(s.model_dump())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path: serve.app:app_builder``)."""
    return build_app(dict(args))
