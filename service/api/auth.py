"""Optional bearer-key authentication for the /v1 API."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


async def require_api_key(request: Request) -> None:
    """Bearer auth when PONDER_API_KEYS is set. Keys are compared, never logged.

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hop on every request."""
    keys = request.app.state.runtime.settings.api_key_set
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, key) for key in keys):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")
