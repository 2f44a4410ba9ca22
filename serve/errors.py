"""Errors a client caused, and how each one becomes an HTTP answer.

The code that finds a problem (the store, the input checks) raises one of these with the status
it deserves, so the status is decided once, where the cause is known; one handler per kind turns
it into ``{"detail": "..."}``. A wrong shape must never surface as a 500 with a traceback.
Pydantic's validation errors are summarised into one readable line.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.schemas import ErrorResponse


class RequestError(Exception):
    """An error a client caused, with the HTTP status it deserves and a message for it."""

    status = 400


class UnknownModel(RequestError):
    status = 404


class BadInput(RequestError):
    status = 422


class TooLarge(RequestError):
    status = 413


#: The error answers each route may give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "malformed JSON"), (401, "missing or wrong bearer token"),
        (404, "unknown model id"), (413, "body or batch too large"),
        (422, "wrong shape, type or value"),
        (503, "overloaded: retry after the Retry-After header's seconds")]}

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


def add_error_handlers(api: FastAPI, logger: logging.Logger) -> None:
    """Answer every error as ``{"detail": ...}``: client errors with their status, validation
    errors summarised, anything unexpected as a logged 500 without a traceback."""

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail = summarise_validation(list(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=status)

    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"[:500]},
                            status_code=500)

    api.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    api.add_exception_handler(RequestError, on_request_error)  # type: ignore[arg-type]
    api.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, on_crash)
