"""The strategies' algorithms, run against a scripted generator (no model, no network)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import pytest

from strategies import Budget, Choice, GenerationRequest, Limits, StrategyError, Task, prompts, run_strategy
from strategies.answers import extract_answer
from strategies.search import MCTS, Node

from tests.scripted import (
    DictCache,
    ScriptedGenerator,
    is_checklist,
    is_critique,
    is_feedback,
    is_judge,
    is_refine,
    is_select,
    is_step_score,
    is_task_sample,
    match_template,
)

pytestmark = pytest.mark.asyncio


def chat(text: str) -> Task:
    return Task(messages=({"role": "user", "content": text},))


MATH = chat("What is 6 times 7?")


def all_overlap(gen: ScriptedGenerator, indices: Sequence[int]) -> bool:
    """Every call in ``indices`` was in flight at one common moment."""
    return max(gen.spans[i][0] for i in indices) < min(gen.spans[i][1] for i in indices)


# == self-consistency ===============================================================


def answers_script(answers: Sequence[str], logprobs: Sequence[float] | None = None):
    def respond(request: GenerationRequest, i: int) -> Choice:
        text = f"Path {i}: some reasoning. The answer is {answers[i]}."
        lps = None
        if request.logprobs and logprobs is not None:
            lps = (logprobs[i],) * len(text.split())
        return Choice(text, finish_reason="stop", token_logprobs=lps)
    return respond


async def test_sc_modal_answer_wins_even_when_not_first() -> None:
    gen = ScriptedGenerator(answers_script(["17", "42", "42", "9", "42", "42", "17", "42"]))
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 8})
    assert extract_answer(result.answer) == "42"
    assert result.answer.startswith("Path 1:")  # the first sample that voted 42
    # k samples of one prompt: ONE backend request with n=k.
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 1
    assert gen.calls[0][0].n == 8 and gen.calls[0][0].temperature == 0.7
    votes = {row["answer"]: row["votes"] for row in result.trace["votes"]}
    assert votes == {"42": 5, "17": 2, "9": 1}
    assert result.trace["votes"][0]["samples"] == [1, 2, 4, 5, 7]


async def test_sc_votes_group_samples_by_meaning() -> None:
    """Issue 12 §1 end to end: differently written equal answers are one vote, the first-seen
    form names it in the table and in every sample's trace; math goes through Math-Verify."""
    texts = [r"So \boxed{9{,}500}.", "The answer is 17.", "The answer is 9,500.", "The answer is 9500.",
             r"\boxed{\frac{1}{\sqrt{2}}}", r"\boxed{\sqrt{2}/2}", "The answer is 17.0"]
    gen = ScriptedGenerator(lambda request, i: texts[i])
    result = await run_strategy("self-consistency", MATH, gen, params={"k": len(texts)})
    votes = {row["answer"]: row["votes"] for row in result.trace["votes"]}
    assert votes == {"9500": 3, "17": 2, r"\frac{1}{\sqrt{2}}": 2}
    assert [s["answer"] for s in result.trace["samples"]] == [
        "9500", "17", "9500", "9500", r"\frac{1}{\sqrt{2}}", r"\frac{1}{\sqrt{2}}", "17"]
    assert result.answer == texts[0]


async def test_sc_splits_large_k_into_concurrent_requests_in_one_batch() -> None:
    gen = ScriptedGenerator(lambda req, i: "The answer is 42.")
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 20, "n_per_request": 8})
    assert len(gen.calls) == 1  # one batch: the requests go out together
    assert [r.n for r in gen.calls[0]] == [8, 8, 4]
    assert result.trace["samples_used"] == 20
    assert result.usage.backend_calls == 3 and result.usage.samples == 20


@pytest.mark.parametrize("answers, winner", [(["7", "9", "9", "7"], "7"), (["9", "7", "7", "9"], "9")])
async def test_sc_tie_goes_to_the_answer_seen_first(answers: list[str], winner: str) -> None:
    gen = ScriptedGenerator(answers_script(answers))
    result = await run_strategy("self-consistency", MATH, gen, params={"k": 4})
    assert extract_answer(result.answer) == winner


