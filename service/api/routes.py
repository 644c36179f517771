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
from .protocol import ChatCompletionRequest, CompletionRequest, SolveRequest, SolveResponse
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
    runner.validate(body.strategy, body.params)
    return await cancel_on_disconnect(request, runner.solve(body))


@router.get("/v1/strategies")
async def list_strategies() -> dict[str, Any]:
    return {"data": [
        {"name": name, "description": s.description, "params_schema": s.Params.model_json_schema()}
        for name, s in sorted(strategies().items())
    ]}


@router.post("/v1/runs", status_code=202)
async def create_run(body: SolveRequest, request: Request) -> JSONResponse:
    record = await request.app.state.runs.create(body)
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
    last = request.headers.get("last-event-id")
    after = int(last) if last and last.isdigit() else -1

    async def stream():
        async for event in request.app.state.runs.events(run_id, after):
            yield f"id: {event['seq']}\nevent: {event['event']}\ndata: {json.dumps(event, default=str)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _found(request: Request, run_id: str) -> dict[str, Any]:
    record = await request.app.state.runs.get(run_id)
    if record is None:
        raise APIError(404, f"no run {run_id!r} (unknown or expired)", param="run_id")
    return record


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "events"} | {"events": len(record.get("events", []))}
