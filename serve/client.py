"""A small Python client for the serving API (httpx, one keep-alive connection pool).

Tensors and numpy arrays are turned into nested lists here, so callers can pass what the
data pipeline gives (``[N, 1, 28, 28]`` images lose their channel axis on the way). Errors
raise :class:`ServeError` with the server's status and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

MULTIPLEX_HEADER = "serve_multiplexed_model_id"


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


class EdgeMetaClient:
    """``EdgeMetaClient("http://127.0.0.1:8000", token=...).predict("latest", images)``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout, transport=transport)

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

        The multiplexing header lets Serve's router prefer a replica that has the model loaded.
        """
        r = self._http.post(f"/v1/models/{model_id}/predict", json={"inputs": to_inputs(inputs)},
                            headers={MULTIPLEX_HEADER: model_id})
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
                                "support_inputs": to_inputs(support_inputs),
                                "support_labels": labels}
        if steps is not None:
            body["steps"] = steps
        if query_inputs is not None:
            body["query_inputs"] = to_inputs(query_inputs)
        return self._json(self._http.post("/v1/adapt", json=body))

    def models(self) -> dict[str, Any]:
        return self._json(self._http.get("/v1/models"))

    def health(self) -> dict[str, Any]:
        return self._json(self._http.get("/healthz"))
