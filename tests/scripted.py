"""A scripted test double of the ``Generator`` protocol, and a tiny in-memory cache.

``ScriptedGenerator(responder)`` answers every choice of every request by calling
``responder(request, sample_index)``, which returns the choice's text (or a full
``Choice``), or raises to make that request fail (as a backend does when its retries
are spent: the batch fails, or with ``return_exceptions`` only that request). It records each ``generate()`` batch in ``calls`` and the peak number
of ``generate()`` calls in flight at once, so tests can assert how work was
batched and whether independent work was issued concurrently.

Template helpers (``match_template``, ``is_feedback``, ...) recognise which prompt
of ``strategies.prompts`` a request carries, by matching the template's literal
text around its ``{placeholders}``, and return the filled-in fields.
"""

from __future__ import annotations

import asyncio
import re
import string
from functools import lru_cache
from typing import Any, Awaitable, Callable, Sequence

from strategies import prompts
from strategies.base import content_text
from strategies.protocol import Choice, Generation, GenerationRequest

Responder = Callable[[GenerationRequest, int], "str | Choice"]


def words(text: str) -> int:
    return len(text.split())


def request_text(request: GenerationRequest) -> str:
    """The prompt a request carries: the raw prompt, or the last message's content."""
    if request.prompt is not None:
        return request.prompt
    return content_text(request.messages[-1].get("content"))


class ScriptedGenerator:
    """Deterministic ``Generator``: ``responder`` decides each choice's text.

    Fake usage: prompt_tokens = words of the prompt (all messages in chat mode),
    completion_tokens = words of each choice.
    """

    def __init__(self, responder: Responder, *, delay: float | Callable[[GenerationRequest], float] = 0.001) -> None:
        self.responder = responder
        self.delay = delay
        self.calls: list[list[GenerationRequest]] = []
        """Every ``generate()`` batch, in arrival order."""
        self.spans: list[list[int]] = []
        """Per call, [start tick, end tick] on one shared event counter (end -1 while in flight)."""
        self._tick = 0
        self.in_flight = 0
        self.max_in_flight = 0
        """Peak number of ``generate()`` calls running at once."""
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for batch in self.calls for request in batch]

    def requests_where(self, predicate: Callable[[GenerationRequest], Any]) -> list[GenerationRequest]:
        return [request for request in self.requests if predicate(request)]

    def call_index(self, predicate: Callable[[GenerationRequest], Any]) -> list[int]:
        """Indices into ``calls`` of the batches holding a request that matches."""
        return [i for i, batch in enumerate(self.calls) if any(predicate(r) for r in batch)]

    def overlapped(self, i: int, j: int) -> bool:
        """Whether calls ``i`` and ``j`` were in flight at the same time."""
        (a0, a1), (b0, b1) = self.spans[i], self.spans[j]
        return a0 < b1 and b0 < a1

    def _delay(self, requests: Sequence[GenerationRequest]) -> float:
        if callable(self.delay):
            return max(self.delay(r) for r in requests)
        return self.delay

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       return_exceptions: bool = False) -> list[Generation | BaseException]:
        self.calls.append(list(requests))
        span = [self._next_tick(), -1]
        self.spans.append(span)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # Yield to the loop so that calls issued concurrently overlap here.
            await asyncio.sleep(self._delay(requests))
            if not return_exceptions:
                return [self._answer(request) for request in requests]
            outcomes: list[Generation | BaseException] = []
            for request in requests:
                try:
                    outcomes.append(self._answer(request))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes
        finally:
            self.in_flight -= 1
            span[1] = self._next_tick()

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _answer(self, request: GenerationRequest) -> Generation:
        choices = []
        for index in range(request.n):
            out = self.responder(request, index)
            choices.append(out if isinstance(out, Choice) else Choice(out, finish_reason="stop"))
        if request.messages is not None:
            prompt_tokens = sum(words(content_text(m.get("content"))) for m in request.messages)
        else:
            prompt_tokens = words(request.prompt or "")
        completion_tokens = sum(words(c.text) for c in choices)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        return Generation(tuple(choices), prompt_tokens, completion_tokens, request.model)


class DictCache:
    """In-memory ``Cache`` (no TTLs, no single-flight), counting hits and misses."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], Any] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, kind: str, key: str) -> Any | None:
        return self.store.get((kind, key))

    async def get_many(self, kind: str, keys: Sequence[str]) -> list[Any | None]:
        return [self.store.get((kind, key)) for key in keys]

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        self.store[(kind, key)] = value

    async def get_or_compute(self, kind: str, key: str, compute: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        if (kind, key) in self.store:
            self.hits += 1
            return self.store[(kind, key)], True
        self.misses += 1
        value = await compute()
        self.store[(kind, key)] = value
        return value, False

    def kinds(self) -> list[str]:
        return sorted({kind for kind, _ in self.store})


# -- recognising prompt templates --------------------------------------------------


@lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern[str]:
    """A regex that fully matches ``template.format(**fields)``, capturing the fields."""
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>.*?)")
    return re.compile("".join(parts), re.DOTALL)


def match_template(request: GenerationRequest | str, template: str) -> dict[str, str] | None:
    """The fields of ``template`` filled in by ``request``'s prompt, or None if it is another prompt."""
    text = request if isinstance(request, str) else request_text(request)
    match = _template_regex(template).fullmatch(text)
    return match.groupdict() if match else None


def is_feedback(request: GenerationRequest) -> bool:
    return match_template(request, prompts.FEEDBACK) is not None


def is_refine(request: GenerationRequest) -> bool:
    """A rewrite request, in chat mode (``REFINE``) or in completion mode (``REFINE_CONTINUATION``
    + the task's prompt)."""
    return refine_fields(request) is not None


def refine_fields(request: GenerationRequest) -> dict[str, str] | None:
    """``response`` and ``feedback`` of a rewrite request, with ``task`` (chat: the quoted turns;
    completion: the task's prompt)."""
    return match_template(request, prompts.REFINE) or match_template(request, prompts.REFINE_CONTINUATION + "{task}")


def is_critique(request: GenerationRequest) -> bool:
    return match_template(request, prompts.CRITIQUE) is not None


def is_score(request: GenerationRequest) -> bool:
    return match_template(request, prompts.SCORE) is not None


def is_reward(request: GenerationRequest) -> bool:
    return match_template(request, prompts.REWARD) is not None


def is_step_score(request: GenerationRequest) -> bool:
    return match_template(request, prompts.STEP_SCORE) is not None


def is_checklist(request: GenerationRequest) -> bool:
    return match_template(request, prompts.CHECKLIST) is not None


def is_judge(request: GenerationRequest) -> bool:
    return match_template(request, prompts.JUDGE_ITEM) is not None


def is_select(request: GenerationRequest) -> bool:
    return match_template(request, prompts.SELECT_CONSISTENT) is not None


ALL_TEMPLATES = (
    prompts.FEEDBACK, prompts.REFINE, prompts.CRITIQUE, prompts.SCORE, prompts.REWARD, prompts.STEP_SCORE,
    prompts.CHECKLIST, prompts.JUDGE_ITEM, prompts.SELECT_CONSISTENT,
)


def is_task_sample(request: GenerationRequest) -> bool:
    """A request for the task itself (no strategy prompt)."""
    return not any(match_template(request, template) for template in ALL_TEMPLATES)
