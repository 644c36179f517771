"""best-of-n (LLM-judge Best-of-N) against a scripted generator: who wins, how the
ratings are batched, cached and averaged, and what the budget and params allow."""

from __future__ import annotations

import time
from typing import Sequence

import pytest

from strategies import Budget, GenerationRequest, Limits, StrategyError, Task, prompts, run_strategy

from tests.scripted import DictCache, ScriptedGenerator, is_score, is_task_sample, match_template
from tests.test_strategies import MATH, all_overlap

pytestmark = pytest.mark.asyncio

CANDIDATES = ["answer zero", "answer one", "answer two", "answer three"]


def rating_script(candidates: Sequence[str], ratings: dict[str, Sequence[str]]):
    """Sample i is ``candidates[i]``; the i-th rating of a text is ``ratings[text][i]``."""
    def respond(request: GenerationRequest, i: int) -> str:
        if (fields := match_template(request, prompts.SCORE)) is not None:
            return ratings[fields["response"]][i]
        return candidates[i]
    return respond


def rated(*scores: int) -> dict[str, list[str]]:
    """One greedy rating per candidate, in ``CANDIDATES`` order."""
    return {text: [f" {score}"] for text, score in zip(CANDIDATES, scores)}


async def test_best_rated_candidate_wins_after_one_sample_request_and_one_rating_batch() -> None:
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9, 3, 7)))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4})
    assert result.answer == "answer one" and not result.budget_limited
    assert result.trace["chosen"] == 1
    assert [c["text"] for c in result.trace["candidates"]] == CANDIDATES
    assert [c["score"] for c in result.trace["candidates"]] == [0.5, 0.9, 0.3, 0.7]
    assert [c["scores"] for c in result.trace["candidates"]] == [[0.5], [0.9], [0.3], [0.7]]
    assert result.trace["unparsed"] == 0

    # Two rounds: the n=N sampling request, then every rating in ONE generate() batch.
    assert len(gen.calls) == 2
    (sample,) = gen.calls[0]
    assert is_task_sample(sample) and sample.n == 4 and sample.temperature == 0.8
    ratings = gen.calls[1]
    assert len(ratings) == 4 and all(is_score(r) for r in ratings)
    assert [match_template(r, prompts.SCORE)["response"] for r in ratings] == CANDIDATES
    assert all(match_template(r, prompts.SCORE)["task"] == MATH.instruction for r in ratings)
    assert all(r.n == 1 and r.temperature == 0.0 and r.max_tokens == 4 and r.is_chat for r in ratings)
    assert result.usage.backend_calls == 5 and result.usage.samples == 8


@pytest.mark.parametrize("scores, winner", [((3, 8, 8, 2), "answer one"), ((6, 6, 6, 6), "answer zero"),
                                            ((1, 2, 4, 4), "answer two")])
async def test_tie_goes_to_the_earliest_candidate(scores: tuple[int, ...], winner: str) -> None:
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(*scores)))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4})
    assert result.answer == winner
    assert result.trace["chosen"] == CANDIDATES.index(winner)


async def test_identical_candidates_are_rated_once() -> None:
    samples = ["same", "other", "same", "same", "other"]
    gen = ScriptedGenerator(rating_script(samples, {"same": [" 4"], "other": [" 6"]}))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 5})
    ratings = gen.calls[1]
    assert [match_template(r, prompts.SCORE)["response"] for r in ratings] == ["same", "other"]
    assert [c["score"] for c in result.trace["candidates"]] == [0.4, 0.6, 0.4, 0.4, 0.6]
    assert result.trace["chosen"] == 1  # the first of the best-rated duplicates
    assert result.usage.backend_calls == 3


async def test_unparseable_ratings_count_as_zero() -> None:
    ratings = {"answer zero": [" great"], "answer one": [" 2"], "answer two": [" 11"], "answer three": [""]}
    gen = ScriptedGenerator(rating_script(CANDIDATES, ratings))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4})
    assert result.answer == "answer one"  # 2/10 beats three unparseable (out-of-range 11 included)
    assert [c["scores"] for c in result.trace["candidates"]] == [[None], [0.2], [None], [None]]
    assert [c["score"] for c in result.trace["candidates"]] == [0.0, 0.2, 0.0, 0.0]
    assert result.trace["unparsed"] == 3


async def test_judge_samples_go_out_as_n_and_are_averaged() -> None:
    # The mean, an unparseable rating counting 0: zero = (1.0 + 0) / 2 = 0.5 < one = (0.7 + 0.6) / 2.
    # Dropping the unparseable rating, or reading only the first, would pick zero.
    ratings = {"answer zero": [" 10", " oops"], "answer one": [" 7", " 6"]}
    cache = DictCache()
    gen = ScriptedGenerator(rating_script(CANDIDATES, ratings))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 2, "judge_samples": 2, "judge_temperature": 0.5},
                                cache=cache)
    assert result.answer == "answer one"
    assert [c["scores"] for c in result.trace["candidates"]] == [[1.0, None], [0.7, 0.6]]
    assert [c["score"] for c in result.trace["candidates"]] == [0.5, 0.65]
    assert result.trace["unparsed"] == 1
    assert len(gen.calls) == 2
    assert all(r.n == 2 and r.temperature == 0.5 for r in gen.calls[1]) and len(gen.calls[1]) == 2
    assert cache.store == {} and result.usage.cache_misses == 0  # sampled ratings are never cached