async def test_sc_logprob_weighting_can_flip_the_winner() -> None:
    answers = ["42"] * 5 + ["17"] * 2
    logprobs = [-3.0] * 5 + [-0.05] * 2  # the minority is far more confident
    plain = await run_strategy("self-consistency", MATH, ScriptedGenerator(answers_script(answers, logprobs)),
                               params={"k": 7})
    assert extract_answer(plain.answer) == "42"

    gen = ScriptedGenerator(answers_script(answers, logprobs))
    weighted = await run_strategy("self-consistency", MATH, gen, params={"k": 7, "weighting": "logprob"})
    assert gen.requests[0].logprobs is True
    assert extract_answer(weighted.answer) == "17"
    top = weighted.trace["votes"][0]
    assert top["answer"] == "17" and top["votes"] == 2


async def test_sc_adaptive_stops_after_first_wave_when_unanimous() -> None:
    gen = ScriptedGenerator(lambda req, i: "The answer is 42.")
    result = await run_strategy("self-consistency", MATH, gen,
                                params={"k": 16, "adaptive": True, "wave_size": 4})
    assert result.trace["samples_used"] == 4 < 16
    assert "P(leader ahead)" in result.trace["stop"]
    assert [r.n for r in gen.requests] == [4]
    assert extract_answer(result.answer) == "42"


async def test_sc_adaptive_does_not_stop_on_a_split_stream() -> None:
    gen = ScriptedGenerator(lambda req, i: f"The answer is {42 if i % 2 == 0 else 41}.")
    result = await run_strategy("self-consistency", MATH, gen,
                                params={"k": 8, "adaptive": True, "wave_size": 4})
    assert result.trace["samples_used"] == 8
    assert result.trace["stop"] == "k samples drawn"
    assert [r.n for r in gen.requests] == [4, 4]
    assert extract_answer(result.answer) == "42"  # 4-4 tie: seen first


async def test_sc_llm_aggregate_uses_the_models_choice() -> None:
    texts = ["Cats are mammals.", "Cats are reptiles.", "Cats are mammals that purr.", "Cats are fish."]

    def respond(request: GenerationRequest, i: int) -> str:
        if is_select(request):
            return " 3"
        return texts[i]

    gen = ScriptedGenerator(respond)
    result = await run_strategy("self-consistency", chat("What are cats?"), gen,
                                params={"k": 4, "aggregate": "llm", "answer_format": "text"})
    assert result.answer == texts[2]  # "Response 3" -> sample index 2, not the vote's pick (index 0)
    assert result.trace["usc"]["selected"] == 2
    (select,) = gen.requests_where(is_select)
    assert select.n == 1 and select.temperature == 0.0
    fields = match_template(select, prompts.SELECT_CONSISTENT)
    assert all(f"Response {i + 1}:\n{t}" in fields["responses"] for i, t in enumerate(texts))


async def test_sc_usage_sums_over_all_calls() -> None:
    def respond(request: GenerationRequest, i: int) -> str:
        return " 1" if is_select(request) else f"sample number {i} says 42"

    gen = ScriptedGenerator(respond)
    result = await run_strategy("self-consistency", MATH, gen,
                                params={"k": 20, "n_per_request": 8, "aggregate": "llm"})
    usage = result.usage
    assert usage.backend_calls == len(gen.requests) == 4
    assert usage.samples == 21
    assert usage.prompt_tokens == gen.prompt_tokens > 0
    assert usage.completion_tokens == gen.completion_tokens == 20 * 5 + 1
    assert usage.total_tokens == gen.prompt_tokens + gen.completion_tokens
    assert usage.wall_ms > 0


# == self-refine ======================================================================


def feedback(score: int, done: bool = False) -> str:
    return f" {score}\nIssues:\n- could be clearer\nVerdict: {'DONE' if done else 'REVISE'}"


def bump(text: str) -> str:
    """'Answer v1' -> 'Answer v2'."""
    head, version = text.rsplit("v", 1)
    return f"{head}v{int(version) + 1}"


def refine_script(feedback_for: Callable[[str], str], drafts: Sequence[str] = ("Answer v0",),
                  rewrite: Callable[[str], str] = bump):
    def respond(request: GenerationRequest, i: int) -> str:
        if (fields := match_template(request, prompts.FEEDBACK)) is not None:
            return feedback_for(fields["response"])
        if (fields := match_template(request, prompts.REFINE)) is not None:
            return rewrite(fields["response"])
        return drafts[i]
    return respond


