"""A strategy survives failed calls: with some backend calls failed for good (the
backend's retries spent), every strategy carries on without the lost sample or
judgment, says so in ``trace["failed_calls"]``, and raises the backend's own error
only when nothing usable is left. Scripted backends; the HTTP path is in
``test_fault_scenarios.py``."""

from __future__ import annotations

from typing import Callable

import pytest

from service.backends import BackendError, UpstreamError
from strategies import Budget, Choice, GenerationRequest, Task, prompts, run_strategy

from tests.scripted import (
    DictCache,
    ScriptedGenerator,
    is_checklist,
    is_critique,
    is_feedback,
    is_judge,
    is_refine,
    is_reward,
    is_score,
    is_select,
    is_task_sample,
    match_template,
)
from tests.test_best_of_n import CANDIDATES as RATED_CANDIDATES, rated, rating_script
from tests.test_strategies import (
    CANDIDATES,
    ITEMS,
    MATH,
    POEM,
    answers_script,
    bon_script,
    feedback,
    mcts_refine_script,
    refine_script,
)

pytestmark = pytest.mark.asyncio


def upstream_500() -> UpstreamError:
    return UpstreamError(500, {"error": {"message": "engine crashed", "type": "server_error", "code": 500}})


def failing(respond: Callable[[GenerationRequest, int], "str | Choice"],
            fails: Callable[[GenerationRequest], bool],
            error: Callable[[], Exception] = upstream_500):
    """``respond``, except that requests matching ``fails`` fail for good."""
    def script(request: GenerationRequest, i: int) -> "str | Choice":
        if fails(request):
            raise error()
        return respond(request, i)
    return script


def assert_failures_reported(result, count: int, status: int | None = 500) -> None:
    failed = result.trace["failed_calls"]
    assert len(failed) == count
    assert all(f == {"error": "UpstreamError", "status": status} for f in failed)


# == best-of-n ========================================================================


def rates(text: str) -> Callable[[GenerationRequest], bool]:
    return lambda r: (fields := match_template(r, prompts.SCORE)) is not None and fields["response"] == text


@pytest.mark.parametrize("params, cache", [({"n": 4}, DictCache()), ({"n": 4}, None),
                                           ({"n": 4, "judge_samples": 2}, None)])
async def test_best_of_n_drops_a_candidate_whose_rating_failed(params, cache) -> None:
    ratings = rated(5, 9, 3, 7) if "judge_samples" not in params else {
        text: [f" {s}", f" {s}"] for text, s in zip(RATED_CANDIDATES, (5, 9, 3, 7))}
    gen = ScriptedGenerator(failing(rating_script(RATED_CANDIDATES, ratings), rates("answer one")))
    result = await run_strategy("best-of-n", MATH, gen, params=params, cache=cache)
    # The best-rated candidate lost its rating: it is left out, not scored 0, and the
    # best of the rated ones wins.
    assert result.answer == "answer three" and result.trace["chosen"] == 3
    rows = result.trace["candidates"]
    assert rows[1]["score"] is None and rows[1]["scores"] is None
    assert [r["score"] for r in rows if r["score"] is not None] == [0.5, 0.3, 0.7]
    assert result.trace["unrated"] == 1 and result.trace["unparsed"] == 0
    assert_failures_reported(result, 1)
    assert result.usage.backend_calls == 5  # the failed call is still a call


async def test_best_of_n_raises_the_backend_error_when_no_candidate_is_rated() -> None:
    gen = ScriptedGenerator(failing(rating_script(RATED_CANDIDATES, rated(5, 9, 3, 7)), is_score))
    with pytest.raises(UpstreamError) as caught:
        await run_strategy("best-of-n", MATH, gen, params={"n": 4})
    assert caught.value.status_code == 500


async def test_best_of_n_raises_when_the_candidates_fail() -> None:
    gen = ScriptedGenerator(failing(rating_script(RATED_CANDIDATES, rated(5, 9, 3, 7)), is_task_sample,
                                    lambda: BackendError("backend unreachable", status_code=503)))
    with pytest.raises(BackendError, match="unreachable"):
        await run_strategy("best-of-n", MATH, gen, params={"n": 4})


# == checklist best-of-N ================================================================


def judges(text: str, item: str) -> Callable[[GenerationRequest], bool]:
    def match(r: GenerationRequest) -> bool:
        fields = match_template(r, prompts.JUDGE_ITEM)
        return fields is not None and fields["response"] == text and fields["item"] == item
    return match