async def test_greedy_ratings_are_cached_and_reused() -> None:
    samples = CANDIDATES + ["answer one"]
    ratings = rated(5, 9, 3, 7)
    cache = DictCache()
    first_gen = ScriptedGenerator(rating_script(samples, ratings))
    first = await run_strategy("best-of-n", MATH, first_gen, params={"n": 5}, cache=cache)
    assert first.usage.cache_misses == 4 and first.usage.cache_hits == 0  # the duplicate is rated once
    assert len(first_gen.requests_where(is_score)) == 4
    # Through the cache each miss is rated on its own, all of them in flight together.
    assert all_overlap(first_gen, first_gen.call_index(is_score)) and first_gen.max_in_flight >= 4
    assert cache.kinds() == ["judgment"]

    second_gen = ScriptedGenerator(rating_script(samples, ratings))
    second = await run_strategy("best-of-n", MATH, second_gen, params={"n": 5}, cache=cache)
    assert second.answer == first.answer == "answer one"
    assert not second_gen.requests_where(is_score)
    assert second.usage.cache_hits == 4 and second.usage.cache_misses == 0
    assert second.usage.backend_calls == 1
    assert second.trace["candidates"] == first.trace["candidates"]


async def test_cache_false_neither_reads_nor_writes() -> None:
    cache = DictCache()
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9, 3, 7)))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4}, cache=cache, use_cache=False)
    assert result.answer == "answer one"
    assert cache.store == {} and cache.hits == cache.misses == 0
    assert len(gen.calls) == 2 and len(gen.calls[1]) == 4  # uncached: one rating batch


async def test_completion_mode_rates_with_a_plain_prompt() -> None:
    task = Task(prompt="Q: What is 6 times 7?\nA:")
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9)))
    result = await run_strategy("best-of-n", task, gen, params={"n": 2})
    assert result.answer == "answer one"
    assert all(not r.is_chat and match_template(r, prompts.SCORE)["task"] == task.prompt for r in gen.calls[1])


# -- params --------------------------------------------------------------------------------


@pytest.mark.parametrize("params, field", [({"n": 0}, "n"), ({"judge_samples": 0}, "judge_samples"),
                                           ({"n": 129}, "n"), ({"temperature": 3}, "temperature"),
                                           ({"judges": 2}, "judges")])
async def test_out_of_range_or_unknown_params_are_rejected(params: dict, field: str) -> None:
    gen = ScriptedGenerator(lambda req, i: "x")
    with pytest.raises(StrategyError) as err:
        await run_strategy("best-of-n", MATH, gen, params=params)
    assert err.value.field == field
    assert not gen.calls


@pytest.mark.parametrize("params, field", [({"n": 8}, "n"), ({"n": 2, "judge_samples": 8}, "judge_samples")])
async def test_server_limits_cap_samples_and_judge_samples(params: dict, field: str) -> None:
    gen = ScriptedGenerator(lambda req, i: "x")
    with pytest.raises(StrategyError) as err:
        await run_strategy("best-of-n", MATH, gen, params=params, limits=Limits(samples=4))
    assert err.value.field == field
    assert not gen.calls


# -- budgets -------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
async def test_budget_max_calls_returns_the_first_candidate(use_cache: bool) -> None:
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9, 3, 7)))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4}, budget=Budget(max_calls=4),
                                cache=DictCache(), use_cache=use_cache)
    assert result.budget_limited and result.stop_reason.startswith("budget")
    assert result.answer == "answer zero"  # proposed as soon as it was drawn
    assert result.usage.backend_calls <= 4
    assert "candidates" not in result.trace


async def test_budget_max_tokens_shrinks_the_samples_then_stops() -> None:
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9, 3, 7)))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4}, budget=Budget(max_tokens=40))
    assert result.budget_limited and result.stop_reason.startswith("budget")
    (sample,) = gen.requests  # the ratings would not fit in what the samples left
    # Fewer samples first (4 -> 1), then shorter: 40 less the prompt's estimate of 22.
    assert (sample.n, sample.max_tokens) == (1, 40 - 22)
    assert result.answer == "answer zero"


async def test_budget_deadline_returns_the_first_candidate() -> None:
    gen = ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9, 3, 7)),
                            delay=lambda r: 10.0 if is_score(r) else 0.001)
    started = time.perf_counter()
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4}, budget=Budget(deadline_s=0.2))
    assert time.perf_counter() - started < 2
    assert result.budget_limited and result.stop_reason.startswith("deadline")
    assert result.answer == "answer zero"


# -- events --------------------------------------------------------------------------------


async def test_events_report_the_verdicts() -> None:
    events: list[tuple[str, dict]] = []
    result = await run_strategy("best-of-n", MATH, ScriptedGenerator(rating_script(CANDIDATES, rated(5, 9))),
                                params={"n": 2}, on_event=lambda event, data: events.append((event, data)))
    assert [event for event, _ in events] == ["started", "verdicts", "done"]
    assert events[1][1] == {"scores": [0.5, 0.9], "chosen": 1}
    assert events[-1][1]["answer"] == result.answer == "answer one"
