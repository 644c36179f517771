"""Running strategies for the HTTP surface: one place that turns a request into a
metered, budgeted, cancellable strategy run. Used by /v1/solve, /v1/runs and the
OpenAI-compatible proxy."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Awaitable, TypeVar

from fastapi import Request

from strategies import Budget, StrategyResult, Task, run_strategy
from strategies.base import BudgetLedger, BudgetTooSmall, EventCallback, get_strategy, parse_params

from .. import metrics
from ..runtime import Runtime
from .errors import APIError
from .protocol import BudgetIn, SolveRequest, SolveResponse

T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class StrategyRunner:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings

    async def model_for(self, requested: str | None) -> str:
        return requested or await self.runtime.backend.default_model()

    def budget(self, given: BudgetIn | None) -> Budget:
        given = given or BudgetIn()
        return self.settings.budget(max_calls=given.max_calls, max_tokens=given.max_tokens,
                                    deadline_s=given.deadline_s)

    def affordable_budget(self, task: Task, given: BudgetIn | None) -> Budget:
        """The request's budget, refused (400 naming the field) if it cannot pay for one
        answer to ``task``."""
        budget = self.budget(given)
        BudgetLedger(budget).check_affords(task.sample_request())
        return budget

    def validate(self, strategy: str, params: dict[str, Any] | None, verify: Any = None) -> None:
        """Fail fast (4xx) before any work starts or a 202 is sent."""
        parse_params(get_strategy(strategy), params, self.settings.limits)
        self.runtime.verifiers.build(verify)

    async def run(self, strategy: str, task: Task, *, params: dict[str, Any] | None, budget: Budget,
                  use_cache: bool = True, on_event: EventCallback | None = None,
                  ledger: BudgetLedger | None = None, verify: Any = None) -> StrategyResult:
        """One metered run; ``ledger`` shares one budget between the runs of one request;
        ``verify`` is the request's raw verifier list (validated by ``validate``)."""
        verification = self.runtime.verifiers.build(verify, instruction=task.instruction) if verify else None
        try:
            with metrics.track_strategy(strategy):
                result = await run_strategy(
                    strategy, task, self.runtime.backend, params=params, cache=self.runtime.cache, budget=budget,
                    limits=self.settings.limits, on_event=on_event, use_cache=use_cache, model_id=task.model or "",
                    ledger=ledger, verification=verification,
                )
        except BudgetTooSmall as exc:
            metrics.record_usage(strategy, exc.result.usage)
            raise
        metrics.record_usage(strategy, result.usage)
        return result

    async def prepare(self, body: SolveRequest) -> tuple[Task, Budget]:
        """Everything a task-API request asks, checked (4xx) before any work or a 202."""
        self.validate(body.strategy, body.params, body.verify)
        model = await self.model_for(body.model)
        sampling = body.sampling
        task = Task(
            messages=tuple(body.task.messages) if body.task.messages else None,
            prompt=body.task.prompt,
            model=model,
            temperature=sampling.temperature if sampling.temperature is not None else self.settings.request_temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens or self.settings.max_tokens_per_sample_default,
            stop=tuple(sampling.stop),
        )
        return task, self.affordable_budget(task, body.budget)

    async def solve(self, body: SolveRequest, task: Task, budget: Budget, *, on_event: EventCallback | None = None,
                    run_id: str | None = None) -> SolveResponse:
        """Run a prepared task-API request."""
        result = await self.run(body.strategy, task, params=body.params, budget=budget, use_cache=body.cache,
                                on_event=on_event, verify=body.verify)
        return SolveResponse(id=run_id or new_id("solve"), model=task.model, **result.as_dict())


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client goes away first, cancel it (and its backend requests).

    The watcher blocks on the ASGI ``receive`` (the body is already read, so the next
    message is ``http.disconnect``): no polling while the work runs."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not task.done():
            metrics.CLIENT_DISCONNECTS.inc()
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            task.cancel()
        raise APIError(499, "client closed the request") from None
    finally:
        watcher.cancel()

