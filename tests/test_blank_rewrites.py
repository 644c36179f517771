"""Rewrites in completion mode continue the task's own prompt, and a blank rewrite is never an
answer. Found by `ponder eval` on arith:200:1 (few-shot completion, stop "\\n"): the REFINE
prompt ended in a newline, the model's first token was a newline, so every rewrite was ""; the
135M model then scored "" 10/10, and self-refine and MCTSr returned "" on 12 of 12 and 11 of
11 items."""

from __future__ import annotations

from strategies import Choice, GenerationRequest, Task, prompts, run_strategy

from tests.scripted import ScriptedGenerator, is_checklist, is_critique, is_reward, match_template, refine_fields
from tests.scripted_verifiers import verification
from tests.test_strategies import MATH, feedback

FEW_SHOT = Task(prompt="2+3=5\n4+4=8\n6+1=", stop=("\n",), max_tokens=8)


def test_a_completion_mode_rewrite_continues_the_task_prompt() -> None:
    request = FEW_SHOT.refine_request("8", "Check the sum.", temperature=0.2)
    # No "Improved response:" cue between the feedback and the task (the real model answered it with a
    # blank line, see prompts.REFINE_CONTINUATION), and the task is not quoted twice.
    assert request.prompt == ("Improve the previous response using the feedback.\n\nPrevious response:\n8\n\n"
                              "Feedback:\nCheck the sum.\n\n2+3=5\n4+4=8\n6+1=")
    assert refine_fields(request) == {"task": FEW_SHOT.prompt, "response": "8", "feedback": "Check the sum."}
    assert request.stop == ("\n",) and request.max_tokens == 8


def blank_rewrites(draft: str, scores: dict[str, str]):
    """The draft, then "" for every rewrite; ``scores[text]`` is what any judge says of text."""
    def respond(request: GenerationRequest, i: int) -> str:
        if refine_fields(request) is not None:
            return ""
        if (fields := match_template(request, prompts.FEEDBACK)) is not None:
            return scores[fields["response"]]
        if is_critique(request):
            return "It is wrong."
        if is_reward(request):
            return " 10" if "Response:\n\n" in request.prompt + str(request.messages) else " 3"
        return draft
    return respond


async def test_self_refine_never_returns_a_blank_rewrite() -> None:
    gen = ScriptedGenerator(blank_rewrites("7", {"7": "no score here", "": feedback(10)}))
    result = await run_strategy("self-refine", FEW_SHOT, gen, params={"max_rounds": 2})
    assert result.answer == "7"  # the old code returned "", scored 10
    assert result.trace["chains"][0][-1]["stop"] == "blank rewrite"


async def test_mcts_refine_adds_no_blank_children() -> None:
    gen = ScriptedGenerator(blank_rewrites("7", {}))
    result = await run_strategy("mcts", FEW_SHOT, gen, params={"mode": "refine", "simulations": 2, "branching": 2})
    assert result.answer == "7"
    assert result.trace["tree"]["children"] == []


async def test_verified_bon_leaves_out_a_blank_rewrite() -> None:
    def respond(request: GenerationRequest, i: int) -> str:
        return "" if refine_fields(request) is not None else "wrong answer"

    # The check passes anything without "wrong" in it, the blank text too.
    result = await run_strategy("verified-bon", MATH, ScriptedGenerator(respond), params={"n": 2, "rounds": 1},
                                verification=verification(lambda t: "wrong" not in t))
    assert result.answer == "wrong answer" and not result.trace["passed"]


async def test_stick_keeps_the_winner_over_a_blank_rewrite() -> None:
    def respond(request: GenerationRequest, i: int) -> Choice:
        if is_checklist(request):
            return Choice(" Is it right?\n", finish_reason="stop")
        if (fields := match_template(request, prompts.JUDGE_ITEM)) is not None:
            return Choice(" YES" if fields["response"] == "" else " NO", finish_reason="stop")
        if refine_fields(request) is not None:
            return Choice("", finish_reason="stop")
        return Choice("He has 5 apples.", finish_reason="stop")

    result = await run_strategy("checklist-bon", MATH, ScriptedGenerator(respond), params={"n": 1, "refine": True})
    assert result.answer == "He has 5 apples."
    assert result.trace["refine"] == {"text": "", "blank": True, "kept": False}
