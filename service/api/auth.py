"""Optional bearer-key authentication, and who is calling.

Open routes: ``/healthz`` and ``/readyz`` (they publish no backend address), and
``/metrics`` when ``PONDER_METRICS_PUBLIC`` is true. Everything else needs the key
when ``PONDER_API_KEYS`` is set.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from .errors import APIError


def _check(request: Request) -> str | None:
    """The caller's principal: a hash of its key (never the key), or, without auth, None."""
    keys = request.app.state.runtime.settings.api_key_set
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Headers arrive as latin-1 text: compare bytes, so any token (non-ASCII too) is just wrong.
    given = token.encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, key.encode()) for key in keys):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")
    return hashlib.sha256(given).hexdigest()[:16]


async def require_api_key(request: Request) -> None:
    """Bearer auth when PONDER_API_KEYS is set. Keys are compared, never logged; the
    caller's principal is left in ``request.state.principal`` (runs belong to it).

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hop on every request."""
    request.state.principal = _check(request)


async def require_key_for_metrics(request: Request) -> None:
    """``/metrics`` is open only when PONDER_METRICS_PUBLIC says so."""
    if not request.app.state.runtime.settings.metrics_public:
        _check(request)


