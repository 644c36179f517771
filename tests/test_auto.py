"""``auto`` against a scripted generator: it answers from the first wave when the wave
agrees or a sample passes every verifier, and escalates otherwise (more samples, then
verifier-guided refinement of the disagreeing answers), saying which path it took."""

from __future__ import annotations

import pytest

from strategies import GenerationRequest, StrategyError, prompts, run_strategy
from strategies.verification import Verdict

from tests.scripted import ScriptedGenerator, is_refine, is_task_sample, match_template
from tests.scripted_verifiers import verification
from tests.test_strategies import MATH


def waves(*answers: str, rewrite=lambda text, feedback: text + " (fixed)"):
    """Sample i of the whole run (across waves) answers ``answers[i]``; REFINE -> ``rewrite``."""
    drawn = []

    def respond(request: GenerationRequest, i: int) -> str:
        if (fields := match_template(request, prompts.REFINE)) is not None:
            return rewrite(fields["response"], fields["feedback"])
        drawn.append(i)
        return answers[len(drawn) - 1]
    return respond


async def test_an_agreeing_first_wave_answers_at_once() -> None:
    gen = ScriptedGenerator(waves(*["The answer is 42"] * 4))
    result = await run_strategy("auto", MATH, gen)
    assert result.answer == "The answer is 42"
    assert len(gen.calls) == 1 and gen.calls[0][0].n == 4 and is_task_sample(gen.calls[0][0])
    assert result.trace["path"] == [{"stage": "first wave", "samples": 4, "answer_now": True,
                                     "why": "100% of the first wave agree (>= 100%)"}]
    assert result.trace["decided_by"] == "first wave"


async def test_a_disagreeing_first_wave_escalates_until_the_vote_is_settled() -> None:
    answers = ["The answer is 42", "The answer is 41", "The answer is 42", "The answer is 40"] + \
              ["The answer is 42"] * 12
    gen = ScriptedGenerator(waves(*answers))
    result = await run_strategy("auto", MATH, gen, params={"max_samples": 16, "wave_size": 4})
    assert result.answer == "The answer is 42"
    first, more = result.trace["path"]
    assert first["answer_now"] is False and first["why"].startswith("only 50%")
    assert more["stage"] == "more samples" and more["why"].startswith("P(leader ahead)")
    assert 0 < more["samples"] < 12  # stopped before max_samples
    assert not gen.requests_where(is_refine)  # no refinement without an outside signal
    assert [r.n for batch in gen.calls for r in batch] == [4] + [4] * (more["samples"] // 4)


async def test_a_passing_sample_in_the_first_wave_answers_at_once() -> None:
    gen = ScriptedGenerator(waves("The answer is 1", "The answer is 2", "The answer is 3", "The answer is 4"))
    result = await run_strategy("auto", MATH, gen, verification=verification(lambda t: "3" in t))
    assert result.answer == "The answer is 3" and len(gen.calls) == 1
    assert result.trace["path"][0]["why"] == "a sample passes every verifier"


async def test_with_verifiers_agreement_alone_does_not_answer() -> None:
    answers = ["The answer is 5"] * 4 + ["The answer is 5", "The answer is 6", "The answer is 5", "The answer is 5"]
    gen = ScriptedGenerator(waves(*answers))
    result = await run_strategy("auto", MATH, gen, params={"max_samples": 8, "refine_rounds": 0},
                                verification=verification(lambda t: "6" in t))
    assert result.answer == "The answer is 6"
    assert [s["stage"] for s in result.trace["path"]] == ["first wave", "more samples"]
    assert result.trace["path"][1]["why"] == "a sample passes every verifier"


async def test_nothing_passing_leads_to_verifier_guided_refinement_of_the_disagreeing_answers() -> None:
    answers = ["The answer is 1", "The answer is 2", "The answer is 1", "The answer is 3"] * 2

    def judge(text: str) -> Verdict:
        ok = "(fixed)" in text and "2" in text
        return Verdict(ok, 1.0 if ok else 0.3, "" if ok else f"{text}: show the units")

    gen = ScriptedGenerator(waves(*answers))
    result = await run_strategy("auto", MATH, gen, params={"max_samples": 8, "refine_width": 2},
                                verification=verification(judge))
    assert [s["stage"] for s in result.trace["path"]] == ["first wave", "more samples", "refinement"]
    assert result.trace["path"][2] == {"stage": "refinement", "rounds": 1, "why": "a rewrite passes every verifier"}
    refines = gen.requests_where(is_refine)
    fields = [match_template(r, prompts.REFINE) for r in refines]
    # One rewrite per leading answer group (1 leads with 4 votes, then 2), in one batch.
    assert [f["response"] for f in fields] == ["The answer is 1", "The answer is 2"]
    assert "[check0] The answer is 1: show the units" in fields[0]["feedback"]
    assert len(gen.call_index(is_refine)) == 1
    assert result.answer == "The answer is 2 (fixed)" and result.trace["decided_by"] == "refinement"


async def test_first_wave_larger_than_max_samples_is_refused() -> None:
    with pytest.raises(StrategyError) as caught:
        await run_strategy("auto", MATH, ScriptedGenerator(waves("x")), params={"first_wave": 8, "max_samples": 4})
    assert "first_wave" in str(caught.value)
