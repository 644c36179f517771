"""What every strategy shares: the task, the budget, the run context and the result.

A strategy is a class with a typed ``Params`` model and an async ``run``. The run
context meters every backend call (usage, budget), routes cacheable work through
the cache, emits progress events and remembers the best answer so far, so a run
stopped by its budget or deadline still answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, ClassVar, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from .protocol import Cache, Choice, Generation, GenerationRequest, Generator, Usage

EventCallback = Callable[[str, dict[str, Any]], None]


class StrategyError(Exception):
    """A request a strategy cannot run, with a reason fit for a 4xx answer."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BudgetExhausted(Exception):
    """Raised inside a run when the next backend call would break the budget."""


@dataclass(frozen=True)
class Task:
    """What the caller asked: chat ``messages`` or a raw completion ``prompt``,
    plus the caller's sampling choices, which strategies use for their samples."""

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise StrategyError("a task needs exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise StrategyError("messages must not be empty", field="messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def instruction(self) -> str:
        """The text the strategy reasons about: the last user turn, or the prompt."""
        if self.prompt is not None:
            return self.prompt
        for message in reversed(self.messages or ()):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return content_text(self.messages[-1].get("content"))

    def sample_request(self, *, n: int = 1, default_temperature: float = 0.7, **overrides: Any) -> GenerationRequest:
        """The task itself as a request for ``n`` samples."""
        fields: dict[str, Any] = {
            "messages": self.messages,
            "prompt": self.prompt,
            "n": n,
            "temperature": self.temperature if self.temperature is not None else default_temperature,
            "top_p": self.top_p if self.top_p is not None else 1.0,
            "max_tokens": self.max_tokens or 256,
            "stop": self.stop,
            "seed": self.seed,
            "model": self.model,
            "extra": self.extra,
        }
        fields.update(overrides)
        return GenerationRequest(**fields)

    def aux_request(self, text: str, **sampling: Any) -> GenerationRequest:
        """A strategy's own prompt (critique, judge, checklist), in the task's mode:
        a user message for chat tasks, a plain prompt for completion tasks."""
        if self.is_chat:
            return GenerationRequest(messages=({"role": "user", "content": text},), model=self.model, **sampling)
        return GenerationRequest(prompt=text, model=self.model, **sampling)


def content_text(content: Any) -> str:
    """Text of an OpenAI message content (a string or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


@dataclass(frozen=True)
class Budget:
    """Per-run ceilings. ``None`` means unbounded (the service always sets some)."""

    max_calls: int | None = None
    max_tokens: int | None = None
    deadline_s: float | None = None


@dataclass(frozen=True)
class Limits:
    """Service-wide caps on amplification, checked against Params fields that
    declare a limit via ``json_schema_extra={"limit": <name>}``."""

    samples: int = 64
    rounds: int = 8
    depth: int = 8
    simulations: int = 64
    branching: int = 8

    def check(self, params: BaseModel) -> None:
        for name, info in type(params).model_fields.items():
            extra = info.json_schema_extra
            limit_name = extra.get("limit") if isinstance(extra, dict) else None
            if limit_name is None:
                continue
            cap = getattr(self, limit_name)
            value = getattr(params, name)
            if value is not None and value > cap:
                raise StrategyError(
                    f"{name}={value} exceeds this server's cap of {cap} ({limit_name})", field=name
                )


def cache_key(*parts: Any) -> str:
    """Stable content hash of everything that determines a cached value."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class StrategyResult:
    answer: str
    trace: dict[str, Any]
    usage: Usage
    strategy: str
    budget_limited: bool = False
    stop_reason: str = "completed"
    message: dict[str, Any] | None = None
    """The chosen assistant message in chat mode (may hold tool calls)."""
    finish_reason: str | None = "stop"

    def as_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "strategy": self.strategy,
            "budget_limited": self.budget_limited,
            "stop_reason": self.stop_reason,
            "usage": self.usage.as_dict(),
            "trace": self.trace,
        }


@dataclass
class Candidate:
    """The answer a strategy would give if stopped now."""

    text: str
    message: dict[str, Any] | None = None
    finish_reason: str | None = "stop"

    @classmethod
    def of(cls, choice: Choice) -> "Candidate":
        return cls(choice.text, choice.message, choice.finish_reason)


