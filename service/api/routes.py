"""Thin routes: parse, authorise, delegate to the serving classes."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from strategies import strategies

from .auth import require_api_key
from .errors import APIError
from .openai_serving import SSE_HEADERS
from .protocol import ChatCompletionRequest, CompletionRequest, SolveRequest, SolveResponse, check_request
from .serving import cancel_on_disconnect


router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await request.app.state.openai.handle(request, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await request.app.state.openai.handle(request, body, chat=False)


@router.post("/v1/solve", response_model=SolveResponse)
async def solve(body: SolveRequest, request: Request) -> SolveResponse:
    request.state.strategy = body.strategy
    runner = request.app.state.runner
    check_request(body, runner.settings)
    task, budget = await runner.prepare(body)
    slot = request.app.state.admission.acquire(request.state.principal)
    try:
        return await cancel_on_disconnect(request, runner.solve(body, task, budget))
    finally:
        slot.release()


@router.get("/v1/strategies")
async def list_strategies() -> dict[str, Any]:
    return {"data": [
        {"name": name, "description": s.description, "params_schema": s.Params.model_json_schema()}
        for name, s in sorted(strategies().items())
    ]}


@router.post("/v1/runs", status_code=202)
async def create_run(body: SolveRequest, request: Request) -> JSONResponse:
    request.state.strategy = body.strategy
    check_request(body, request.app.state.runner.settings)
    record = await request.app.state.runs.create(body, owner=request.state.principal,
                                                 admit=lambda: request.app.state.admission.acquire(
                                                     request.state.principal))
    return JSONResponse(_public(record), status_code=202, headers={"Location": f"/v1/runs/{record['id']}"})


@router.get("/v1/runs/{run_id}")
async def get_run(run_id: str, request: Request) -> dict[str, Any]:
    return _public(await _found(request, run_id))


@router.delete("/v1/runs/{run_id}")
async def cancel_run(run_id: str, request: Request) -> dict[str, Any]:
    await _found(request, run_id)
    return _public(await request.app.state.runs.cancel(run_id))


@router.get("/v1/runs/{run_id}/events")
async def run_events(run_id: str, request: Request) -> StreamingResponse:
    await _found(request, run_id)
    last = request.headers.get("last-event-id", "").strip()
    if last and not (last.isascii() and last.isdigit()):
        raise APIError(400, "Last-Event-ID must be the decimal id of an event this stream sent", param="Last-Event-ID")
    after = int(last) if last else -1

    async def stream():
        async for event in request.app.state.runs.events(run_id, after):
            yield f"id: {event['seq']}\nevent: {event['event']}\ndata: {json.dumps(event, default=str)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _found(request: Request, run_id: str) -> dict[str, Any]:
    """The run, if it exists and belongs to the caller's API key (another key's run is
    as unknown as a missing one: 404, so ids cannot be probed)."""
    record = await request.app.state.runs.get(run_id)
    if record is None or record.get("owner") != request.state.principal:
        raise APIError(404, f"no run {run_id!r} (unknown or expired)", param="run_id")
    return record


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("events", "owner")} | {"events": len(record.get("events", []))}
