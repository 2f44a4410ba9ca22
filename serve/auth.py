"""The gate in front of the API: bearer token, body size limit, and where-served headers.

It is a plain ASGI middleware rather than FastAPI dependencies because two of its checks must
run *before* the body is read: an oversized upload is refused on its ``Content-Length`` (or
cut off once a chunked body passes the limit) without ever being parsed, and an
unauthenticated client learns nothing beyond a 401. Tokens are compared with
:func:`hmac.compare_digest`, whose time does not depend on where the strings differ.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException

TOKEN_ENV = "EDGEMETA_SERVE_TOKEN"
OPEN_PATHS = frozenset({"/healthz"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_token(token_file: str | os.PathLike[str] | None = None,
               env: MutableMapping[str, str] | None = None) -> str | None:
    """The token from ``token_file`` if given (it must exist), else ``EDGEMETA_SERVE_TOKEN``.

    A named file that is missing or empty is an error, not "no auth": failing closed beats
    silently serving an open API because of a typo in a path.
    """
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    return token or None


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <expected>`` (constant time)."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


async def _send_json(send: Send, status: int, detail: str,
                     headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: identity headers on every response, then size and token checks.

    The identity is the ingress replica's; an answer that a model replica computed already
    names that replica (node, site, replica id), and those headers are kept.

    ``settings`` is read per request from a holder (a replica fills it in ``__init__``), so the
    module-level FastAPI app that ``@serve.ingress`` needs can be configured per deployment.
    """

    def __init__(self, app: ASGIApp, holder: Callable[[], GateSettings | None]) -> None:
        self.app = app
        self.holder = holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.holder()
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
            return
        extra = settings.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                named = {k.lower() for k, _ in headers}  # a model replica's where-served wins
                message["headers"] = [*headers, *(h for h in extra if h[0] not in named)]
            await send(message)

        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = dict(scope.get("headers", []))
        if settings.token is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not token_matches(settings.token, auth):
                await _send_json(send, 401, "missing or wrong bearer token",
                                 [*extra, (b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _send_json(send, 400, "Content-Length is not a number", extra)
                return
            if n > settings.max_body_bytes:
                await _send_json(send, 413, f"request body of {n} bytes exceeds the limit of "
                                            f"{settings.max_body_bytes} bytes", extra)
                return
            await self.app(scope, receive, send_with_headers)
            return
        # No Content-Length (a chunked upload): count while the app reads and stop at the
        # limit; FastAPI turns the HTTPException raised from its body read into a 413.
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > settings.max_body_bytes:
                    raise HTTPException(413, f"request body exceeds the limit of "
                                             f"{settings.max_body_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send_with_headers)


class GateSettings:
    """What the gate enforces and the headers it adds (one instance per replica)."""

    def __init__(self, token: str | None, max_body_bytes: int,
                 headers: dict[str, str]) -> None:
        self.token = token
        self.max_body_bytes = int(max_body_bytes)
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
