"""What every strategy shares: the task, the budget, the run context and the result.

A strategy is a class with a typed ``Params`` model and an async ``run``. The run
context meters every backend call (usage, budget), routes cacheable work through
the cache, emits progress events and remembers the best answer so far, so a run
stopped by its budget or deadline still answers.

Failed calls: a backend call that fails for good (after the backend's own retries)
need not end the run. Work issued with ``allow_partial=True`` comes back as ``None``
for each failed request, the error is listed in ``trace["failed_calls"]``, and the
strategy carries on without that sample or judgment, counting what is missing.
A strategy answers while it still has a candidate and the evidence its algorithm
chooses by; when failures leave it neither, it raises ``ctx.first_failure()``, so the
caller sees the backend's own error (502/503/504) rather than a made-up answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Mapping, Self, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import prompts
from .protocol import Cache, Choice, Generation, GenerationRequest, Generator, Usage

if TYPE_CHECKING:
    from .verification import Verification

log = logging.getLogger("ponder.strategy")

EventCallback = Callable[[str, dict[str, Any]], None]

ANSWER_CONSTRAINTS = ("tools", "tool_choice", "functions", "response_format", "guided_json", "guided_regex",
                      "guided_choice", "guided_grammar", "structured_outputs")
"""Caller extras that constrain what the answer may be: helper prompts show them to the
model, and every cache key holds them."""


class StrategyError(Exception):
    """A request a strategy cannot run, with a reason fit for a 4xx answer (``status_code``)."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# Caller fields that change what a sample's text is, so votes, ratings and checklists would
# judge something else (echo: the prompt inside every sample; suffix; token-id text; a
# stop string kept in the text), or that make samples something other than independent
# draws from the model (logit_bias and its vLLM kin, best_of, beam search). A strategy
# request carrying one is refused (400 naming the field); pass-through requests keep them.
REFUSED_EXTRAS = frozenset({
    "echo", "suffix", "logit_bias", "allowed_token_ids", "bad_words", "best_of", "use_beam_search",
    "include_stop_str_in_output", "return_tokens_as_token_ids", "add_generation_prompt",
    "continue_final_message",
})

RUN_SEED_STRIDE = 2**32
"""Seed distance between the proxy's ``n`` runs of one request: run ``i`` seeds from
``seed + i * RUN_SEED_STRIDE``, so runs never share a seed (a run draws far fewer samples)."""
_SEED_RANGE = 2**63  # vLLM takes int64 seeds; derived seeds wrap into [0, 2**63)


class BudgetExhausted(Exception):
    """Raised inside a run when the next backend call would break the budget.

    ``field`` names the budget field that bound (``budget.max_tokens`` or ``budget.max_calls``)."""

    def __init__(self, message: str, *, field: str = "budget.max_tokens") -> None:
        super().__init__(message)
        self.field = field


class BudgetTooSmall(StrategyError):
    """The budget could not pay for a single generation: the run has nothing to answer.

    ``result`` is the empty run (usage, ``budget_limited``), for callers such as a proxy
    request with ``n`` runs, where one starved run need not fail the others."""

    def __init__(self, message: str, *, field: str, result: "StrategyResult") -> None:
        super().__init__(message, field=field)
        self.result = result