async def test_refine_returns_the_best_scored_version_not_the_last() -> None:
    scores = {"Answer v0": 6, "Answer v1": 8, "Answer v2": 3, "Answer v3": 2}
    gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r])))
    result = await run_strategy("self-refine", MATH, gen, params={"max_rounds": 3})
    assert result.answer == "Answer v1"
    chain = result.trace["chains"][0]
    assert [v["score"] for v in chain] == [6, 8, 3, 2]
    assert chain[-1]["stop"] == "max rounds"
    assert result.trace["best"] == {"chain": 0, "round": 1, "score": 8}
    assert len(gen.requests_where(is_feedback)) == 4 and len(gen.requests_where(is_refine)) == 3
    # The refine prompt carries the feedback's issues.
    first_refine = match_template(gen.requests_where(is_refine)[0], prompts.REFINE)
    assert first_refine["response"] == "Answer v0" and "could be clearer" in first_refine["feedback"]


async def test_refine_stops_on_done_verdict() -> None:
    gen = ScriptedGenerator(refine_script(lambda r: feedback(4, done=True)))
    result = await run_strategy("self-refine", MATH, gen)
    assert result.answer == "Answer v0"
    assert result.trace["chains"][0][-1]["stop"] == "done"
    assert not gen.requests_where(is_refine)


async def test_refine_stops_at_stop_score() -> None:
    scores = {"Answer v0": 6, "Answer v1": 8, "Answer v2": 10}
    gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r])))
    result = await run_strategy("self-refine", MATH, gen, params={"stop_score": 8, "max_rounds": 5})
    assert result.answer == "Answer v1"
    assert result.trace["chains"][0][-1]["stop"] == "score threshold"
    assert len(gen.requests_where(is_refine)) == 1 and len(gen.requests_where(is_feedback)) == 2


async def test_refine_stops_when_refinement_changes_nothing() -> None:
    gen = ScriptedGenerator(refine_script(lambda r: feedback(5), rewrite=lambda r: f"  {r}\n"))
    result = await run_strategy("self-refine", MATH, gen, params={"max_rounds": 5})
    assert result.answer == "Answer v0"
    assert result.trace["chains"][0][-1]["stop"] == "no change"
    assert len(gen.requests_where(is_refine)) == 1 and len(gen.requests_where(is_feedback)) == 1


async def test_refine_chains_draft_in_one_request_and_run_concurrently() -> None:
    scores = {"Chain0 v0": 5, "Chain0 v1": 7, "Chain1 v0": 9, "Chain2 v0": 3, "Chain2 v1": 4}
    gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r]),
                                          drafts=["Chain0 v0", "Chain1 v0", "Chain2 v0"]))
    result = await run_strategy("self-refine", MATH, gen, params={"chains": 3, "max_rounds": 1})
    assert gen.calls[0] == [gen.requests[0]] and gen.requests[0].n == 3 and is_task_sample(gen.requests[0])
    assert len(gen.requests_where(is_task_sample)) == 1
    first_feedback = gen.call_index(is_feedback)[:3]
    assert all_overlap(gen, first_feedback)  # the three chains' critiques are in flight together
    assert gen.max_in_flight >= 3
    assert result.answer == "Chain1 v0"
    assert result.trace["best"]["chain"] == 1


async def test_refine_critique_cache_hits_on_the_second_run() -> None:
    scores = {"Answer v0": 6, "Answer v1": 9}
    cache = DictCache()
    first_gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r])))
    first = await run_strategy("self-refine", MATH, first_gen, cache=cache)
    assert first.usage.cache_misses == 2 and first.usage.cache_hits == 0
    assert first.usage.backend_calls == 4  # draft, feedback, refine, feedback

    second_gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r])))
    second = await run_strategy("self-refine", MATH, second_gen, cache=cache)
    assert second.answer == first.answer == "Answer v1"
    assert second.usage.cache_hits == 2 and second.usage.cache_misses == 0
    assert not second_gen.requests_where(is_feedback)
    assert second.usage.backend_calls == 2 < first.usage.backend_calls
    assert cache.kinds() == ["critique"]