class RunContext:
    """The metered view of the world a strategy runs in."""

    def __init__(
        self,
        generator: Generator,
        task: Task,
        *,
        cache: Cache | None = None,
        budget: Budget = Budget(),
        on_event: EventCallback | None = None,
        use_cache: bool = True,
        model_id: str = "",
    ) -> None:
        self.generator = generator
        self.task = task
        self.cache = cache
        self.budget = budget
        self.usage = Usage()
        self.best: Candidate | None = None
        self._best_score: float | None = None
        self.trace: dict[str, Any] = {}
        self.use_cache = use_cache and cache is not None
        self.model_id = model_id or task.model or ""
        self._on_event = on_event

    def emit(self, event: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, data)

    def propose(self, candidate: Candidate | Choice, score: float | None = None) -> None:
        """Record the answer to return if the run is stopped from now on.

        With a ``score``, the proposal only replaces a strictly lower-scored one.
        """
        if score is not None and self._best_score is not None and score <= self._best_score:
            return
        self.best = Candidate.of(candidate) if isinstance(candidate, Choice) else candidate
        self._best_score = score

    def _fit_budget(self, requests: Sequence[GenerationRequest]) -> list[GenerationRequest]:
        budget, usage = self.budget, self.usage
        if budget.max_calls is not None and usage.backend_calls + len(requests) > budget.max_calls:
            raise BudgetExhausted(
                f"{len(requests)} more backend call(s) would exceed max_calls={budget.max_calls}"
            )
        if budget.max_tokens is None:
            return list(requests)
        remaining = budget.max_tokens - usage.total_tokens
        total_n = sum(r.n for r in requests)
        per_sample = remaining // max(total_n, 1)
        if per_sample < 8:
            raise BudgetExhausted(f"token budget max_tokens={budget.max_tokens} is spent")
        # Clamp each sample's length so the batch cannot overrun what is left.
        return [r if r.max_tokens <= per_sample else replace(r, max_tokens=per_sample) for r in requests]

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Issue independent requests concurrently, as one batch."""
        if not requests:
            return []
        fitted = self._fit_budget(requests)
        self.usage.backend_calls += len(fitted)
        generations = await self.generator.generate(fitted)
        for generation in generations:
            self.usage.prompt_tokens += generation.prompt_tokens
            self.usage.completion_tokens += generation.completion_tokens
            self.usage.samples += len(generation.choices)
        return generations

    async def sample(self, request: GenerationRequest) -> list[Choice]:
        (generation,) = await self.generate([request])
        return list(generation.choices)

    async def cached_texts(self, kind: str, requests: Sequence[GenerationRequest],
                           keys: Callable[[], Sequence[str]]) -> list[str]:
        """The first choice's text of each deterministic request, each cached under its
        key and all issued at once; without a cache, one batch and no keys to hash."""
        if not self.use_cache:
            return [g.choices[0].text for g in await self.generate(requests)]

        async def text(request: GenerationRequest) -> str:
            return (await self.sample(request))[0].text

        return await gather_or_cancel(*(
            self.cached(kind, key, lambda r=request: text(r)) for key, request in zip(keys(), requests)
        ))

    async def cached(self, kind: str, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        """Reuse a cached value for deterministic work (temperature 0, same inputs)."""
        if not self.use_cache:
            return await compute()
        ran = False

        async def ours() -> Any:
            nonlocal ran
            ran = True
            return await compute()

        while True:
            try:
                value, hit = await self.cache.get_or_compute(kind, key, ours)
                break
            except BudgetExhausted:
                # A concurrent identical run led the shared computation and ran out of
                # *its* budget: not this run's to inherit. Ask again (join or lead anew).
                if ran:
                    raise
        if hit:
            self.usage.cache_hits += 1
        else:
            self.usage.cache_misses += 1
        return value


class Strategy(ABC):
    """Base of every strategy: a name, a description, typed params and ``run``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    @abstractmethod
    async def run(self, ctx: RunContext, params: Any) -> Candidate:
        """Run the algorithm; record trace in ``ctx.trace``; return the final choice."""


class StrategyParams(BaseModel):
    """Base for Params models: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


_REGISTRY: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"strategy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise StrategyError(f"unknown strategy {name!r}; known: {known}", field="strategy") from None


def strategies() -> Mapping[str, Strategy]:
    return dict(_REGISTRY)


def parse_params(strategy: Strategy, params: Mapping[str, Any] | None, limits: Limits | None = None) -> BaseModel:
    try:
        parsed = strategy.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise StrategyError(
            f"invalid strategy_params for {strategy.name}: {where}: {first['msg']}", field=where
        ) from None
    (limits or Limits()).check(parsed)
    return parsed


async def run_strategy(
    name: str,
    task: Task,
    generator: Generator,
    *,
    params: Mapping[str, Any] | None = None,
    cache: Cache | None = None,
    budget: Budget = Budget(),
    limits: Limits | None = None,
    on_event: EventCallback | None = None,
    use_cache: bool = True,
    model_id: str = "",
) -> StrategyResult:
    """Validate, run and account for one strategy run.

    Budget exhaustion and the deadline end the run cleanly with the best answer so far.
    """
    strategy = get_strategy(name)
    parsed = parse_params(strategy, params, limits)
    ctx = RunContext(
        generator, task, cache=cache, budget=budget, on_event=on_event, use_cache=use_cache, model_id=model_id
    )
    started = time.perf_counter()
    stop_reason, limited = "completed", False
    ctx.emit("started", strategy=name, params=parsed.model_dump())
    try:
        async with asyncio.timeout(budget.deadline_s):
            final = await strategy.run(ctx, parsed)
    except BudgetExhausted as exc:
        final, stop_reason, limited = ctx.best, f"budget: {exc}", True
    except TimeoutError:
        final, stop_reason, limited = ctx.best, f"deadline of {budget.deadline_s}s reached", True
    ctx.usage.wall_ms = (time.perf_counter() - started) * 1000
    if final is None:
        final = Candidate("", None, "length")
    result = StrategyResult(
        answer=final.text,
        trace=ctx.trace,
        usage=ctx.usage,
        strategy=name,
        budget_limited=limited,
        stop_reason=stop_reason,
        message=final.message,
        finish_reason=final.finish_reason,
    )
    ctx.emit("done", answer=result.answer, budget_limited=limited, usage=ctx.usage.as_dict())
    return result


async def gather_or_cancel(*aws: Awaitable[Any]) -> list[Any]:
    """Like ``asyncio.gather``, but the first failure cancels the siblings before it is
    raised, so a budget stop or backend error leaves no work running behind the answer."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
