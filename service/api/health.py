"""Liveness, readiness and the model list."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from strategies import strategies

from .auth import require_api_key

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers. Says nothing about the backend."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready: at least one backend answers its health check. Open to all, so it tells
    each backend's state in configured order, never its URL (which may hold credentials)."""
    runtime = request.app.state.runtime
    backends = list((await runtime.backend.ready()).values())
    ready = any(backends)
    body = {"status": "ready" if ready else "unavailable", "backends": backends,
            "cache": getattr(runtime.cache, "breaker_state", "memory")}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict:
    """The backend's models, plus ``<strategy>:<model>`` ids that select a strategy."""
    listing = await request.app.state.runtime.backend.models()
    plain = listing.get("data", [])
    qualified = [
        {**model, "id": f"{name}:{model['id']}", "root": model["id"], "owned_by": "ponder"}
        for model in plain
        for name in sorted(strategies())
        if name != "none"
    ]
    return {"object": "list", "data": plain + qualified}