async def test_refine_sampled_feedback_is_not_cached() -> None:
    cache = DictCache()
    gen = ScriptedGenerator(refine_script(lambda r: feedback(9)))
    await run_strategy("self-refine", MATH, gen, cache=cache, params={"feedback_temperature": 0.5})
    assert cache.store == {}


# == generic MCTS core ==================================================================


class ToyProblem:
    """A fixed tree: ``children[state]`` and ``values[state]``; records every call."""

    def __init__(self, children: dict[str, list[str]], values: dict[str, float], terminal: Sequence[str] = ()):
        self.children, self.values, self.terminal = children, values, set(terminal)
        self.expanded: list[str] = []
        self.evaluated: list[list[str]] = []

    async def expand(self, state: str) -> list[str]:
        self.expanded.append(state)
        return list(self.children.get(state, []))

    async def evaluate(self, states: Sequence[str]) -> list[float]:
        self.evaluated.append(list(states))
        return [self.values[s] for s in states]

    def is_terminal(self, state: str) -> bool:
        return state in self.terminal


TREE = {"": ["A", "B"], "A": ["AA", "AB"], "B": ["BA", "BB"]}


def states(path: Sequence[Node]) -> list[str]:
    return [node.state for node in path]


async def test_mcts_core_looks_past_a_greedy_first_step() -> None:
    values = {"A": 0.6, "B": 0.4, "AA": 0.1, "AB": 0.1, "BA": 0.9, "BB": 0.9}

    shallow = MCTS(ToyProblem(TREE, values), max_depth=2)
    root = await shallow.search(shallow.new_root(""), simulations=1)
    assert states(MCTS.best_path(root)) == ["", "A"]  # one expansion: A looks better

    problem = ToyProblem(TREE, values)
    tree = MCTS(problem, max_depth=2)
    root = await tree.search(tree.new_root(""), simulations=50)
    assert states(MCTS.best_path(root)) == ["", "B", "BA"]
    assert MCTS.best_node(root).state in ("BA", "BB")

    # Every expansion values all of a node's children in ONE evaluate() batch.
    assert problem.evaluated == [TREE[s] for s in problem.expanded]
    # Nodes at max_depth are terminal and never expanded; the exhausted tree ends the search early.
    assert sorted(problem.expanded) == ["", "A", "B"]
    assert max(node.depth for node in root.walk()) == 2
    assert all(node.terminal for node in root.walk() if node.depth == 2)


async def test_mcts_core_uct_explores_the_weaker_looking_branch_within_a_small_budget() -> None:
    """A deep tree that cannot be exhausted: UCT must still leave A once its children disappoint."""

    class Deep(ToyProblem):
        async def expand(self, state: str) -> list[str]:
            self.expanded.append(state)
            return ["A", "B"] if state == "" else [state + "0", state + "1"]

        async def evaluate(self, states: Sequence[str]) -> list[float]:
            self.evaluated.append(list(states))
            return [{"A": 0.6, "B": 0.4}.get(s, 0.1 if s.startswith("A") else 0.9) for s in states]

    problem = Deep({}, {})
    tree = MCTS(problem, max_depth=10)
    root = await tree.search(tree.new_root(""), simulations=8)
    assert len(problem.expanded) == 8
    assert problem.expanded[:3] == ["", "A", "B"]  # A first (greedy), then B once A's children score low
    path = states(MCTS.best_path(root))
    assert path[1] == "B" and len(path) >= 4
    assert sum(s.startswith("B") for s in problem.expanded) > sum(s.startswith("A") for s in problem.expanded)


async def test_mcts_core_choice_follows_the_values() -> None:
    values = {"A": 0.6, "B": 0.4, "AA": 0.1, "AB": 0.1, "BA": 0.1, "BB": 0.1}
    tree = MCTS(ToyProblem(TREE, values), max_depth=2)
    root = await tree.search(tree.new_root(""), simulations=50)
    assert states(MCTS.best_path(root)) == ["", "A", "AA"]
    assert MCTS.best_node(root).state == "A"


