"""A small Python client for the serving API (httpx, one keep-alive connection pool).

Tensors and numpy arrays are turned into nested lists here, so callers can pass what the
data pipeline gives (``[N, 1, 28, 28]`` images lose their channel axis on the way). Errors
raise :class:`ServeError` with the server's status and message.

Retries. Every call of this API is safe to repeat (predict reads; ``/v1/adapt`` is
content-addressed: the same support set gives the same model id), so the client retries, a
few times, what a healthy server answers transiently: 503/429 from Serve's backpressure, after
the ``Retry-After`` seconds it names; a keep-alive connection that the ingress closed
(an HAProxy reload does that) or reset, at once; and a 500/502/504 that the application did not
write (no ``x-edgemeta-replica`` header: the proxy in front of it answered for a replica that
died mid-request, which Serve then restarts), after a short pause. A 500 from the application
itself carries that header and is not retried: repeating a bug does not fix it.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np

RETRY_STATUSES = frozenset({429, 503})
#: Answers of the proxy in front of the application, retried when the application wrote none.
GATEWAY_STATUSES = frozenset({500, 502, 504})
#: Set on every answer the application writes (serve.auth.Gate, serve.host.ModelHost).
APP_HEADER = "x-edgemeta-replica"
GATEWAY_RETRY_S = 0.5


def transient(response: httpx.Response) -> bool:
    """Whether an answer is worth the same request again: overload, or a proxy's error for a
    replica that went away (the application's own errors carry :data:`APP_HEADER`)."""
    status = response.status_code
    return status in RETRY_STATUSES or (status in GATEWAY_STATUSES
                                        and APP_HEADER not in response.headers)


class ServeError(RuntimeError):
    def __init__(self, status: int, detail: Any, headers: httpx.Headers) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = headers


def to_inputs(x: Any) -> list[Any]:
    """Nested lists from a tensor, array or list; drops a ``[N, 1, H, W]`` channel axis."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if hasattr(x, "tolist"):
        if getattr(x, "ndim", 0) == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if getattr(x, "ndim", 0) == 2 and x.shape[1] == 1:
            x = x[:, 0]
        return x.tolist()
    return list(x)


def retry_after_s(headers: httpx.Headers, default: float = 1.0) -> float:
    """The ``Retry-After`` header's seconds (the HTTP-date form, rare here, gets ``default``)."""
    try:
        return max(0.0, float(headers.get("retry-after", default)))
    except ValueError:
        return default


def to_packed(x: Any) -> str:
    """``*_b64`` form of a batch: little-endian float32, row-major, base64 (see ``to_inputs``
    for the shapes accepted)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


class EdgeMetaClient:
    """``EdgeMetaClient("http://127.0.0.1:8000", token=...).predict("latest", images)``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 3,
                 max_retry_wait_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep, packed: bool = False) -> None:
        """``retries``: extra attempts after an overload answer or a dropped connection (0:
        none); ``max_retry_wait_s`` caps one ``Retry-After`` wait. ``packed``: send inputs
        as base64 float32 (``*_b64`` fields), which the server decodes far faster than JSON
        numbers; the answers are the same."""
        if retries < 0 or max_retry_wait_s < 0:
            raise ValueError("retries and max_retry_wait_s must be >= 0")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout, transport=transport)
        self.retries, self.max_retry_wait_s, self._sleep = retries, max_retry_wait_s, sleep
        self.packed = packed

    def _inputs(self, field: str, x: Any) -> dict[str, Any]:
        return {f"{field}_b64": to_packed(x)} if self.packed else {field: to_inputs(x)}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on 503/429 (after ``Retry-After``), on a closed or reset
        connection, and on a proxy's 5xx (see the module's docstring)."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                if attempt >= self.retries:
                    raise
            else:
                if not transient(response) or attempt >= self.retries:
                    return response
                default = 1.0 if response.status_code in RETRY_STATUSES else GATEWAY_RETRY_S
                self._sleep(min(retry_after_s(response.headers, default),
                                self.max_retry_wait_s))
            attempt += 1

    def __enter__(self) -> EdgeMetaClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServeError(response.status_code, detail, response.headers)
        return response.json()

    def predict(self, model_id: str, inputs: Any) -> dict[str, Any]:
        """Class probabilities + labels, or regression values, for a batch of inputs.

        No ``serve_multiplexed_model_id`` header: the id in the path may be a moving name
        (``latest``), and the model replicas are keyed by canonical ids, which only the server
        knows; its ingress resolves the id and routes to a replica holding that model.
        """
        r = self._send("POST", f"/v1/models/{model_id}/predict",
                       json=self._inputs("inputs", inputs))
        return self._json(r)

    def adapt(self, support_inputs: Any, support_labels: Sequence[Any] | Any,
              base_model: str = "latest", steps: int | None = None,
              query_inputs: Any | None = None) -> dict[str, Any]:
        """Adapt ``base_model`` on a support set; the reply's ``model_id`` names the result."""
        labels = support_labels
        if hasattr(labels, "detach"):
            labels = labels.detach().cpu()
        labels = labels.reshape(-1).tolist() if hasattr(labels, "reshape") else list(labels)
        body: dict[str, Any] = {"base_model": base_model,
                                **self._inputs("support_inputs", support_inputs),
                                "support_labels": labels}
        if steps is not None:
            body["steps"] = steps
        if query_inputs is not None:
            body.update(self._inputs("query_inputs", query_inputs))
        return self._json(self._send("POST", "/v1/adapt", json=body))

    def models(self) -> dict[str, Any]:
        return self._json(self._send("GET", "/v1/models"))

    def health(self) -> dict[str, Any]:
        return self._json(self._send("GET", "/healthz"))
