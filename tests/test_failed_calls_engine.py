"""Failed calls and cache integrity against the real vLLM CPU engine: the model's replies are
real, only the failures are injected (as the backend raises them once its retries are spent)."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest

from service.backends import UpstreamError
from strategies import GenerationRequest, Task, prompts, run_strategy
from strategies.protocol import Generation

from tests.scripted import DictCache, is_checklist, is_judge, is_score, match_template

pytestmark = pytest.mark.engine

POEM = Task(messages=({"role": "user", "content": "Write two lines about rain."},), max_tokens=24)


class Failing:
    """The engine backend, except that requests chosen by ``fails`` fail for good; records every
    generation it returns with its request."""

    def __init__(self, backend, fails: Callable[[GenerationRequest], bool]) -> None:
        self.backend, self.fails = backend, fails
        self.answered: list[tuple[GenerationRequest, Generation]] = []

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       return_exceptions: bool = False) -> list[Generation | BaseException]:
        failing = [self.fails(r) for r in requests]
        if any(failing) and not return_exceptions:
            raise UpstreamError(500, {"error": {"message": "injected", "type": "server_error", "code": 500}})
        passing = [r for r, f in zip(requests, failing) if not f]
        generated = iter(await self.backend.generate(passing, return_exceptions=return_exceptions) if passing else [])
        outcomes = [UpstreamError(500, {"error": {"message": "injected"}}) if f else next(generated) for f in failing]
        self.answered += [(r, g) for r, g in zip(requests, outcomes) if isinstance(g, Generation)]
        return outcomes


def first_only(predicate: Callable[[GenerationRequest], bool]) -> Callable[[GenerationRequest], bool]:
    chosen: list[GenerationRequest] = []

    def fails(request: GenerationRequest) -> bool:
        if predicate(request) and not chosen:
            chosen.append(request)
        return bool(chosen) and request is chosen[0]
    return fails


async def test_best_of_n_on_the_engine_answers_without_a_failed_rating(engine_backend, engine):
    gen = Failing(engine_backend, first_only(is_score))
    result = await run_strategy("best-of-n", POEM, gen, params={"n": 3}, model_id=engine.model_name)
    assert result.answer.strip()
    assert result.trace["failed_calls"] == [{"error": "UpstreamError", "status": 500}]
    distinct = len({c["text"] for c in result.trace["candidates"]})
    unrated = [c for c in result.trace["candidates"] if c["score"] is None]
    assert len(unrated) >= 1 and result.trace["unrated"] == len(unrated)
    if distinct > 1:  # some candidate was rated: it is the one chosen
        assert result.trace["candidates"][result.trace["chosen"]]["score"] is not None


async def test_checklist_bon_on_the_engine_caches_no_cut_checklist_and_counts_missing_verdicts(engine_backend,
                                                                                              engine):
    cache = DictCache()
    gen = Failing(engine_backend, first_only(is_judge))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "max_items": 3, "checklist_max_tokens": 32},
                                cache=cache, model_id=engine.model_name)
    assert result.answer.strip()
    assert result.trace["missing_verdicts"] == 1 and len(result.trace["failed_calls"]) == 1
    (checklist,) = [g.choices[0] for r, g in gen.answered if is_checklist(r)]
    # A checklist the engine cut at checklist_max_tokens is used, never cached; a whole one is cached.
    assert ("checklist" in cache.kinds()) == (checklist.finish_reason != "length")
    judged = [r for r, _ in gen.answered if is_judge(r)]
    assert all(match_template(r, prompts.JUDGE_ITEM) for r in judged)