async def test_mcts_core_never_expands_terminal_states() -> None:
    values = {"A": 0.9, "B": 0.2, "BA": 0.5, "BB": 0.5, "AA": 1.0, "AB": 1.0}
    problem = ToyProblem(TREE, values, terminal=["A"])
    tree = MCTS(problem, max_depth=5)
    root = await tree.search(tree.new_root(""), simulations=50)
    assert "A" not in problem.expanded
    assert sorted(problem.expanded) == ["", "B", "BA", "BB"]  # BA, BB are dead ends (no children)
    a_node = next(n for n in root.walk() if n.state == "A")
    assert a_node.terminal and not a_node.children


async def test_mcts_core_respects_max_depth_and_stops_when_exhausted() -> None:
    class Infinite(ToyProblem):
        async def expand(self, state: str) -> list[str]:
            self.expanded.append(state)
            return [state + "0", state + "1"]

        async def evaluate(self, states: Sequence[str]) -> list[float]:
            self.evaluated.append(list(states))
            return [s.count("1") / len(s) for s in states]

    problem = Infinite({}, {})
    tree = MCTS(problem, max_depth=3)
    started = time.perf_counter()
    root = await tree.search(tree.new_root(""), simulations=10_000)
    assert time.perf_counter() - started < 2
    assert len(problem.expanded) == 1 + 2 + 4  # every node above depth 3, once
    assert all(len(s) < 3 for s in problem.expanded)
    assert max(node.depth for node in root.walk()) == 3
    assert len(list(root.walk())) == 1 + 2 + 4 + 8
    assert tree.select(root) is None
    assert states(MCTS.best_path(root)) == ["", "1", "11", "111"]


# == mcts strategy: refine mode ============================================================


REFINE_SCORES = {
    "draft": ["6", "4"],                                # Q = (0.4 + 0.5) / 2 = 0.45
    "draft/0": ["6", "6"], "draft/1": ["4", "4"],
    "draft/0/0": ["3", "3"], "draft/0/1": ["10", "10"],  # full scores: suppressed to 0.75
    "draft/1/0": ["8", "8"], "draft/1/1": ["1", "1"],
}


def mcts_refine_script(request: GenerationRequest, i: int) -> str:
    """Draft "draft"; a rewrite appends "/<critique index>"; rewards from ``REFINE_SCORES``."""
    if (fields := match_template(request, prompts.REWARD)) is not None:
        return " " + REFINE_SCORES[fields["response"]][i]
    if is_critique(request):
        return f"critique {i}"
    if (fields := match_template(request, prompts.REFINE)) is not None:
        return f"{fields['response']}/{fields['feedback'].split()[-1]}"
    return "draft"


# == mcts strategy: steps mode =============================================================


STEP_TASK = Task(prompt="Q: What is 3 + 4?\nA:")

STEPS = {
    "": [" Add 3 and 4.", " Multiply 3 by 4."],
    " Add 3 and 4.\n": [" 3 + 4 = 8. The answer is 8.", " 3 + 4 = 7. The answer is 7."],
    " Multiply 3 by 4.\n": [" 3 * 4 = 12.", " So it is 12."],
}


def step_value(partial: str) -> str:
    if partial.endswith("The answer is 7."):
        return " 9"
    if "answer is" in partial:
        return " 2"
    if partial == " Add 3 and 4.\n":
        return " 6"
    return " 5"


def steps_script(request: GenerationRequest, i: int) -> Choice:
    if (fields := match_template(request, prompts.STEP_SCORE)) is not None:
        return Choice(step_value(fields["response"]), finish_reason="stop")
    prefix = request.prompt[len(STEP_TASK.prompt):]
    step = STEPS.get(prefix, [" The answer is 12.", " The answer is 12."])[i]
    # Every step ends at the delimiter, so only "The answer is" can make it terminal.
    return Choice(step, finish_reason="stop", stop_reason="\n")


async def test_mcts_steps_expands_by_continuation_and_follows_values() -> None:
    gen = ScriptedGenerator(steps_script)
    result = await run_strategy("mcts", STEP_TASK, gen, params={
        "mode": "steps", "simulations": 20, "branching": 2, "max_depth": 3, "step_max_tokens": 64})
    assert result.answer == " Add 3 and 4.\n 3 + 4 = 7. The answer is 7."

    expansions = gen.requests_where(is_task_sample)
    assert expansions, "no expansion requests"
    for request in expansions:
        assert not request.is_chat and request.prompt.startswith(STEP_TASK.prompt)
        assert request.n == 2 and "\n" in request.stop and request.max_tokens == 64
        # A step stating the answer is terminal: never continued.
        assert "answer is" not in request.prompt
    assert {r.prompt[len(STEP_TASK.prompt):] for r in expansions} == {
        "", " Add 3 and 4.\n", " Multiply 3 by 4.\n", " Multiply 3 by 4.\n 3 * 4 = 12.\n",
        " Multiply 3 by 4.\n So it is 12.\n",
    }
    # Identical steps merge: the two " The answer is 12." continuations make one child.
    assert all(len(batch) == 1 for batch in gen.calls if is_task_sample(batch[0]))
    assert all(r.n == 2 for r in gen.requests_where(is_step_score))


