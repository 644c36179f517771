"""No caller can poison the shared cache: a checklist or critique cut short (by its
max_tokens or by a budget that clamped max_tokens) is used by its own run but never
stored, and keys carry every setting that shaped the value (chat or completion mode)."""

from __future__ import annotations

import asyncio

import pytest

from service.cache import MemoryCache
from strategies import Budget, Choice, GenerationRequest, Task, run_strategy
from strategies.base import BudgetTooSmall
from strategies.checklist_bon import ChecklistBoNParams
from strategies.self_refine import SelfRefineParams

from tests.scripted import DictCache, ScriptedGenerator, is_checklist, is_feedback, is_judge
from tests.test_strategies import MATH, POEM, feedback, refine_script

pytestmark = pytest.mark.asyncio

EIGHT = [f"Does the poem satisfy requirement {i}?" for i in range(1, 9)]
FULL = ChecklistBoNParams().checklist_max_tokens  # the default checklist length


def checklist_reply(request: GenerationRequest) -> Choice:
    """Eight items when the request may run to the default checklist length; the first
    four, cut at max_tokens, when it may not (a smaller ``checklist_max_tokens``)."""
    lines = EIGHT if request.max_tokens >= FULL else EIGHT[:4]
    text = " " + "\n".join(f"{n}. {item}" if n > 1 else item for n, item in enumerate(lines, 1))
    return Choice(text, finish_reason="stop" if request.max_tokens >= FULL else "length")


def poem_model(request: GenerationRequest, i: int) -> Choice | str:
    if is_checklist(request):
        return checklist_reply(request)
    if is_judge(request):
        return " YES"
    return f"poem {i}"


def ttls() -> dict[str, float]:
    return {"checklist": 3600, "critique": 3600, "judgment": 3600, "run": 3600}


def checklist_of(result) -> list[str]:
    return [row["item"] for row in result.trace["checklist"]]


async def test_the_issues_sequence_leaves_the_next_caller_an_eight_item_checklist() -> None:
    """budget.max_tokens=30, then a normal run (the budget ledger now refuses a budget
    that cannot pay for the first batch, rather than clamping the checklist)."""
    cache = MemoryCache(100, ttls())
    gen = ScriptedGenerator(poem_model)
    with pytest.raises(BudgetTooSmall):
        await run_strategy("checklist-bon", POEM, gen, params={"n": 2}, cache=cache, budget=Budget(max_tokens=30))
    normal = await run_strategy("checklist-bon", POEM, gen, params={"n": 2}, cache=cache)
    assert checklist_of(normal) == EIGHT


def critic(request: GenerationRequest, i: int) -> Choice | str:
    """Full feedback (9, DONE) when the request may run to the default feedback length;
    a stub cut at max_tokens when the budget clamped it."""
    if is_feedback(request):
        if request.max_tokens < SelfRefineParams().feedback_max_tokens:
            return Choice(" 3\nIssues:\n- the", finish_reason="length")
        return feedback(9, done=True)
    return refine_script(lambda response: feedback(9, done=True))(request, i)


async def test_a_budget_clamped_critique_does_not_reach_the_next_caller() -> None:
    cache = MemoryCache(100, ttls())
    gen = ScriptedGenerator(critic)
    small = await run_strategy("self-refine", MATH, gen, cache=cache, budget=Budget(max_tokens=300))
    assert gen.requests_where(is_feedback)[0].max_tokens < SelfRefineParams().feedback_max_tokens
    assert small.trace["chains"][0][0]["score"] == 3.0  # its own run used what it got

    normal = await run_strategy("self-refine", MATH, gen, cache=cache)
    assert normal.trace["chains"][0] == [{"round": 0, "text": "Answer v0", "score": 9.0,
                                          "issues": ["could be clearer"], "done": True, "stop": "done"}]
    again = await run_strategy("self-refine", MATH, gen, cache=cache)
    assert again.usage.cache_hits == 1 and again.trace["chains"] == normal.trace["chains"]


async def test_a_waiting_caller_does_not_inherit_a_clamped_critique() -> None:
    """Two identical misses at once: the leader's budget clamps its critique; the run
    waiting on the same key computes its own rather than take the cut one."""
    cache = MemoryCache(100, ttls())
    gen = ScriptedGenerator(critic, delay=0.02)
    small, normal = await asyncio.gather(
        run_strategy("self-refine", MATH, gen, cache=cache, budget=Budget(max_tokens=300)),
        run_strategy("self-refine", MATH, gen, cache=cache),
    )
    assert small.trace["chains"][0][0]["score"] == 3.0 and normal.trace["chains"][0][0]["score"] == 9.0
    full = SelfRefineParams().feedback_max_tokens
    assert sorted(r.max_tokens == full for r in gen.requests_where(is_feedback))[-1]


async def test_a_checklist_cut_at_its_own_max_tokens_is_not_cached() -> None:
    cache = DictCache()
    gen = ScriptedGenerator(poem_model)
    for _ in range(2):
        result = await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "checklist_max_tokens": 64},
                                    cache=cache)
        assert checklist_of(result) == EIGHT[:3]  # four lines, the last cut off and dropped
    assert len(gen.requests_where(is_checklist)) == 2
    assert "checklist" not in cache.kinds() and "judgment" in cache.kinds()


async def test_chat_and_completion_tasks_do_not_share_a_checklist() -> None:
    def model(request: GenerationRequest, i: int) -> Choice | str:
        if is_checklist(request):
            return " Is it a chat answer?" if request.is_chat else " Is it a completion?"
        return " YES" if is_judge(request) else f"text {i}"

    cache = DictCache()
    gen = ScriptedGenerator(model)
    instruction = "Write a short poem about cats."
    chat = await run_strategy("checklist-bon", Task(messages=({"role": "user", "content": instruction},)), gen,
                              params={"n": 2}, cache=cache)
    completion = await run_strategy("checklist-bon", Task(prompt=instruction), gen, params={"n": 2}, cache=cache)
    assert checklist_of(chat) == ["Is it a chat answer?"]
    assert checklist_of(completion) == ["Is it a completion?"]


async def test_a_critique_cut_short_is_not_cached_but_a_short_judgment_is() -> None:
    def critique(response: str) -> str:
        return " 6\nIssues:\n- the"  # cut mid-list

    def model(request: GenerationRequest, i: int) -> Choice | str:
        if is_feedback(request):
            return Choice(critique(""), finish_reason="length")
        return refine_script(critique)(request, i)

    cache = DictCache()
    for _ in range(2):
        await run_strategy("self-refine", MATH, ScriptedGenerator(model), params={"max_rounds": 1}, cache=cache)
    assert "critique" not in cache.kinds()

    # A judgment is read from the first words of a reply capped at a few tokens by design:
    # "YES, because" stopped by length is a whole verdict, and is cached.
    def judge_model(request: GenerationRequest, i: int) -> Choice | str:
        if is_judge(request):
            return Choice(" YES, because", finish_reason="length")
        return poem_model(request, i)

    gen = ScriptedGenerator(judge_model)
    first = await run_strategy("checklist-bon", POEM, gen, params={"n": 2}, cache=cache)
    second = await run_strategy("checklist-bon", POEM, gen, params={"n": 2}, cache=cache)
    assert first.usage.cache_misses > 0 and second.usage.cache_hits == first.usage.cache_misses
    assert len(gen.requests_where(is_judge)) == 2 * len(EIGHT)  # judged once per distinct candidate x item
