"""The Python client's retry rule, on a scripted transport (the server side of overload, 503 with
``Retry-After``, is tested over real HTTP in test_serve_bad_input.py)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from serve.client import EdgeMetaClient, ServeError, retry_after_s, to_packed

OK = {"labels": [1], "model_id": "latest"}


def scripted(*answers: Callable[[httpx.Request], httpx.Response]
             ) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that answers the n-th request with ``answers[n]`` and records requests."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1](request)

    return httpx.MockTransport(handle), seen


def status(code: int, retry_after: str | None = None) -> Callable[[httpx.Request], httpx.Response]:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = OK if code == 200 else {"detail": f"status {code}"}
    return lambda _: httpx.Response(code, json=body, headers=headers)


def dropped(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                    request=request)


def client(transport: httpx.MockTransport, waits: list[float], **kwargs: object
           ) -> EdgeMetaClient:
    return EdgeMetaClient("http://edge", transport=transport, sleep=waits.append,
                          **kwargs)  # type: ignore[arg-type]


def test_overload_is_retried_after_the_servers_retry_after() -> None:
    transport, seen = scripted(status(503, "2"), status(429, "0.5"), status(200))
    waits: list[float] = []
    assert client(transport, waits).predict("latest", [[0.0]]) == OK
    assert waits == [2.0, 0.5] and len(seen) == 3
    assert all(r.content == seen[0].content for r in seen)  # the same request each time


def test_retries_run_out_into_the_servers_error() -> None:
    transport, seen = scripted(*[status(503, "100")] * 3)
    waits: list[float] = []
    with pytest.raises(ServeError) as err:
        client(transport, waits, retries=2, max_retry_wait_s=4.0).models()
    assert err.value.status == 503 and err.value.headers["retry-after"] == "100"
    assert waits == [4.0, 4.0] and len(seen) == 3  # each wait capped


def test_a_dropped_keep_alive_connection_is_retried_at_once() -> None:
    transport, seen = scripted(dropped, status(200))
    waits: list[float] = []
    assert client(transport, waits).adapt([[0.0]], [0])["model_id"] == "latest"
    assert waits == [] and len(seen) == 2


def test_client_errors_and_retries_zero_are_not_retried() -> None:
    transport, seen = scripted(status(422), status(200))
    with pytest.raises(ServeError) as err:
        client(transport, []).predict("latest", [[0.0]])
    assert err.value.status == 422 and len(seen) == 1
    transport, seen = scripted(status(503, "1"), status(200))
    with pytest.raises(ServeError):
        client(transport, [], retries=0).health()
    assert len(seen) == 1
    transport, _ = scripted(dropped)
    with pytest.raises(httpx.RemoteProtocolError):
        client(transport, [], retries=0).health()


def test_a_proxys_5xx_is_retried_but_not_the_applications_own() -> None:
    """A 500/502/504 without the application's where-served header came from the proxy (a
    replica died mid-request): retried after a short pause. The application's own 500 carries
    the header and is returned at once."""
    from serve.client import GATEWAY_RETRY_S

    transport, seen = scripted(status(500), status(502), status(504), status(200))
    waits: list[float] = []
    assert client(transport, waits).predict("latest", [[0.0]]) == OK
    assert waits == [GATEWAY_RETRY_S] * 3 and len(seen) == 4

    def app_500(_: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"detail": "internal error: KeyError"},
                              headers={"x-edgemeta-replica": "abc"})

    transport, seen = scripted(app_500, status(200))
    with pytest.raises(ServeError) as err:
        client(transport, []).predict("latest", [[0.0]])
    assert err.value.status == 500 and len(seen) == 1


def reset(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadError("Connection reset by peer", request=request)


def test_a_connection_reset_mid_answer_is_retried() -> None:
    transport, seen = scripted(reset, status(200))
    assert client(transport, []).predict("latest", [[0.0]]) == OK and len(seen) == 2


@pytest.mark.parametrize(("value", "seconds"), [
    ("2", 2.0), ("0.5", 0.5), ("-3", 0.0), (None, 1.0),
    ("Wed, 21 Oct 2026 07:28:00 GMT", 1.0),  # the HTTP-date form: the default
])
def test_retry_after_header(value: str | None, seconds: float) -> None:
    headers = httpx.Headers({"retry-after": value} if value is not None else {})
    assert retry_after_s(headers) == seconds


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        EdgeMetaClient("http://edge", retries=-1)


def test_packed_inputs_are_little_endian_float32_without_the_channel_axis() -> None:
    import base64

    import numpy as np
    import torch

    x = torch.rand(3, 1, 28, 28)
    raw = base64.b64decode(to_packed(x[:, 0]))
    assert len(raw) == 3 * 28 * 28 * 4
    assert np.array_equal(np.frombuffer(raw, dtype="<f4").reshape(3, 28, 28), x[:, 0].numpy())
    transport, seen = scripted(status(200))
    client(transport, [], packed=True).predict("latest", x[:, 0])
    assert b'"inputs_b64"' in seen[0].content and b'"inputs"' not in seen[0].content