async def test_mcts_steps_stop_reason_tells_step_end_from_model_end() -> None:
    def respond(request: GenerationRequest, i: int) -> Choice:
        if is_step_score(request):
            return Choice(" 7", finish_reason="stop")
        prefix = request.prompt[len(STEP_TASK.prompt):]
        if prefix == "":
            return Choice(" Think about it.", finish_reason="stop", stop_reason="\n")  # step ended
        return Choice(" It is 7", finish_reason="stop", stop_reason=None)  # EOS: solution finished

    gen = ScriptedGenerator(respond)
    result = await run_strategy("mcts", STEP_TASK, gen, params={
        "mode": "steps", "simulations": 5, "branching": 1, "max_depth": 5})
    assert result.answer == " Think about it.\n It is 7"
    assert len(gen.requests_where(is_task_sample)) == 2


# == checklist best-of-N =====================================================================


ITEMS = ["Does the poem mention cats?", "Is the poem at most four lines?", "Does the poem rhyme?"]
CHECKLIST_REPLY = f" {ITEMS[0]}\n2. {ITEMS[1]}\n3. {ITEMS[2]}\n"
POEM = chat("Write a short poem about cats.")


def bon_script(candidates: Sequence[str], verdicts: dict[str, str], rewrite: str = "rewritten poem"):
    """``verdicts[text]`` is a string of Y/N, one letter per item."""
    def respond(request: GenerationRequest, i: int) -> str:
        if is_checklist(request):
            return CHECKLIST_REPLY
        if (fields := match_template(request, prompts.JUDGE_ITEM)) is not None:
            passed = verdicts[fields["response"]][ITEMS.index(fields["item"])] == "Y"
            return " YES" if passed else " NO"
        if is_refine(request):
            return rewrite
        return candidates[i]
    return respond


CANDIDATES = ["poem zero", "poem one", "poem two", "poem three"]


async def test_bon_picks_the_candidate_passing_most_items() -> None:
    verdicts = {"poem zero": "YNN", "poem one": "YYN", "poem two": "YYY", "poem three": "NNN"}
    gen = ScriptedGenerator(bon_script(CANDIDATES, verdicts))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4})
    assert result.answer == "poem two"
    assert result.trace["chosen"] == 2
    assert [item["item"] for item in result.trace["checklist"]] == ITEMS
    assert [c["score"] for c in result.trace["candidates"]] == [pytest.approx(1 / 3, abs=1e-4),
                                                                pytest.approx(2 / 3, abs=1e-4), 1.0, 0.0]

    # The checklist and the n=N sampling request run concurrently.
    (checklist_call,) = gen.call_index(is_checklist)
    (sample_call,) = gen.call_index(is_task_sample)
    assert gen.calls[sample_call][0].n == 4
    assert gen.overlapped(checklist_call, sample_call)
    # Without a cache, all N×K judgments go out as one batch.
    (judge_call,) = gen.call_index(is_judge)
    assert len(gen.calls[judge_call]) == len(gen.requests_where(is_judge)) == 4 * 3
    assert all(r.temperature == 0.0 for r in gen.requests_where(is_judge))


