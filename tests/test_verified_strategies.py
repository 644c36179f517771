"""Existing strategies with ``verify`` (scripted backend, scripted verifiers): the selection
rule (passing candidates win, the strategy's rule among them, else the best report) and the
refinement rule (verifier feedback joins the critique, stop once a version passes, a
version passing fewer checks never replaces one passing more)."""

from __future__ import annotations

import asyncio

from strategies import GenerationRequest, prompts, run_strategy
from strategies.verification import Verdict, Verification

from tests.scripted import ScriptedGenerator, is_critique, is_feedback, is_refine, is_score, match_template
from tests.scripted_verifiers import ScriptedVerifier, verification
from tests.test_best_of_n import CANDIDATES as BON_CANDIDATES, rated, rating_script
from tests.test_strategies import (
    CANDIDATES, MATH, POEM, bon_script, bump, feedback, refine_script,
)


# -- selection ------------------------------------------------------------------------------


def sc_script(texts: list[str]):
    return lambda request, i: texts[i]


async def test_self_consistency_votes_among_the_passing_samples() -> None:
    texts = ["The answer is 4.", "The answer is 4!", "The answer is 4", "The answer is 5", "5 is the answer 5",
             "The answer is 6", "The answer is 6."]
    # Majority is 4 (3 votes); only samples mentioning "is" and an even 6 or the 5s pass.
    checks = verification(lambda t: "5" in t or "6" in t)
    result = await run_strategy("self-consistency", MATH, ScriptedGenerator(sc_script(texts)), params={"k": 7},
                                verification=checks)
    # Passing: 5, 5, 6, 6 -> a tie in votes goes to the answer seen first among the passing: 5.
    assert result.answer == "The answer is 5"
    assert result.trace["verification"]["passed"] and result.trace["verification"]["overrode"]
    assert result.trace["votes"][0]["answer"] == "4"  # the plain vote is still reported


async def test_self_consistency_without_a_passing_sample_takes_the_best_report() -> None:
    texts = ["The answer is 4", "The answer is 4", "The answer is 7"]
    checks = verification(lambda t: Verdict(False, 0.8 if "7" in t else 0.1, "no"))
    result = await run_strategy("self-consistency", MATH, ScriptedGenerator(sc_script(texts)), params={"k": 3},
                                verification=checks)
    assert result.answer == "The answer is 7" and not result.trace["verification"]["passed"]


async def test_self_consistency_with_every_sample_passing_keeps_its_majority() -> None:
    texts = ["The answer is 4", "The answer is 5", "The answer is 4"]
    result = await run_strategy("self-consistency", MATH, ScriptedGenerator(sc_script(texts)), params={"k": 3},
                                verification=verification(lambda t: True))
    assert result.answer == "The answer is 4" and not result.trace["verification"]["overrode"]


async def test_best_of_n_prefers_passing_candidates_and_verifies_while_rating() -> None:
    in_flight: list[int] = []

    class Slow(ScriptedVerifier):
        async def verify(self, text: str) -> Verdict:
            in_flight.append(gen.in_flight)  # backend calls running while this check starts
            await asyncio.sleep(0.02)
            return await super().verify(text)

    gen = ScriptedGenerator(rating_script(BON_CANDIDATES, rated(5, 9, 3, 7)), delay=0.02)
    checks = Verification([Slow(lambda t: t in ("answer two", "answer three"))])
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4}, verification=checks)
    assert result.answer == "answer three"  # rated 7 beats the passing "answer two" rated 3
    assert result.trace["chosen"] == 3 and result.trace["verification"]["overrode"]
    # Every check started while the rating batch was in flight.
    assert in_flight == [1, 1, 1, 1] and len(gen.calls) == 2 and all(is_score(r) for r in gen.calls[1])


async def test_checklist_bon_prefers_passing_candidates() -> None:
    verdicts = {"poem zero": "YYY", "poem one": "YNN", "poem two": "NNN", "poem three": "YYN"}
    gen = ScriptedGenerator(bon_script(CANDIDATES, verdicts))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4},
                                verification=verification(lambda t: t in ("poem one", "poem two")))
    assert result.answer == "poem one" and result.trace["verification"]["chosen"] == 1


# -- refinement -----------------------------------------------------------------------------


async def test_stick_rewrites_a_perfect_checklist_winner_that_fails_a_check_and_keeps_a_passing_rewrite() -> None:
    verdicts = {"poem zero": "YYY", "poem one": "YNN", "rewritten poem": "YNN"}
    gen = ScriptedGenerator(bon_script(CANDIDATES[:2], verdicts))
    checks = verification(lambda t: Verdict(t == "rewritten poem", float(t == "rewritten poem"), "needs a title"))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "refine": True}, verification=checks)
    # The rewrite scores lower on the checklist but passes the check: kept.
    assert result.answer == "rewritten poem" and result.trace["refine"]["kept"]
    (refine,) = gen.requests_where(is_refine)
    assert "[check0] needs a title" in match_template(refine, prompts.REFINE)["feedback"]