class DeadlineBeforeAnswer(BudgetTooSmall):
    """The deadline passed before the run had any answer (504): an empty answer would read
    as the model saying nothing."""

    status_code = 504


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
        for name, _ in self.extra:
            if name in REFUSED_EXTRAS:
                raise StrategyError(f"{name} changes what a sample's text means and cannot be used with a "
                                    "strategy; send it without one", field=name)

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

    @cached_property
    def constraints(self) -> dict[str, Any]:
        """The caller's extras that constrain the answer (``ANSWER_CONSTRAINTS``)."""
        return {name: value for name, value in self.extra if name in ANSWER_CONSTRAINTS}

    @cached_property
    def conversation(self) -> str:
        """The whole task as text for a helper prompt's ``{task}``: system prompt, earlier
        turns and constraints included (``prompts.render_conversation``)."""
        return prompts.render_conversation(self.messages, self.prompt, self.constraints)

    @cached_property
    def identity(self) -> tuple[Any, ...]:
        """What a cached helper result depends on besides its own inputs: the mode, the
        whole conversation (or prompt) and the constraints. Part of every cache key."""
        if self.is_chat:
            return ("chat", self.messages, self.constraints)
        return ("completion", self.prompt, self.constraints)

    def refine_request(self, response: str, feedback: str, **sampling: Any) -> GenerationRequest:
        """A rewrite of ``response`` guided by ``feedback``, which can become the answer, so
        it keeps everything the caller sent: the ``REFINE`` prompt replaces the last user
        turn (it quotes that turn and anything after it), after the caller's system prompt
        and earlier turns, with the caller's extras (``tools``, ``response_format`` ...),
        model and stop strings. In completion mode the prompt is ``REFINE_CONTINUATION``
        (the response and its feedback) followed by the task's prompt: the rewrite continues
        it as a sample does, so the task's format and stop strings hold (a few-shot ``6+1=``
        gets ``7``, not a blank line)."""
        if self.prompt is not None:
            text = prompts.REFINE_CONTINUATION.format(response=response, feedback=feedback)
            return self.sample_request(prompt=text + self.prompt, **sampling)
        messages = self.messages
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
        head, tail = messages[:last_user], messages[last_user:]
        text = prompts.REFINE.format(task=prompts.render_conversation(tail), response=response, feedback=feedback)
        return self.sample_request(messages=head + ({"role": "user", "content": text},), **sampling)

    def for_run(self, index: int) -> "Task":
        """The task for run ``index`` of several answering one request (the proxy's ``n``):
        a caller's seed moves ``index * RUN_SEED_STRIDE`` on, so each run draws other samples."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index * RUN_SEED_STRIDE) % _SEED_RANGE)

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
        a user message for chat tasks, a plain prompt for completion tasks. It carries
        none of the caller's extras: ``text`` shows them (``conversation``)."""
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


PROMPT_BYTES_PER_TOKEN = 3
"""Prompt-token estimate before the backend has counted any: one token per 3 UTF-8 bytes
of prompt text (English BPE averages about 4 bytes a token, so this over-estimates it)."""
PROMPT_OVERHEAD_TOKENS = 8
"""Added per chat message and once per request, for the chat template's role markers."""
CALIBRATION_MARGIN = 1.1
"""Once the backend reports prompt counts, the estimate uses the highest tokens-per-byte
it has reported in this request, times this margin (never below 1/PROMPT_BYTES_PER_TOKEN)."""
MIN_SAMPLE_TOKENS = 8
"""A batch is shrunk no further than this many completion tokens per sample."""


def _prompt_bytes(request: GenerationRequest) -> tuple[int, int]:
    """UTF-8 bytes of everything in the prompt, and the template overhead in tokens."""
    extra = dict(request.extra)
    size = len(json.dumps(extra, ensure_ascii=False, default=str).encode()) if extra else 0
    if request.prompt is not None:
        return size + len(request.prompt.encode()), 1
    for message in request.messages:
        size += len(content_text(message.get("content")).encode())
    return size, PROMPT_OVERHEAD_TOKENS * (len(request.messages) + 1)


@dataclass
class Reservation:
    """What ``BudgetLedger.reserve`` booked for one batch, returned to ``settle``."""

    requests: list[GenerationRequest]
    tokens: int
    shrunk: bool