async def test_bon_reads_a_chat_models_checklist_and_counts_unparsed_verdicts() -> None:
    """A chat model's preamble is no item, a max_tokens cut-off item is dropped, and judge
    replies that are neither YES nor NO are counted in the trace (issue 12 §4)."""
    reply = f"Here is a checklist:\n**1. {ITEMS[0]}**\n2. {ITEMS[1]}\n3. Does the po"

    def respond(request: GenerationRequest, i: int) -> str | Choice:
        if is_checklist(request):
            return Choice(reply, finish_reason="length")
        if (fields := match_template(request, prompts.JUDGE_ITEM)) is not None:
            return {"poem zero": " Not correct", "poem one": " YES"}.get(fields["response"], " hmm")
        return ["poem zero", "poem one", "poem two"][i]

    result = await run_strategy("checklist-bon", POEM, ScriptedGenerator(respond), params={"n": 3})
    assert [item["item"] for item in result.trace["checklist"]] == ITEMS[:2]
    assert [c["verdicts"] for c in result.trace["candidates"]] == [[False, False], [True, True], [None, None]]
    assert result.trace["unparsed"] == 2
    assert result.answer == "poem one"


async def test_bon_reuses_the_cached_checklist_and_judgments() -> None:
    verdicts = {"poem zero": "YNN", "poem one": "YYN", "poem two": "YYY", "poem three": "NNN"}
    cache = DictCache()
    first = await run_strategy("checklist-bon", POEM, ScriptedGenerator(bon_script(CANDIDATES, verdicts)),
                               params={"n": 4}, cache=cache)
    assert first.usage.cache_misses == 1 + 12

    gen = ScriptedGenerator(bon_script(CANDIDATES, verdicts))
    second = await run_strategy("checklist-bon", POEM, gen, params={"n": 4}, cache=cache)
    assert second.answer == first.answer == "poem two"
    assert not gen.requests_where(is_checklist)
    assert not gen.requests_where(is_judge)
    assert second.usage.backend_calls == 1 and second.usage.cache_hits == 1 + 12


@pytest.mark.parametrize("rewrite_verdict, kept", [("YYY", True), ("YNY", False)])
async def test_bon_refine_keeps_the_rewrite_only_when_strictly_better(rewrite_verdict: str, kept: bool) -> None:
    verdicts = {"poem zero": "YNN", "poem one": "YYN", "rewritten poem": rewrite_verdict}
    gen = ScriptedGenerator(bon_script(CANDIDATES[:2], verdicts))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "refine": True})
    assert result.answer == ("rewritten poem" if kept else "poem one")
    assert result.trace["refine"]["kept"] is kept
    (refine,) = gen.requests_where(is_refine)
    fields = match_template(refine, prompts.REFINE)
    assert fields["response"] == "poem one"
    assert ITEMS[2] in fields["feedback"] and ITEMS[0] not in fields["feedback"]  # only the failed items


async def test_bon_refine_skipped_when_the_winner_is_perfect() -> None:
    verdicts = {"poem zero": "YYY", "poem one": "YYN"}
    gen = ScriptedGenerator(bon_script(CANDIDATES[:2], verdicts))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "refine": True})
    assert result.answer == "poem zero" and not gen.requests_where(is_refine)


async def test_bon_tie_goes_to_the_earliest_candidate() -> None:
    verdicts = {"poem zero": "NNN", "poem one": "YNY", "poem two": "YYN", "poem three": "NYY"}
    gen = ScriptedGenerator(bon_script(CANDIDATES, verdicts))
    result = await run_strategy("checklist-bon", POEM, gen, params={"n": 4})
    assert result.answer == "poem one"


async def test_bon_item_weights_change_the_winner() -> None:
    verdicts = {"poem zero": "YYN", "poem one": "NNY"}
    plain = await run_strategy("checklist-bon", POEM, ScriptedGenerator(bon_script(CANDIDATES[:2], verdicts)),
                               params={"n": 2, "checklist": ITEMS})
    assert plain.answer == "poem zero"

    gen = ScriptedGenerator(bon_script(CANDIDATES[:2], verdicts))
    weighted = await run_strategy("checklist-bon", POEM, gen,
                                  params={"n": 2, "checklist": ITEMS, "item_weights": [1, 1, 5]})
    assert weighted.answer == "poem one"
    assert not gen.requests_where(is_checklist)  # a given checklist is not generated


async def test_bon_item_weights_must_fit_the_generated_checklist() -> None:
    gen = ScriptedGenerator(bon_script(CANDIDATES[:2], {}))
    with pytest.raises(StrategyError) as err:
        await run_strategy("checklist-bon", POEM, gen, params={"n": 2, "item_weights": [1, 2]})
    assert err.value.field == "item_weights"