async def test_stick_never_keeps_a_rewrite_passing_fewer_checks() -> None:
    verdicts = {"poem zero": "YNN", "poem one": "NNN", "rewritten poem": "YYY"}
    gen = ScriptedGenerator(bon_script(CANDIDATES[:2], verdicts))
    checks = verification(lambda t: t != "rewritten poem", lambda t: False)  # the rewrite passes 0 of 2, winner 1
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "refine": True}, verification=checks)
    assert result.answer == "poem zero" and not result.trace["refine"]["kept"]


async def test_self_refine_stops_as_soon_as_a_version_passes_even_if_the_critic_says_revise() -> None:
    gen = ScriptedGenerator(refine_script(lambda r: feedback(2)))
    checks = verification(lambda t: Verdict(t == "Answer v2", float(t == "Answer v2"), f"{t} misses the units"))
    result = await run_strategy("self-refine", MATH, gen, params={"max_rounds": 5}, verification=checks)
    assert result.answer == "Answer v2"
    chain = result.trace["chains"][0]
    assert [v["text"] for v in chain] == ["Answer v0", "Answer v1", "Answer v2"]
    assert chain[-1]["stop"] == "passes every verifier" and chain[-1]["verification"]["passed"]
    refines = gen.requests_where(is_refine)
    assert len(refines) == 2
    fb = match_template(refines[0], prompts.REFINE)["feedback"]
    assert "[check0] Answer v0 misses the units" in fb and "could be clearer" in fb  # joined with the critique


async def test_self_refine_ignores_done_while_a_check_fails() -> None:
    gen = ScriptedGenerator(refine_script(lambda r: feedback(10, done=True)))
    result = await run_strategy("self-refine", MATH, gen, params={"max_rounds": 2},
                                verification=verification(lambda t: False))
    assert len(result.trace["chains"][0]) == 3 and result.trace["chains"][0][-1]["stop"] == "max rounds"


async def test_self_refine_never_returns_a_version_passing_fewer_checks() -> None:
    # v1 passes one of two checks; v2 and v3 pass none but get higher self-scores.
    scores = {"Answer v0": 3, "Answer v1": 4, "Answer v2": 9, "Answer v3": 9}
    gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r])))
    checks = verification(lambda t: t == "Answer v1", lambda t: False)
    result = await run_strategy("self-refine", MATH, gen, params={"max_rounds": 3, "stop_score": 10},
                                verification=checks)
    assert result.answer == "Answer v1"


async def test_mcts_refine_uses_the_verifier_score_as_value_and_stops_once_an_answer_passes() -> None:
    def respond(request: GenerationRequest, i: int) -> str:
        if is_critique(request):
            return f"critique {i}"
        if (fields := match_template(request, prompts.REFINE)) is not None:
            return bump(fields["response"])
        return "Answer v0"

    gen = ScriptedGenerator(respond)
    checks = verification(lambda t: Verdict(t == "Answer v2", {"Answer v0": 0.2, "Answer v1": 0.5}.get(t, 1.0),
                                            f"{t} is incomplete"))
    result = await run_strategy("mcts", MATH, gen, params={"mode": "refine", "simulations": 8, "branching": 1},
                                verification=checks)
    assert result.answer == "Answer v2" and result.trace["verification"]["passed"]
    assert result.trace["stop"] == "an answer passes every verifier"
    assert not gen.requests_where(lambda r: match_template(r, prompts.REWARD) is not None)  # no self-rewards
    assert len(gen.requests_where(is_critique)) == 2  # two expansions, then it stopped (of 8 simulations)
    first_rewrite = gen.requests_where(is_refine)[0]
    fb = match_template(first_rewrite, prompts.REFINE)["feedback"]
    assert "critique 0" in fb and "[check0] Answer v0 is incomplete" in fb
    assert not any(is_feedback(r) for r in gen.requests)


async def test_the_baseline_reports_its_answer_verdicts() -> None:
    gen = ScriptedGenerator(lambda request, i: "plain answer")
    result = await run_strategy("none", MATH, gen, verification=verification(lambda t: False))
    assert result.answer == "plain answer" and result.trace["verification"]["passed"] is False
    assert result.trace["verification"]["verdicts"]["check0"]["feedback"] == "check0 fails"


async def test_mcts_steps_picks_a_passing_finished_solution() -> None:
    def respond(request: GenerationRequest, i: int) -> str:
        if match_template(request, prompts.STEP_SCORE) is not None:
            return " 9" if i == 0 else " 8"
        return ["The answer is 41.", "The answer is 42."][i]

    gen = ScriptedGenerator(respond)
    result = await run_strategy("mcts", MATH, gen, params={"mode": "steps", "simulations": 1, "branching": 2},
                                verification=verification(lambda t: "42" in t))
    assert result.answer == "The answer is 42."
    assert result.trace["verification"]["passed"] and result.trace["verification"]["overrode"]
