"""A sample cut off by max_tokens (``finish_reason == "length"``) is an unfinished text: its
last number is wherever the cut fell, and a 135M chat model's cut-off samples are mostly
repetition loops. Votes do not read answers into them, and selection prefers finished
candidates (found by the README demo: self-consistency, checklist-bon and self-refine all
returned the same looping, cut-off sample of the apples question)."""

from __future__ import annotations

from typing import Sequence

import pytest

from strategies import Choice, GenerationRequest, prompts, run_strategy
from strategies.answers import extract_answer

from tests.scripted import ScriptedGenerator, is_checklist, match_template
from tests.test_strategies import MATH, feedback

LOOP = "Tom has 3 apples - 2 apples = 1 apple left.\nTom has 2 apples - 1 apple = 2 apples.\nTom has 4 apples -"


@pytest.mark.parametrize("fmt", ["auto", "numeric", "text"])
def test_a_cut_off_text_states_no_answer_by_fallback(fmt: str) -> None:
    assert extract_answer(LOOP, fmt) is not None  # finished, the fallback reads one
    assert extract_answer(LOOP, fmt, cut_off=True) is None


@pytest.mark.parametrize("text, fmt, expected", [
    ("The answer is 5. Then Tom has 4 apples -", "auto", "5"),
    ("#### 5\nTom has 4 apples -", "numeric", "5"),
    (r"So \boxed{5}, and Tom has 4 apples -", "auto", "5"),
    ("The answer is: Paris\nIt is a city of", "text", "paris"),
    (" 5\nQ: Tom has 4 apples -", "first_number", "5"),
    ("The answer is (B). A. Lyon is", "choice", "B"),
])
def test_a_cut_off_text_keeps_the_answer_it_states(text: str, fmt: str, expected: str) -> None:
    assert extract_answer(text, fmt, cut_off=True) == expected


def sampled(texts: Sequence[tuple[str, str]]):
    """Sample i is ``texts[i]``: (text, finish_reason)."""
    def respond(request: GenerationRequest, i: int) -> Choice:
        text, finish = texts[i % len(texts)]
        return Choice(text, finish_reason=finish)
    return respond


async def test_sc_cut_off_samples_do_not_vote_for_where_they_were_cut() -> None:
    texts = [(LOOP, "length"), (LOOP, "length"), (LOOP, "length"),
             ("3 + 2 = 5. The answer is 5.", "stop"), ("He has 5 apples.", "stop")]
    gen = ScriptedGenerator(sampled(texts))
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 5})
    assert result.answer == "3 + 2 = 5. The answer is 5."  # the old code voted 4 three times
    assert [row["answer"] for row in result.trace["samples"]] == [None, None, None, "5", "5"]
    assert [row["cut_off"] for row in result.trace["samples"]] == [True, True, True, False, False]


async def test_sc_winning_answer_shows_a_finished_sample() -> None:
    texts = [("The answer is 5. Tom has 3 apples - 2 apples = 1 apple. Tom has", "length"),
             ("Three and two make 5. The answer is 5.", "stop"), ("The answer is 4.", "stop")]
    gen = ScriptedGenerator(sampled(texts))
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 3})
    assert result.answer == "Three and two make 5. The answer is 5."  # not the first, cut-off voter


async def test_sc_without_any_stated_answer_returns_a_finished_sample() -> None:
    gen = ScriptedGenerator(sampled([(LOOP, "length"), ("Hello there", "stop")]))
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 2, "answer_format": "numeric"})
    assert result.answer == "Hello there"


async def test_auto_cut_off_samples_do_not_vote() -> None:
    gen = ScriptedGenerator(sampled([(LOOP, "length"), (LOOP, "length"), ("The answer is 5.", "stop"),
                                     ("The answer is 5.", "stop")]))
    result = await run_strategy("auto", MATH, gen, params={"max_samples": 8})
    assert result.answer == "The answer is 5."  # the old code tied 4 and 5, 4 first
    assert [row["answer"] for row in result.trace["votes"]] == ["5"]


async def test_best_of_n_prefers_a_finished_candidate_over_a_better_rated_cut_off_one() -> None:
    texts = [(LOOP, "length"), ("He has 5 apples.", "stop"), ("He has 6 apples.", "stop")]
    ratings = {LOOP: " 9", "He has 5 apples.": " 7", "He has 6 apples.": " 3"}

    def respond(request: GenerationRequest, i: int) -> Choice:
        if (fields := match_template(request, prompts.SCORE)) is not None:
            return Choice(ratings[fields["response"]], finish_reason="stop")
        return sampled(texts)(request, i)

    result = await run_strategy("best-of-n", MATH, ScriptedGenerator(respond), params={"n": 3})
    assert result.answer == "He has 5 apples."
    assert [c["cut_off"] for c in result.trace["candidates"]] == [True, False, False]


async def test_best_of_n_with_every_candidate_cut_off_goes_by_the_rating() -> None:
    texts = [(LOOP, "length"), (LOOP + " 1", "length")]
    ratings = {LOOP: " 2", LOOP + " 1": " 8"}

    def respond(request: GenerationRequest, i: int) -> Choice:
        if (fields := match_template(request, prompts.SCORE)) is not None:
            return Choice(ratings[fields["response"]], finish_reason="stop")
        return sampled(texts)(request, i)

    result = await run_strategy("best-of-n", MATH, ScriptedGenerator(respond), params={"n": 2})
    assert result.answer == LOOP + " 1"


async def test_checklist_bon_prefers_a_finished_candidate() -> None:
    texts = [(LOOP, "length"), ("He has 5 apples.", "stop")]

    def respond(request: GenerationRequest, i: int) -> Choice:
        if is_checklist(request):
            return Choice(" Is the count right?\n2. Is it short?\n", finish_reason="stop")
        if (fields := match_template(request, prompts.JUDGE_ITEM)) is not None:
            passed = fields["response"] == LOOP or fields["item"] == "Is the count right?"
            return Choice(" YES" if passed else " NO", finish_reason="stop")
        return sampled(texts)(request, i)

    result = await run_strategy("checklist-bon", MATH, ScriptedGenerator(respond), params={"n": 2, "refine": False})
    assert result.answer == "He has 5 apples."  # the cut-off loop passed both items, the finished one
    assert [c["cut_off"] for c in result.trace["candidates"]] == [True, False]


async def test_self_refine_keeps_a_finished_rewrite_over_a_better_scored_cut_off_draft() -> None:
    scores = {LOOP: 8, "He has 5 apples.": 6}

    def respond(request: GenerationRequest, i: int) -> Choice:
        if (fields := match_template(request, prompts.FEEDBACK)) is not None:
            return Choice(feedback(scores[fields["response"]]), finish_reason="stop")
        if match_template(request, prompts.REFINE) is not None:
            return Choice("He has 5 apples.", finish_reason="stop")
        return Choice(LOOP, finish_reason="length")

    result = await run_strategy("self-refine", MATH, ScriptedGenerator(respond), params={"max_rounds": 1})
    assert result.answer == "He has 5 apples."  # the old code kept the draft, scored 8