async def test_checklist_bon_leaves_a_missing_verdict_out_of_the_score() -> None:
    # poem one passes 2 of 3; poem two passes the 2 judged, its third judgment failed.
    # Counted as NO it would tie at 2/3 and lose to the earlier poem one.
    verdicts = {"poem zero": "YNN", "poem one": "YYN", "poem two": "YYN", "poem three": "NNN"}
    gen = ScriptedGenerator(failing(bon_script(CANDIDATES, verdicts), judges("poem two", ITEMS[2])))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4}, cache=DictCache())
    assert result.answer == "poem two" and result.trace["chosen"] == 2
    row = result.trace["candidates"][2]
    assert row["verdicts"] == [True, True, "missing"] and row["missing"] == 1 and row["score"] == 1.0
    assert result.trace["candidates"][1]["score"] == pytest.approx(2 / 3, abs=1e-4)
    assert result.trace["missing_verdicts"] == 1
    assert_failures_reported(result, 1)


async def test_checklist_bon_drops_a_candidate_with_no_verdict_and_raises_with_none() -> None:
    verdicts = {"poem zero": "YNN", "poem one": "YYN", "poem two": "YYY", "poem three": "NNN"}
    gen = ScriptedGenerator(failing(bon_script(CANDIDATES, verdicts),
                                    lambda r: is_judge(r) and "poem two" in match_template(r, prompts.JUDGE_ITEM)["response"]))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4}, cache=None)
    assert result.answer == "poem one"
    assert result.trace["candidates"][2]["score"] is None and result.trace["candidates"][2]["missing"] == 3
    assert_failures_reported(result, 3)

    gen = ScriptedGenerator(failing(bon_script(CANDIDATES, verdicts), is_judge))
    with pytest.raises(UpstreamError):
        await run_strategy("checklist-bon", POEM, gen, params={"n": 4}, cache=DictCache())


async def test_checklist_bon_falls_back_to_the_instruction_when_the_checklist_call_fails() -> None:
    def respond(request: GenerationRequest, i: int) -> str:
        if is_judge(request):
            return " YES" if match_template(request, prompts.JUDGE_ITEM)["response"] == "poem one" else " NO"
        return CANDIDATES[i]

    cache = DictCache()
    gen = ScriptedGenerator(failing(respond, is_checklist))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4}, cache=cache)
    assert result.answer == "poem one"
    (item,) = result.trace["checklist"]
    assert item["item"].startswith("Does the response fully follow the instruction")
    assert_failures_reported(result, 1)
    assert "checklist" not in cache.kinds()  # a failure is never cached


async def test_checklist_bon_keeps_the_winner_when_the_rewrite_fails() -> None:
    verdicts = {"poem zero": "YNN", "poem one": "YYN", "poem two": "NNN", "poem three": "NNN"}
    gen = ScriptedGenerator(failing(bon_script(CANDIDATES, verdicts), is_refine))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4, "refine": True})
    assert result.answer == "poem one"
    assert result.trace["refine"] == {"failed": True, "kept": False}
    assert_failures_reported(result, 1)


# == self-consistency ===================================================================


async def test_self_consistency_votes_over_the_samples_drawn() -> None:
    def respond(request: GenerationRequest, i: int) -> Choice:
        return Choice(f"The answer is {41 if request.n == 4 else 42}.", finish_reason="stop")

    gen = ScriptedGenerator(failing(respond, lambda r: r is gen.calls[0][0]))  # the first n=8 request fails
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 20, "n_per_request": 8})
    # One of the two n=8 requests failed: 8 + 4 samples vote; 42 still wins 8 to 4.
    assert result.trace["samples_used"] == 12 and result.trace["samples_missing"] == 8
    assert result.answer == "The answer is 42."
    assert sum(row["votes"] for row in result.trace["votes"]) == 12
    assert_failures_reported(result, 1)


async def test_self_consistency_raises_with_no_sample_and_stops_early_after_a_failed_wave() -> None:
    gen = ScriptedGenerator(failing(answers_script(["42"] * 8), is_task_sample))
    with pytest.raises(UpstreamError):
        await run_strategy("self-consistency", MATH, gen, params={"k": 8})

    gen = ScriptedGenerator(failing(lambda r, i: f"The answer is {42 if i % 2 else 41}.",
                                    lambda r: len(gen.calls) == 2))  # the second wave fails
    result = await run_strategy("self-consistency", MATH, gen,
                                params={"k": 12, "adaptive": True, "wave_size": 4})
    assert result.trace["stop"] == "sampling failed" and result.trace["samples_used"] == 4
    assert result.answer == "The answer is 41."  # 2-2 tie: the answer seen first
    assert_failures_reported(result, 1)


async def test_self_consistency_falls_back_to_the_vote_when_the_selection_fails() -> None:
    gen = ScriptedGenerator(failing(answers_script(["7", "42", "42"]), is_select))
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 3, "aggregate": "llm"},
                                cache=DictCache())
    assert result.answer.startswith("Path 1:")  # the vote winner's representative
    assert result.trace["usc"] == {"failed": True, "selected": None}
    assert_failures_reported(result, 1)


# == self-refine ========================================================================


