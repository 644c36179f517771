"""Errors in the OpenAI error schema, with the right status codes, for every route."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from strategies.base import StrategyError

from ..backends import BackendError, BackendTimeout, UpstreamError

log = logging.getLogger("ponder.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code
        self.headers = headers


def public_message(exc: BackendError) -> str:
    """What a caller may read about a backend failure: never the backend's URL or the
    transport's detail (those go to the log). Upstream errors keep the backend's own
    message, which is about the caller's request."""
    if isinstance(exc, UpstreamError):
        return str(exc)
    if exc.public:
        return exc.public
    if isinstance(exc, BackendTimeout):
        return "backend timed out"
    return "backend unavailable"


def error_body(status_code: int, message: str, *, param: str | None = None, code: Any = None,
               type_: str | None = None) -> dict[str, Any]:
    kind = type_ or _TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def failure_body(exc: StrategyError | BackendError) -> tuple[int, dict[str, Any]]:
    """Status and OpenAI error body for a failure met after the response started (a
    stream, an async run): the same answer the error handlers give."""
    if isinstance(exc, StrategyError):
        return exc.status_code, error_body(exc.status_code, str(exc), param=exc.field)
    return exc.status_code, error_body(exc.status_code, public_message(exc))


def error_response(status_code: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, **kwargs), status_code=status_code)


def _retry_after(exc: BackendError) -> dict[str, str] | None:
    """``Retry-After`` (whole seconds, at least 1) when the backend or ponder's queue gave one."""
    if exc.retry_after is None:
        return None
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        response = error_response(exc.status_code, exc.message, param=exc.param, code=exc.code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(StrategyError)
    async def _strategy_error(_: Request, exc: StrategyError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), param=exc.field)

    @app.exception_handler(UpstreamError)
    async def _upstream(_: Request, exc: UpstreamError) -> JSONResponse:
        # Upstream 4xx pass through with their own body when it already is an OpenAI error.
        body = exc.body if isinstance(exc.body, dict) and "error" in exc.body else error_body(
            exc.status_code, public_message(exc))
        status = exc.status_code if exc.status_code < 500 else 502
        return JSONResponse(body, status_code=status, headers=_retry_after(exc))

    @app.exception_handler(BackendError)
    async def _backend(_: Request, exc: BackendError) -> JSONResponse:
        log.warning("backend error: %s", exc)
        return JSONResponse(error_body(exc.status_code, public_message(exc), type_="backend_error"),
                            status_code=exc.status_code, headers=_retry_after(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'request'}: {first.get('msg')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")