class BudgetLedger:
    """One request's spend against its budget, shared by every run of the request (a
    proxy request with ``n`` runs pays from one budget; ``run_strategy`` makes its own).

    Before each backend batch, ``reserve`` books the batch's worst case, estimated prompt
    tokens + ``n x max_tokens`` per request, against what is neither spent nor booked by
    batches in flight. All in one synchronous step (no ``await``), so concurrent batches
    never fit against the same remainder. A batch that does not fit is shrunk: fewer
    samples per request first (each keeps at least one), then shorter samples (down to
    ``MIN_SAMPLE_TOKENS``); if even that does not fit it is refused (``BudgetExhausted``).
    ``settle`` replaces the booking with the generations' true usage.

    Prompt tokens are estimated without a tokenizer (``PROMPT_BYTES_PER_TOKEN``,
    calibrated on the backend's own counts as they come in, ``CALIBRATION_MARGIN``), so a
    first batch of unusually dense text (digits, CJK) can cost more prompt tokens than
    estimated; completion tokens can never exceed what was booked.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.tokens_spent = 0
        self.tokens_reserved = 0
        self.calls = 0
        self.bound = False
        """Whether the budget shrank or refused any batch."""
        self._tokens_per_byte = 1 / PROMPT_BYTES_PER_TOKEN

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        size, overhead = _prompt_bytes(request)
        return math.ceil(size * self._tokens_per_byte) + overhead

    def check_affords(self, request: GenerationRequest) -> None:
        """Refuse up front (``StrategyError`` naming the budget field) a budget that could
        not pay for one short sample of ``request``, before any work starts."""
        if self.budget.max_calls is not None and self.budget.max_calls < 1:
            raise StrategyError("budget.max_calls allows no backend call", field="budget.max_calls")
        if self.budget.max_tokens is None:
            return
        needed = self.estimate_prompt_tokens(request) + min(MIN_SAMPLE_TOKENS, request.max_tokens)
        if needed > self.budget.max_tokens:
            raise StrategyError(
                f"budget.max_tokens={self.budget.max_tokens} is too small to draw a single answer: the prompt "
                f"alone is estimated at {needed - min(MIN_SAMPLE_TOKENS, request.max_tokens)} tokens",
                field="budget.max_tokens")

    def reserve(self, requests: Sequence[GenerationRequest]) -> Reservation:
        """Book ``requests`` (shrunk to fit) or raise ``BudgetExhausted``."""
        budget = self.budget
        if budget.max_calls is not None and self.calls + len(requests) > budget.max_calls:
            self.bound = True
            raise BudgetExhausted(
                f"{len(requests)} more backend call(s) would exceed max_calls={budget.max_calls}",
                field="budget.max_calls")
        fitted, shrunk, tokens = list(requests), False, 0
        if budget.max_tokens is not None:
            fitted, shrunk, tokens = self._fit(fitted, budget.max_tokens - self.tokens_spent - self.tokens_reserved)
        self.calls += len(fitted)
        self.tokens_reserved += tokens
        self.bound = self.bound or shrunk
        return Reservation(fitted, tokens, shrunk)

    def _fit(self, requests: list[GenerationRequest], remaining: int) -> tuple[list[GenerationRequest], bool, int]:
        prompt = sum(self.estimate_prompt_tokens(r) for r in requests)
        room = remaining - prompt
        need = sum(r.n * r.max_tokens for r in requests)
        if need <= room:
            return requests, False, prompt + need
        floor = min(MIN_SAMPLE_TOKENS, min(r.max_tokens for r in requests))
        if room < floor * len(requests):
            self.bound = True
            raise BudgetExhausted(
                f"token budget max_tokens={self.budget.max_tokens} cannot pay for the next batch "
                f"({self.tokens_spent} spent, {self.tokens_reserved} booked by calls in flight, "
                f"about {prompt} prompt tokens needed)")
        scale = room / need
        fitted = [r if r.n == 1 else replace(r, n=max(1, int(r.n * scale))) for r in requests]
        if sum(r.n * r.max_tokens for r in fitted) > room:
            if room // sum(r.n for r in fitted) < floor:
                fitted = [replace(r, n=1) for r in fitted]
            per_sample = room // sum(r.n for r in fitted)
            fitted = [r if r.max_tokens <= per_sample else replace(r, max_tokens=per_sample) for r in fitted]
        return fitted, True, prompt + sum(r.n * r.max_tokens for r in fitted)

    def settle(self, reservation: Reservation, generations: Sequence[Generation | None] | None) -> None:
        """Replace the booking with the true spend (``None``: the batch, or that one
        request, failed or was cancelled; its spend is unknown to us and its booking is
        released)."""
        self.tokens_reserved -= reservation.tokens
        for request, generation in zip(reservation.requests, generations or ()):
            if generation is None:
                continue
            self.tokens_spent += generation.prompt_tokens + generation.completion_tokens
            size, overhead = _prompt_bytes(request)
            if size and generation.prompt_tokens > overhead:
                observed = (generation.prompt_tokens - overhead) / size * CALIBRATION_MARGIN
                self._tokens_per_byte = max(self._tokens_per_byte, observed)


@dataclass(frozen=True)
class Limits:
    """Service-wide caps on amplification, checked against Params fields that
    declare a limit via ``json_schema_extra={"limit": <name>}``."""

    samples: int = 64
    rounds: int = 8
    depth: int = 8
    simulations: int = 64
    branching: int = 8
    tokens: int = 4096
    """``max_tokens`` of a strategy's own calls (checklist, feedback, steps)."""
    checklist_items: int = 32
    """Items in a checklist, generated (``max_items``) or given (its length)."""

    def check(self, params: BaseModel) -> None:
        for name, info in type(params).model_fields.items():
            extra = info.json_schema_extra
            limit_name = extra.get("limit") if isinstance(extra, dict) else None
            if limit_name is None:
                continue
            cap = getattr(self, limit_name)
            value = getattr(params, name)
            if isinstance(value, list):
                value = len(value)
            if value is not None and value > cap:
                raise StrategyError(
                    f"{name}={value} exceeds this server's cap of {cap} ({limit_name})", field=name
                )