async def test_self_refine_ends_only_the_chain_whose_feedback_failed() -> None:
    def feedback_for(response: str) -> str:
        return feedback(6) if response == "Draft A v0" else feedback(9)

    gen = ScriptedGenerator(failing(refine_script(feedback_for, drafts=("Draft A v0", "Draft B v0")),
                                    lambda r: is_feedback(r) and "Draft B v0" in r.messages[-1]["content"]))
    result = await run_strategy("self-refine", MATH, gen, params={"chains": 2, "max_rounds": 2}, cache=DictCache())
    chain_b = result.trace["chains"][1]
    assert chain_b == [{"round": 0, "text": "Draft B v0", "score": None, "issues": [], "done": False,
                        "stop": "feedback failed"}]
    assert result.answer == "Draft A v1"  # chain A went on: v0 scored 6, v1 scored 9
    assert_failures_reported(result, 1)


async def test_self_refine_keeps_the_best_version_when_a_refinement_fails() -> None:
    gen = ScriptedGenerator(failing(refine_script(lambda response: feedback(4)), is_refine))
    result = await run_strategy("self-refine", MATH, gen, params={"max_rounds": 3})
    assert result.answer == "Answer v0"
    assert result.trace["chains"][0][-1]["stop"] == "refine failed"
    assert_failures_reported(result, 1)


async def test_self_refine_raises_when_no_version_got_feedback() -> None:
    gen = ScriptedGenerator(failing(refine_script(lambda response: feedback(4), drafts=("A v0", "B v0")),
                                    is_feedback))
    with pytest.raises(UpstreamError):
        await run_strategy("self-refine", MATH, gen, params={"chains": 2})


# == mcts ===============================================================================


def collect(tree: dict) -> dict[str, dict]:
    nodes = {tree["state"]["text"]: tree}
    for child in tree["children"]:
        nodes.update(collect(child))
    return nodes


async def test_mcts_refine_leaves_failed_children_out_and_searches_on() -> None:
    # Rewriting with critique 1 fails everywhere; rewarding "draft/0/0" fails.
    def fails(request: GenerationRequest) -> bool:
        if (fields := match_template(request, prompts.REFINE)) is not None:
            return fields["feedback"].endswith("critique 1")
        if (fields := match_template(request, prompts.REWARD)) is not None:
            return fields["response"] == "draft/0/0"
        return False

    gen = ScriptedGenerator(failing(mcts_refine_script, fails))
    result = await run_strategy("mcts", MATH, gen, params={
        "mode": "refine", "simulations": 6, "branching": 2, "value_samples": 2, "max_depth": 2})
    nodes = collect(result.trace["tree"])
    assert "draft/0" in nodes and "draft/1" not in nodes and "draft/0/0" not in nodes
    assert result.answer == "draft/0"  # the best Q' among the nodes that could be written and rewarded
    failed = result.trace["failed_calls"]
    assert len(failed) >= 3 and all(f["status"] == 500 for f in failed)
    assert "failed backend call" in result.stop_reason and not result.budget_limited


async def test_mcts_refine_returns_the_draft_when_every_expansion_fails() -> None:
    gen = ScriptedGenerator(failing(mcts_refine_script, is_critique))
    result = await run_strategy("mcts", MATH, gen, params={"mode": "refine", "simulations": 4})
    assert result.answer == "draft" and result.trace["tree"]["children"] == []
    assert_failures_reported(result, 1)  # a dead end is not expanded again

    gen = ScriptedGenerator(failing(mcts_refine_script, is_reward))
    with pytest.raises(UpstreamError):  # not even the draft could be rewarded
        await run_strategy("mcts", MATH, gen, params={"mode": "refine", "simulations": 4})


async def test_mcts_steps_survives_a_failed_expansion() -> None:
    task = Task(prompt="Q: What is 3 + 4?\nA:")

    def respond(request: GenerationRequest, i: int) -> Choice:
        if is_score(request) or match_template(request, prompts.STEP_SCORE) is not None:
            return Choice(" 7", finish_reason="stop")
        prefix = request.prompt[len(task.prompt):]
        if prefix == "":
            return Choice([" Add them.", " Count up."][i], finish_reason="stop", stop_reason="\n")
        return Choice(" The answer is 7.", finish_reason="stop", stop_reason="\n")

    gen = ScriptedGenerator(failing(respond, lambda r: r.prompt is not None and r.prompt.endswith(" Add them.\n")))
    result = await run_strategy("mcts", task, gen, params={"mode": "steps", "simulations": 6, "branching": 2,
                                                           "max_depth": 3})
    assert result.answer == " Count up.\n The answer is 7."
    assert_failures_reported(result, 1)


# == budget and cancellation still stop a run ============================================


