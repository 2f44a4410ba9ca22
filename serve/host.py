"""Model hosting: holding models, batching predictions, adapting.

:class:`ModelHost` runs in one of two places. With one replica it lives inside the ingress's
own process: nothing to route, no extra hop, an LRU of its own. With several it is the
``ModelReplicas`` deployment behind the ingress (:mod:`serve.app`), its cache is
``@serve.multiplexed``, and Serve routes each request to a replica that holds the model.

Either way its callers pass ids already resolved to canonical ones (``RUN@STEP``,
``RUN@site-NAME``, ``RUN@ad-HEX``), so the loader maps an id to its file
(:meth:`~serve.store.ModelStore.locate`) and never resolves one: what a replica reports as
loaded, what the router matches and what the cache is keyed by are the same string.

Torch runs on one dedicated thread per replica: the event loop stays free for other requests,
and one thread because functional calls borrow the run's shared module. A lone request runs at
once; requests that overlap go through ``@serve.batch`` (which Serve splits by model id) and
:func:`serve.batching.predict_many`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from torch import Tensor

from serve.batching import predict_many, predict_one
from serve.schemas import ServeSettings
from serve.signature import outputs_to_prediction
from serve.store import LoadedModel, LRUCache, ModelStore

#: Response header: how many models the replica that answered has loaded since it started.
LOADS_HEADER = "x-edgemeta-model-loads"


@dataclass(frozen=True)
class Reply:
    """A model replica's answer: the body, and where it was computed (as response headers)."""

    body: dict[str, Any]
    served_by: dict[str, str]


Loader = Callable[[str], Awaitable[LoadedModel]]


def lru_loader(load: Loader, capacity: int) -> Loader:
    """``load`` behind an LRU of ``capacity`` models, each loaded once even when requests for
    it overlap: the cache of a host that is not a Serve deployment of its own."""
    cache: LRUCache[str, LoadedModel] = LRUCache(capacity)
    lock = asyncio.Lock()

    async def get(model_id: str) -> LoadedModel:
        model = cache.get(model_id)
        if model is None:
            async with lock:
                model = cache.get(model_id)
                if model is None:
                    model = await load(model_id)
                    cache.put(model_id, model)
        return model

    return get


class ModelHost:
    """The models of one replica: a store, a model LRU keyed by canonical ids, a torch thread.

    ``multiplexed``: the LRU is ``@serve.multiplexed`` (a deployment of its own, whose replicas
    report what they hold to Serve's router) or a plain one (inside the ingress).
    """

    def __init__(self, settings: dict[str, Any], multiplexed: bool = True) -> None:
        import ray

        self.settings = s = ServeSettings.model_validate(settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.store = ModelStore(s.run_dirs, cache_size=0, quota=s.adapted_quota())
        for run in self.store.runs.values():
            _ = run.algorithm  # build now: a broken config fails the deploy, not a request
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.identity = {"x-edgemeta-node": self.node_id, "x-edgemeta-site": s.site or "-",
                         "x-edgemeta-replica": self.replica}
        self.loads = 0
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemeta-torch")
        self._inflight = 0

        async def load(model_id: str) -> LoadedModel:
            ref = self.store.locate(model_id)  # canonical: the ingress resolved it
            model = await asyncio.to_thread(self.store.load, ref)
            self.loads += 1
            return model

        self._models: Loader = (
            serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)(load)
            if multiplexed else lru_loader(load, s.max_models_per_replica))
        # Serve wants max_ongoing_requests >= batch size: a batch can't exceed what is admitted.
        self._predict_batch.set_max_batch_size(min(s.batch_max_size, s.max_ongoing_requests))
        self._predict_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def _reply(self, body: dict[str, Any]) -> Reply:
        return Reply(body, {**self.identity, LOADS_HEADER: str(self.loads)})

    async def _in_torch(self, fn: Any, *args: Any) -> Any:
        if not self.settings.compute_in_thread:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _predict_batch(self, items: list[tuple[LoadedModel, Tensor]]
                             ) -> list[Tensor | BaseException]:
        def run() -> list[Tensor | BaseException]:
            try:
                return list(predict_many(items, self.settings.batch_max_images))
            except Exception:  # one bad group must not fail the others: retry one by one
                out: list[Tensor | BaseException] = []
                for model, x in items:
                    try:
                        out.append(predict_one(model, x))
                    except Exception as err:
                        out.append(err)
                return out

        return await self._in_torch(run)

    async def health(self) -> Reply:
        """This replica's identity: the ingress's ``/healthz`` answers with it."""
        return self._reply({"status": "ok", "node_id": self.node_id, "site": self.settings.site,
                            "replica": self.replica})

    async def predict(self, model_id: str, x: Tensor) -> Reply:
        """Predictions of the model with canonical id ``model_id`` for the batch ``x``."""
        model = await self._models(model_id)
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
        return self._reply(outputs_to_prediction(model.signature.task_type, out))

    async def adapt(self, base_id: str, support_x: Tensor, support_y: Tensor,
                    steps: int | None, query_x: Tensor | None) -> Reply:
        """Adapt the model ``base_id`` (canonical) on a support set, with the run's own inner
        loop; the result is written to the run folder, where any replica can load it."""
        base = await self._models(base_id)

        def run() -> dict[str, Any]:
            result = self.store.adapt(base, support_x, support_y, steps)
            out: dict[str, Any] = {"model_id": result.ref.id, "base_model": base.ref.id,
                                   "steps": result.steps, "created": result.created,
                                   "adapt_ms": round(result.adapt_ms, 3), "predictions": None}
            if query_x is not None:
                with torch.no_grad():
                    logits = base.algorithm.predict(result.params, query_x)
                out["predictions"] = outputs_to_prediction(base.signature.task_type, logits)
            return out

        return self._reply(await self._in_torch(run))