def cache_key(*parts: Any) -> str:
    """Stable content hash of everything that determines a cached value."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sampling_settings(request: GenerationRequest) -> tuple[Any, ...]:
    """Everything but the prompt text that shapes a request's reply: part of every cache key."""
    return (request.is_chat, request.model, request.n, request.temperature, request.top_p, request.max_tokens,
            request.stop, request.seed, request.logprobs, request.extra)


class _Uncacheable(Exception):
    """A computed value this run may use but the cache must not keep: the reply was cut
    at max_tokens, or the budget shrank the request (its max_tokens clamped)."""

    def __init__(self, value: Any) -> None:
        super().__init__("value cut short: not cached")
        self.value = value


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


def finished_first(candidates: Sequence[Choice], scores: Sequence[float | None]) -> Callable[[int], tuple[bool, float]]:
    """A selection's own rank of candidate ``i`` (higher is better): a finished candidate before
    one cut off at max_tokens, then its score; a candidate with no score (its judging call
    failed) below every scored one. ``scores`` is parallel to ``candidates``."""
    def rank(i: int) -> tuple[bool, float]:
        score = scores[i]
        return not candidates[i].cut_off, -1.0 if score is None else score
    return rank


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
        ledger: BudgetLedger | None = None,
        verification: "Verification | None" = None,
    ) -> None:
        self.generator = generator
        self.task = task
        self.cache = cache
        self.ledger = ledger or BudgetLedger(budget)
        self.budget = self.ledger.budget
        self.budget_bound = False
        """Whether the budget shrank or refused one of this run's batches."""
        self.usage = Usage()
        self.best: Candidate | None = None
        self._best_score: float | None = None
        self.trace: dict[str, Any] = {}
        self.use_cache = use_cache and cache is not None
        self.model_id = model_id or task.model or ""
        self.failures: list[Exception] = []
        """Backend calls that failed for good and that the run carried on without."""
        self._on_event = on_event
        self._seed_offsets: dict[str, int] = {}
        self.verification = verification
        """The request's outside checks (``strategies.verification``); None or falsy: none."""
        self.interrupted: str | None = None
        """Why the run ended early with its best answer so far (``interrupt``), if it did."""

    def interrupt(self, error: Exception) -> None:
        """End the run early after a backend call failed for good, answering with the best
        answer so far: the error goes to ``trace["error"]`` and the stop reason, and the
        result is flagged ``budget_limited``. Like ``failed_calls``, the trace names the
        error's kind and status only; its message (which may hold a backend address) is logged."""
        log.warning("backend call failed for good; the run answers with its best so far: %s", error)
        status = getattr(error, "status_code", None)
        self.interrupted = f"backend error: {type(error).__name__}" + (f" (status {status})" if status else "")
        self.trace["error"] = self.interrupted

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

    def _distinct_seeds(self, requests: Sequence[GenerationRequest]) -> list[GenerationRequest]:
        """A caller's seed makes a run reproducible, never its samples identical.

        vLLM seeds sample ``i`` of an ``n``-sample request with ``seed + i``; so each seeded
        request for a prompt starts where the previous ones' samples for that prompt ended
        (seed + samples already drawn), and no (prompt, seed) pair is drawn twice in a run.
        Counting per prompt keeps the seeds reproducible when different prompts interleave.
        """
        seeded = []
        for request in requests:
            if request.seed is None:
                seeded.append(request)
                continue
            prompt = cache_key(request.messages, request.prompt)
            offset = self._seed_offsets.get(prompt, 0)
            self._seed_offsets[prompt] = offset + request.n
            seeded.append(replace(request, seed=(request.seed + offset) % _SEED_RANGE))
        return seeded

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       allow_partial: bool = False) -> list[Generation | None]:
        """Issue independent requests concurrently, as one batch, paid from the budget
        (``BudgetLedger.reserve``: the batch may come back with fewer or shorter samples);
        one generation per request.

        ``allow_partial``: a request that fails for good comes back as ``None`` and is
        recorded (``trace["failed_calls"]``) instead of failing the batch. Without it
        (the default) every item is a ``Generation`` and the first failure raises.
        Budget stops and cancellation always raise.
        """
        _, generations = await self._issue(requests, allow_partial)
        return generations

    async def _issue(self, requests: Sequence[GenerationRequest],
                     allow_partial: bool) -> tuple[list[GenerationRequest], list[Generation | None]]:
        """``generate``, also returning the requests as sent (fitted to the budget)."""
        if not requests:
            return [], []
        reservation = self.ledger.reserve(self._distinct_seeds(requests))
        self.budget_bound = self.budget_bound or reservation.shrunk
        self.usage.backend_calls += len(reservation.requests)
        generations: list[Generation | None] | None = None
        try:
            if allow_partial:
                outcomes = await self.generator.generate(reservation.requests, return_exceptions=True)
            else:
                outcomes = await self.generator.generate(reservation.requests)
            generations = [None if isinstance(o, BaseException) else o for o in outcomes]
        finally:
            self.ledger.settle(reservation, generations)
        for outcome, generation in zip(outcomes, generations):
            if generation is None:
                if not _is_call_failure(outcome):
                    raise outcome
                self._record_failure(outcome)
                continue
            self.usage.prompt_tokens += generation.prompt_tokens
            self.usage.completion_tokens += generation.completion_tokens
            self.usage.samples += len(generation.choices)
        return reservation.requests, generations

    def _record_failure(self, exc: Exception) -> None:
        """The trace names the error's kind and status only: its message may hold the
        backend's address, which is for the log, not for the caller."""
        log.warning("backend call failed for good; the run carries on without it: %s", exc)
        self.failures.append(exc)
        entry = {"error": type(exc).__name__, "status": getattr(exc, "status_code", None)}
        self.trace.setdefault("failed_calls", []).append(entry)
        self.emit("call_failed", **entry)

    def first_failure(self) -> Exception:
        """The error to raise when failed calls left the run nothing to answer with:
        the first failure itself, so its status (502/503/504, upstream 4xx) reaches the caller."""
        if not self.failures:
            raise RuntimeError("first_failure() called but no backend call has failed")
        return self.failures[0]

    async def sample(self, request: GenerationRequest, *, allow_partial: bool = False) -> list[Choice] | None:
        """The choices of one request (``None`` if it failed, with ``allow_partial``)."""
        (generation,) = await self.generate([request], allow_partial=allow_partial)
        return None if generation is None else list(generation.choices)

    async def cached_text(self, kind: str, key: str, request: GenerationRequest, *, whole: bool,
                          parse: Callable[[Choice], Any] | None = None, allow_partial: bool = False) -> Any:
        """The first choice's text (or ``parse(choice)``) of a deterministic request, cached.

        The stored key is ``key`` (the content: model, prompt version, texts) plus every
        sampling setting of ``request`` (mode, max_tokens, temperature, stop, ...), so no
        value is served to a request that would have produced another. A value is
        returned but never stored when the budget shrank the request (max_tokens
        clamped), or, with ``whole`` (the whole text is used: checklists, critiques), when the
        reply was cut at max_tokens (``finish_reason == "length"``); judgments read from
        the first words of a short reply pass ``whole=False``. ``allow_partial``: a
        failed call gives ``None`` (recorded) instead of raising.
        """

        async def compute() -> Any:
            (sent,), (generation,) = await self._issue([request], False)
            choice = generation.choices[0]
            value = choice.text if parse is None else parse(choice)
            shrunk = (sent.n, sent.max_tokens) != (request.n, request.max_tokens)  # by the budget
            if shrunk or (whole and choice.finish_reason == "length"):
                raise _Uncacheable(value)
            return value

        try:
            return await self._cached(kind, cache_key(key, _sampling_settings(request)), compute)
        except Exception as exc:
            if not allow_partial or not _is_call_failure(exc):
                raise
            self._record_failure(exc)
            return None

    async def cached_texts(self, kind: str, requests: Sequence[GenerationRequest],
                           keys: Callable[[], Sequence[str]], *, whole: bool,
                           allow_partial: bool = False) -> list[str | None]:
        """``cached_text`` for many requests, all issued at once; without a cache, one
        batch and no keys to hash. ``None`` marks a failed call (with ``allow_partial``)."""
        if not self.use_cache:
            generations = await self.generate(requests, allow_partial=allow_partial)
            return [None if g is None else g.choices[0].text for g in generations]
        return await gather_or_cancel(*(
            self.cached_text(kind, key, request, whole=whole, allow_partial=allow_partial)
            for key, request in zip(keys(), requests)
        ))

    async def _cached(self, kind: str, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        """Reuse a cached value for deterministic work (temperature 0, same inputs)."""
        if not self.use_cache:
            try:
                return await compute()
            except _Uncacheable as cut:
                return cut.value
        ran = False

        async def ours() -> Any:
            nonlocal ran
            ran = True
            return await compute()

        while True:
            try:
                value, hit = await self.cache.get_or_compute(kind, key, ours)
                break
            except _Uncacheable as cut:
                if ran:
                    value, hit = cut.value, False
                    break
                # A concurrent identical run led and its value was cut short (by its own
                # budget, perhaps): not this run's to inherit. Ask again (join or lead anew).
            except BudgetExhausted:
                # The leader ran out of *its* budget: likewise not this run's to inherit.
                # (A failed backend call is: the same call would fail again, so it raises.)
                if ran:
                    raise
        if hit:
            self.usage.cache_hits += 1
        else:
            self.usage.cache_misses += 1
        return value


def _is_call_failure(exc: BaseException) -> bool:
    """A backend call that failed for good (the generator already retried what it retries):
    any error but a budget stop, a bad request to the strategy or cancellation."""
    return isinstance(exc, Exception) and not isinstance(exc, (BudgetExhausted, StrategyError, _Uncacheable))


class Strategy(ABC):
    """Base of every strategy: a name, a description, typed params and ``run``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    @abstractmethod
    async def run(self, ctx: RunContext, params: Any) -> Candidate:
        """Run the algorithm; record trace in ``ctx.trace``; return the final choice."""


class StrategyParams(BaseModel):
    """Base for Params models: unknown fields are an error, not silently ignored.

    A Params model with a ``temperature`` field (the temperature of the strategy's own
    samples and rewrites, ``None`` by default) states ``default_temperature``: the value used
    when neither the params nor the request (``Task.temperature``) set one."""

    model_config = ConfigDict(extra="forbid")
    default_temperature: ClassVar[float] = 0.7

    def for_task(self, task: "Task") -> Self:
        """These params with ``temperature`` resolved: the params' own, else the request's
        (the caller's ``temperature``, or the server's default for the model), else
        ``default_temperature``."""
        if "temperature" not in type(self).model_fields or getattr(self, "temperature") is not None:
            return self
        chosen = task.temperature if task.temperature is not None else self.default_temperature
        return self.model_copy(update={"temperature": chosen})


def temperature_field(default: float, what: str = "Temperature of the samples") -> Any:
    """The ``temperature`` field of a Params model whose ``default_temperature`` is ``default``:
    unset (``None``) until ``StrategyParams.for_task`` resolves it."""
    return Field(None, ge=0, le=2, description=f"{what}; unset: the request's temperature, else {default:g}.")


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
    ledger: BudgetLedger | None = None,
    verification: "Verification | None" = None,
) -> StrategyResult:
    """Validate, run and account for one strategy run.

    Budget exhaustion and the deadline end the run cleanly with the best answer so far;
    ``budget_limited`` is true when the budget shrank or refused any of its batches.
    ``ledger`` shares one budget between several runs (default: a ledger of ``budget``).

    Raises ``BudgetTooSmall`` (a ``StrategyError`` naming the budget field) when the
    budget could not pay for the run's first generation.
    """
    strategy = get_strategy(name)
    parsed = parse_params(strategy, params, limits)
    if isinstance(parsed, StrategyParams):
        parsed = parsed.for_task(task)
    ctx = RunContext(
        generator, task, cache=cache, budget=budget, on_event=on_event, use_cache=use_cache, model_id=model_id,
        ledger=ledger,
        verification=verification,
    )
    budget = ctx.budget
    started = time.perf_counter()
    stop_reason, limited, exhausted, timed_out = "completed", False, None, False
    ctx.emit("started", strategy=name, params=parsed.model_dump())
    try:
        async with asyncio.timeout(budget.deadline_s):
            final = await strategy.run(ctx, parsed)
        if ctx.interrupted:
            stop_reason, limited = ctx.interrupted, True
    except BudgetExhausted as exc:
        final, stop_reason, limited, exhausted = ctx.best, f"budget: {exc}", True, exc
    except TimeoutError:
        final, stop_reason, limited, timed_out = ctx.best, f"deadline of {budget.deadline_s}s reached", True, True
    ctx.usage.wall_ms = (time.perf_counter() - started) * 1000
    limited = limited or ctx.budget_bound
    if limited and stop_reason == "completed":
        stop_reason = "completed within a budget that shrank some batches"
    if ctx.failures and stop_reason.startswith("completed"):
        stop_reason += f", without {len(ctx.failures)} failed backend call(s)"
    empty = final is None
    if empty:
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
    if empty and timed_out:
        raise DeadlineBeforeAnswer(f"the deadline of {budget.deadline_s:g}s passed before any answer was ready",
                                   field="budget.deadline_s", result=result)
    if empty and exhausted is not None:
        raise BudgetTooSmall(f"{exhausted.field} is too small to draw a single answer: {exhausted}",
                             field=exhausted.field, result=result)
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