async def test_a_budget_stop_is_not_a_failed_call() -> None:
    gen = ScriptedGenerator(rating_script(RATED_CANDIDATES, rated(5, 9, 3, 7)))
    result = await run_strategy("best-of-n", MATH, gen, params={"n": 4}, budget=Budget(max_calls=2))
    assert result.budget_limited and "failed_calls" not in result.trace


# == auto ===============================================================================


async def test_auto_ends_sampling_at_a_failed_wave_and_raises_without_a_first_one() -> None:
    from tests.test_auto import waves

    answers = ["The answer is 42", "The answer is 41", "The answer is 42", "The answer is 40"] + \
              ["The answer is 42"] * 12
    gen = ScriptedGenerator(failing(waves(*answers), lambda r: len(gen.calls) == 2))  # the second wave fails
    result = await run_strategy("auto", MATH, gen, params={"max_samples": 16, "wave_size": 4})
    assert result.answer == "The answer is 42" and result.trace["samples_used"] == 4
    assert result.trace["path"][1] == {"stage": "more samples", "samples": 0, "why": "sampling failed"}
    assert_failures_reported(result, 1)

    gen = ScriptedGenerator(failing(waves(*answers), is_task_sample))
    with pytest.raises(UpstreamError):
        await run_strategy("auto", MATH, gen)


async def test_auto_leaves_a_failed_rewrite_out() -> None:
    from strategies.verification import Verdict
    from tests.scripted_verifiers import verification
    from tests.test_auto import waves

    answers = ["The answer is 1", "The answer is 2", "The answer is 1", "The answer is 3"] * 2

    def judge(text: str) -> Verdict:
        ok = "(fixed)" in text and "2" in text
        return Verdict(ok, 1.0 if ok else 0.3, "" if ok else "show the units")

    def fails(request: GenerationRequest) -> bool:  # rewriting "The answer is 1" fails
        fields = match_template(request, prompts.REFINE)
        return fields is not None and fields["response"] == "The answer is 1"

    gen = ScriptedGenerator(failing(waves(*answers), fails))
    result = await run_strategy("auto", MATH, gen, params={"max_samples": 8, "refine_width": 2},
                                verification=verification(judge))
    assert result.answer == "The answer is 2 (fixed)"
    rewrites = [row for row in result.trace["samples"] if "from" in row]
    assert len(rewrites) == 1 and rewrites[0]["from"] is not None
    assert_failures_reported(result, 1)


# == verified-bon =======================================================================


async def test_verified_bon_leaves_a_failed_rewrite_out_and_ends_when_every_rewrite_fails() -> None:
    from strategies.verification import Verdict
    from tests.scripted_verifiers import verification
    from tests.test_verified_bon import script

    def partial(text: str) -> Verdict:
        return Verdict("fixed" in text, 1.0 if "fixed" in text else (0.6 if "close" in text else 0.1),
                       "" if "fixed" in text else f"{text} is wrong")

    def rewriting(response: str) -> Callable[[GenerationRequest], bool]:
        return lambda r: (fields := match_template(r, prompts.REFINE)) is not None and fields["response"] == response

    gen = ScriptedGenerator(failing(script(["far a", "close b", "far c", "close d"]), rewriting("close b")))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 4, "rewrites": 2, "rounds": 3},
                                verification=verification(partial))
    assert result.trace["rounds"] == [{"round": 1, "rewrote": [3], "passed": [True]}]
    assert result.answer == "close d fixed" and result.trace["passed"]
    assert_failures_reported(result, 1)

    gen = ScriptedGenerator(failing(script(["far a", "close b", "far c", "close d"]), is_refine))
    result = await run_strategy("verified-bon", MATH, gen, params={"n": 4, "rewrites": 2, "rounds": 3},
                                verification=verification(partial))
    assert result.trace["rounds"] == [{"round": 1, "rewrote": [], "passed": [], "stop": "every rewrite failed"}]
    assert result.answer == "close b" and not result.trace["passed"]
    assert_failures_reported(result, 2)


async def test_runs_waiting_on_a_shared_computation_that_failed_do_not_repeat_the_call() -> None:
    import asyncio

    from service.cache import MemoryCache

    cache = MemoryCache(100, {"checklist": 60, "critique": 60, "judgment": 60, "run": 60})
    def respond(request: GenerationRequest, i: int) -> str:
        return " YES" if is_judge(request) else CANDIDATES[i]

    gen = ScriptedGenerator(failing(respond, is_checklist), delay=0.02)
    first, second = await asyncio.gather(*(run_strategy("checklist-bon", POEM, gen, params={"n": 4}, cache=cache)
                                           for _ in range(2)))
    assert len(gen.requests_where(is_checklist)) == 1  # the waiter took the leader's failure
    for result in (first, second):
        assert_failures_reported(result, 1)
        assert result.trace["checklist"][0]["item"].startswith("Does the response fully follow the instruction")