# == budgets and validation ===================================================================


async def test_budget_max_calls_returns_the_draft() -> None:
    gen = ScriptedGenerator(refine_script(lambda r: feedback(5)))
    result = await run_strategy("self-refine", MATH, gen, budget=Budget(max_calls=1))
    assert result.answer == "Answer v0"
    assert result.budget_limited is True
    assert result.stop_reason.startswith("budget")
    assert len(gen.requests) == 1 and result.usage.backend_calls == 1


async def test_budget_max_tokens_shrinks_then_stops() -> None:
    gen = ScriptedGenerator(lambda req, i: f"The answer is {42 if i % 2 == 0 else 41}.")
    result = await run_strategy("self-consistency", MATH, gen, budget=Budget(max_tokens=40),
                                params={"k": 8, "adaptive": True, "wave_size": 4})
    assert result.budget_limited and result.stop_reason.startswith("budget")
    first = gen.requests[0]
    # The wave does not fit: fewer samples first (4 -> 1), then a shorter one, within the
    # 40 tokens less the prompt's estimate (18 bytes / 3 + chat overhead 16 = 22).
    assert (first.n, first.max_tokens) == (1, 40 - 22)
    assert result.usage.total_tokens <= 40
    assert extract_answer(result.answer) == "42"  # best so far: the first wave's vote


async def test_budget_deadline_returns_best_so_far() -> None:
    scores = {"Answer v0": 5, "Answer v1": 8}

    def delay(request: GenerationRequest) -> float:
        fields = match_template(request, prompts.REFINE)
        return 10.0 if fields and fields["response"] == "Answer v1" else 0.001

    gen = ScriptedGenerator(refine_script(lambda r: feedback(scores[r])), delay=delay)
    started = time.perf_counter()
    result = await run_strategy("self-refine", MATH, gen, budget=Budget(deadline_s=0.2))
    assert time.perf_counter() - started < 2
    assert result.budget_limited is True
    assert result.stop_reason.startswith("deadline")
    assert result.answer == "Answer v1"  # the best-scored version before the stall


async def test_limits_reject_amplification() -> None:
    gen = ScriptedGenerator(lambda req, i: "x")
    with pytest.raises(StrategyError) as err:
        await run_strategy("self-consistency", MATH, gen, params={"k": 8}, limits=Limits(samples=4))
    assert err.value.field == "k"
    assert not gen.calls


async def test_unknown_param_is_rejected() -> None:
    gen = ScriptedGenerator(lambda req, i: "x")
    with pytest.raises(StrategyError) as err:
        await run_strategy("self-consistency", MATH, gen, params={"kk": 3})
    assert err.value.field == "kk"
    with pytest.raises(StrategyError):
        await run_strategy("self-consistency", MATH, gen, params={"k": 0})
    assert not gen.calls


async def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(StrategyError) as err:
        await run_strategy("tree-of-thoughts", MATH, ScriptedGenerator(lambda req, i: "x"))
    assert err.value.field == "strategy"


# == progress events ===========================================================================


@pytest.mark.parametrize(
    "name, task, respond, params, expected",
    [
        ("none", MATH, lambda req, i: "42", {}, set()),
        ("self-consistency", MATH, answers_script(["1", "2", "2", "3"]), {"k": 4}, {"votes"}),
        ("self-refine", MATH, refine_script(lambda r: feedback(9)), {}, {"critique"}),
        ("mcts", MATH, mcts_refine_script, {"simulations": 2, "max_depth": 2}, {"expand"}),
        ("checklist-bon", POEM, bon_script(CANDIDATES[:2], {"poem zero": "YNN", "poem one": "YYN"}), {"n": 2},
         {"checklist", "verdicts"}),
    ],
)
async def test_events_start_first_and_end_last(name, task, respond, params, expected) -> None:
    events: list[tuple[str, dict]] = []
    result = await run_strategy(name, task, ScriptedGenerator(respond), params=params,
                                on_event=lambda event, data: events.append((event, data)))
    names = [event for event, _ in events]
    assert names[0] == "started" and names[-1] == "done"
    assert names.count("started") == 1 and names.count("done") == 1
    assert set(names[1:-1]) == expected
    assert events[0][1]["strategy"] == name
    assert events[-1][1]["answer"] == result.answer
