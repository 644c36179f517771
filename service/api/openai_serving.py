"""The drop-in OpenAI-compatible proxy.

No strategy: the request is forwarded as is (streams relayed byte for byte).
With a strategy (``strategy`` field via the SDK's ``extra_body``, or a model id
``<strategy>:<model>``): ``n`` independent strategy runs execute concurrently and
come back as ``n`` choices; ``usage`` totals every internal call; the ``ponder``
object carries each run's trace summary. Streaming strategy runs send progress
as SSE comments, then the answer as chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from strategies import Budget, StrategyResult, Task, strategies
from strategies.base import BudgetLedger, BudgetTooSmall, StrategyError, gather_or_cancel

from ..backends import BackendError, BackendTimeout
from .admission import Slot
from .errors import error_body, failure_body
from .protocol import ChatCompletionRequest, OpenAIRequest, check_request
from .serving import StrategyRunner, cancel_on_disconnect, new_id

log = logging.getLogger("ponder.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


def split_strategy(body: OpenAIRequest) -> tuple[str | None, str]:
    """Strategy and backend model from the fields or a ``<strategy>:<model>`` id."""
    strategy, model = body.strategy, body.model
    prefix, sep, rest = model.partition(":")
    if sep and prefix in strategies():
        if strategy and strategy != prefix:
            raise StrategyError(f"model prefix {prefix!r} conflicts with strategy {strategy!r}", field="strategy")
        strategy, model = prefix, rest
    return (None if strategy == "none" else strategy), model


class OpenAIServing:
    def __init__(self, runner: StrategyRunner) -> None:
        self.runner = runner
        self.settings = runner.settings
        self.backend = runner.runtime.backend

    async def handle(self, request: Request, body: OpenAIRequest, *, chat: bool) -> Any:
        strategy, model = split_strategy(body)
        request.state.strategy = strategy or "none"
        if body.n > self.settings.max_n:
            raise StrategyError(f"n={body.n} exceeds this server's cap of {self.settings.max_n}", field="n")
        check_request(body, self.settings)
        if strategy is None:
            if body.verify:
                raise StrategyError("verify needs a strategy (this request has none)", field="verify")
            return await self._passthrough(request, body, model, chat=chat)
        self.runner.validate(strategy, body.strategy_params, body.verify)
        _refuse_logprobs(body)
        task = self._task(body, model, chat=chat)
        budget = self.runner.affordable_budget(task, body.budget)
        slot = request.app.state.admission.acquire(request.state.principal, weight=body.n)
        if body.stream:
            return StreamingResponse(self._stream_strategy(body, strategy, task, budget, slot, chat=chat),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(slot.release))
        try:
            results = await cancel_on_disconnect(request, self._run_n(body, strategy, task, budget))
        finally:
            slot.release()
        # Already JSON-native: skip FastAPI's recursive jsonable_encoder (slow on big traces).
        return JSONResponse(self._response(body, strategy, task, results, chat=chat))

    # -- pass-through -------------------------------------------------------------

    async def _passthrough(self, request: Request, body: OpenAIRequest, model: str, *, chat: bool) -> Any:
        """Forward the request as is, under the caller's (or the default) deadline: a
        complete JSON body (else 502), or the upstream's stream relayed byte for byte."""
        payload = body.passthrough_fields()
        payload["model"] = model
        if not self.backend.config.supports_seed:
            payload.pop("seed", None)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        deadline_s = self.runner.budget(body.budget).deadline_s
        deadline = asyncio.get_running_loop().time() + deadline_s
        if not body.stream:
            raw = await cancel_on_disconnect(request, _by_deadline(
                self.backend.request("POST", path, payload, decode=False), deadline, deadline_s))
            return Response(raw, media_type="application/json")
        # The first chunk is fetched before answering, so upstream errors keep their status.
        chunks = self._relay(path, payload, deadline, deadline_s)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await chunks.aclose()
            raise

        async def rest() -> AsyncIterator[bytes]:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

        return StreamingResponse(rest(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _relay(self, path: str, payload: dict[str, Any], deadline: float,
                     deadline_s: float) -> AsyncIterator[bytes]:
        """The upstream stream; the ``async with`` lives here, so closing this generator
        (or its finalisation, whatever the ASGI server does) releases the backend slot and
        closes the upstream connection. Errors before the first chunk raise (and keep their
        status); later ones, and the deadline, end the stream with an error event and [DONE]."""
        started = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout_at(deadline):  # opening it (status and headers) too
                    chunks = await stack.enter_async_context(self.backend.stream(path, payload))
                iterator = aiter(chunks)
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(iterator)
                    except StopAsyncIteration:
                        return
                    started = True
                    yield chunk
        except TimeoutError:
            if not started:
                raise _deadline_error(deadline_s) from None
            error = error_body(504, f"the request's deadline of {deadline_s:g}s passed mid-stream",
                               type_="backend_error")
        except BackendError as exc:
            if not started:
                raise
            log.warning("pass-through stream broke off: %s", exc)
            error = error_body(502, "backend stream interrupted", type_="backend_error")
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()

    # -- strategies ---------------------------------------------------------------

    def _task(self, body: OpenAIRequest, model: str, *, chat: bool) -> Task:
        extra = {k: v for k, v in body.passthrough_fields().items()
                 if k not in {"model", "messages", "prompt", "n", "stream", "stream_options", "temperature",
                              "top_p", "max_tokens", "max_completion_tokens", "stop", "seed"}}
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest):
            max_tokens = body.max_completion_tokens or max_tokens
        common = dict(
            model=model, temperature=body.temperature if body.temperature is not None
            else self.settings.request_temperature, top_p=body.top_p, stop=body.stop_list,
            max_tokens=max_tokens or self.settings.max_tokens_per_sample_default,
            seed=body.seed if self.backend.config.supports_seed else None, extra=tuple(extra.items()),
        )
        if chat:
            return Task(messages=tuple(body.messages), **common)
        return Task(prompt=body.text_prompt, **common)

    async def _run_n(self, body: OpenAIRequest, strategy: str, task: Task, budget: Budget,
                     on_event=None) -> list[StrategyResult]:
        """The ``n`` runs, concurrently, paying from ONE budget (the caller's, capped by
        the server's ceilings). A run the budget starved answers empty with
        ``budget_limited``; if every run was starved the request is a 400."""
        ledger = BudgetLedger(budget)

        async def one(index: int) -> tuple[StrategyResult, BudgetTooSmall | None]:
            try:
                return await self.runner.run(strategy, task.for_run(index), params=body.strategy_params,
                                             budget=ledger.budget, use_cache=body.cache, on_event=on_event,
                                             ledger=ledger, verify=body.verify), None
            except BudgetTooSmall as exc:
                return exc.result, exc

        outcomes = await gather_or_cancel(*(one(i) for i in range(body.n)))
        if all(starved is not None for _, starved in outcomes):
            raise outcomes[0][1]
        return [result for result, _ in outcomes]

    @staticmethod
    def _usage(results: list[StrategyResult]) -> dict[str, int]:
        prompt = sum(r.usage.prompt_tokens for r in results)
        completion = sum(r.usage.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _ponder(strategy: str, results: list[StrategyResult]) -> dict[str, Any]:
        return {
            "strategy": strategy,
            "runs": [
                {"usage": r.usage.as_dict(), "budget_limited": r.budget_limited, "stop_reason": r.stop_reason,
                 "trace": r.trace}
                for r in results
            ],
        }

    def _response(self, body: OpenAIRequest, strategy: str, task: Task, results: list[StrategyResult], *,
                  chat: bool) -> dict[str, Any]:
        created = int(time.time())
        if chat:
            choices = [
                {"index": i, "message": _assistant_message(r), "logprobs": None,
                 "finish_reason": _finish(r)}
                for i, r in enumerate(results)
            ]
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choices = [{"index": i, "text": r.answer, "logprobs": None, "finish_reason": _finish(r)}
                       for i, r in enumerate(results)]
            kind, prefix = "text_completion", "cmpl"
        return {
            "id": new_id(prefix), "object": kind, "created": created, "model": body.model,
            "choices": choices, "usage": self._usage(results), "ponder": self._ponder(strategy, results),
        }

    async def _stream_strategy(self, body: OpenAIRequest, strategy: str, task: Task, budget: Budget, slot: Slot,
                               *, chat: bool) -> AsyncIterator[str]:
        """Progress as SSE comments while the runs work, then the answers as chunks.
        The admission ``slot`` is given back when the stream ends, however it ends."""
        events: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
        work = asyncio.create_task(self._run_n(body, strategy, task, budget,
                                               on_event=lambda e, d: events.put_nowait((e, d))))
        try:
            while not work.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    event, data = getter.result()
                    yield f": ponder {json.dumps({'event': event, **_summary(data)}, default=str)}\n\n"
                else:
                    getter.cancel()
            results = work.result()
        except (StrategyError, BackendError) as exc:
            yield f"data: {json.dumps(failure_body(exc)[1])}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            if not work.done():  # the client went away: stop the fan-out
                work.cancel()
            slot.release()
        for chunk in self._chunks(body, strategy, results, chat=chat):
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    def _chunks(self, body: OpenAIRequest, strategy: str, results: list[StrategyResult], *,
                chat: bool) -> list[dict[str, Any]]:
        base = {"id": new_id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.model}
        chunks = []
        for i, r in enumerate(results):
            if chat:
                deltas = _message_deltas(_assistant_message(r))
                chunks.extend({**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
                              for delta in deltas)
                chunks.append({**base, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish(r)}]})
            else:
                chunks.append({**base, "choices": [{"index": i, "text": r.answer, "logprobs": None, "finish_reason": None}]})
                chunks.append({**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": _finish(r)}]})
        if body.include_usage:
            chunks.append({**base, "choices": [], "usage": self._usage(results),
                           "ponder": self._ponder(strategy, results)})
        return chunks


def _refuse_logprobs(body: OpenAIRequest) -> None:
    """``logprobs``/``top_logprobs`` on a strategy request: a 400 naming the field. A
    strategy's answer is chosen among, or rewritten over, many samples, so no one
    sample's logprobs describe it; answering ``logprobs: null`` would hide that."""
    fields = body.passthrough_fields()
    for name in ("logprobs", "top_logprobs"):
        value = fields.get(name)
        if value is not None and value is not False:  # completions' logprobs=0 asks for them too
            raise StrategyError(f"{name} cannot be returned for a strategy's answer (chosen among or rewritten "
                                f"over many samples); leave {name} out, or send the request without a strategy",
                                field=name)


def _assistant_message(result: StrategyResult) -> dict[str, Any]:
    """The chosen answer as an OpenAI assistant message: ``content`` is null, not "",
    beside tool calls."""
    message = dict(result.message) if result.message else {}
    tool_calls = message.get("tool_calls") or None
    out: dict[str, Any] = {"role": "assistant", "content": result.answer if result.answer or not tool_calls else None}
    if tool_calls:
        out["tool_calls"] = tool_calls
    if message.get("refusal") is not None:
        out["refusal"] = message["refusal"]
    return out


def _message_deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole assistant message as stream deltas, as OpenAI streams one: the role (with
    ``content`` "" or null), the content, the tool calls, each with its ``index`` (the
    SDK's stream helpers and LangChain merge tool-call deltas by it), the refusal."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None if message["content"] is None else ""}]
    if message["content"]:
        deltas.append({"content": message["content"]})
    if message.get("tool_calls"):
        deltas.append({"tool_calls": [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]})
    if message.get("refusal") is not None:
        deltas.append({"refusal": message["refusal"]})
    return deltas


def _finish(result: StrategyResult) -> str:
    if result.message and result.message.get("tool_calls"):
        return "tool_calls"
    return result.finish_reason or "stop"


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    """Progress events without bulky fields (full texts stay in the trace)."""
    return {k: v for k, v in data.items() if k not in ("text", "table", "usage")} | (
        {"leader": data["table"][0]} if data.get("table") else {}
    )


async def _by_deadline(work: Awaitable[T], deadline: float, deadline_s: float) -> T:
    """``work``, or ``BackendTimeout`` (504) at ``deadline`` (event-loop time)."""
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except TimeoutError:
        raise _deadline_error(deadline_s) from None


def _deadline_error(deadline_s: float) -> BackendTimeout:
    message = f"no answer within the request's deadline of {deadline_s:g}s"
    return BackendTimeout(message, public=message)
