"""verified-bon against a scripted generator and scripted verifiers: who wins, when it
rewrites and with what feedback, and that a failing rewrite never displaces a better candidate."""

from __future__ import annotations

import pytest

from strategies import Budget, GenerationRequest, StrategyError, prompts, run_strategy
from strategies.verification import Verdict

from tests.scripted import ScriptedGenerator, is_refine, is_task_sample, match_template
from tests.scripted_verifiers import verification
from tests.test_strategies import MATH


def script(candidates: list[str], rewrite=lambda text, feedback: text + " fixed"):
    """Sample i is ``candidates[i]``; a REFINE request answers ``rewrite(response, feedback)``."""
    def respond(request: GenerationRequest, i: int) -> str:
        if (fields := match_template(request, prompts.REFINE)) is not None:
            return rewrite(fields["response"], fields["feedback"])
        return candidates[i]
    return respond


async def test_earliest_passing_candidate_wins_without_rewrites() -> None:
    gen = ScriptedGenerator(script(["bad a", "good b", "good c", "bad d"]))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 4},
                                verification=verification(lambda t: "good" in t))
    assert result.answer == "good b" and result.trace["passed"] and result.trace["chosen"] == 1
    assert len(gen.calls) == 1 and gen.calls[0][0].n == 4 and is_task_sample(gen.calls[0][0])
    assert result.trace["rounds"] == []
    assert [c["passed"] for c in result.trace["candidates"]] == [False, True, True, False]


async def test_best_failing_candidates_are_rewritten_with_their_feedback_until_one_passes() -> None:
    def partial(text: str) -> Verdict:
        return Verdict("fixed" in text, 1.0 if "fixed" in text else (0.6 if "close" in text else 0.1),
                       "" if "fixed" in text else f"{text} is wrong")

    gen = ScriptedGenerator(script(["far a", "close b", "far c", "close d"]))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 4, "rewrites": 2, "rounds": 3},
                                verification=verification(partial))
    # Round 1 rewrote the two best failing (the "close" ones, earliest first) in ONE batch.
    assert len(gen.calls) == 2
    rewrites = gen.calls[1]
    assert len(rewrites) == 2 and all(is_refine(r) for r in rewrites)
    fields = [match_template(r, prompts.REFINE) for r in rewrites]
    assert [f["response"] for f in fields] == ["close b", "close d"]
    assert "[check0] close b is wrong" in fields[0]["feedback"]
    assert result.trace["rounds"] == [{"round": 1, "rewrote": [1, 3], "passed": [True, True]}]
    assert result.answer == "close b fixed" and result.trace["chosen"] == 4 and result.trace["passed"]


async def test_a_failing_rewrite_never_replaces_a_better_candidate() -> None:
    # Two checks; "half" passes one of them, rewrites pass none.
    checks = verification(lambda t: "half" in t and "worse" not in t, lambda t: False)
    gen = ScriptedGenerator(script(["none", "half"], rewrite=lambda text, fb: "worse"))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 2, "rounds": 2, "rewrites": 1},
                                verification=checks)
    assert result.answer == "half" and not result.trace["passed"]
    assert result.trace["stop"] == "rounds spent, none passes"
    assert [r["rewrote"] for r in result.trace["rounds"]] == [[1], [1]]  # the best failing one, each round


async def test_identical_failing_texts_are_rewritten_once() -> None:
    gen = ScriptedGenerator(script(["same", "same", "other"]))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 3, "rounds": 1, "rewrites": 3},
                                verification=verification(lambda t: False))
    assert [match_template(r, prompts.REFINE)["response"] for r in gen.calls[1]] == ["same", "other"]
    assert not result.trace["passed"]


async def test_verified_bon_needs_verifiers() -> None:
    with pytest.raises(StrategyError) as caught:
        await run_strategy("verified-bon", MATH, ScriptedGenerator(script(["a"])), params={"n": 1})
    assert caught.value.field == "verify"


async def test_budget_stop_returns_the_best_candidate_so_far() -> None:
    gen = ScriptedGenerator(script(["bad", "better"]))
    checks = verification(lambda t: Verdict(False, 0.5 if "better" in t else 0.0, "no"))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 2, "rounds": 3},
                                verification=checks, budget=Budget(max_calls=1))
    assert result.budget_limited and result.answer == "better"
