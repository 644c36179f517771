"""MCTS as published. MCTSr (Zhang et al., 2024): the generic search in
``strategies.search`` on toy problems with scripted rewards, then the ``mcts`` strategy's
refine mode. Steps mode: what finishes a solution, blank steps, trimming chat templates.
Both: a backend error late in the search returns the best answer so far."""

from __future__ import annotations

import math
from typing import Sequence

import pytest

from strategies import Choice, GenerationRequest, Task, prompts, run_strategy
from strategies.base import RunContext
from strategies.search import MCTSr, RewardNode

from tests.scripted import ScriptedGenerator, is_critique, is_refine, is_step_score, is_task_sample, match_template
from tests.test_strategies import MATH, REFINE_SCORES, mcts_refine_script

pytestmark = pytest.mark.asyncio


class Scripted:
    """Children and reward sequences per state; every ``rewards`` call pops the next list."""

    def __init__(self, children: dict[str, list[str]], rewards: dict[str, list[list[float]]]) -> None:
        self.children, self.queue = children, {k: list(v) for k, v in rewards.items()}
        self.expanded: list[str] = []

    async def expand(self, state: str) -> list[str]:
        self.expanded.append(state)
        return self.children.get(state, [])

    async def rewards(self, states: Sequence[str]) -> list[list[float]]:
        return [self.queue[s].pop(0) if len(self.queue[s]) > 1 else self.queue[s][0] for s in states]

    def is_terminal(self, state: str) -> bool:
        return False


def by_state(root: RewardNode) -> dict[str, RewardNode]:
    return {node.state: node for node in root.walk()}


async def test_q_is_half_min_plus_mean_with_full_score_suppression() -> None:
    tree = MCTSr(Scripted({}, {}))
    root = tree.new_root("", [0.2, 0.6, 1.0])  # 1.0 >= 0.975 counts 0.75
    assert root.rewards == [0.2, 0.6, 0.75]
    assert root.q == pytest.approx((0.2 + (0.2 + 0.6 + 0.75) / 3) / 2)
    assert root.value == root.q
    assert tree.suppress([0.97, 0.975, 0.99]) == [0.97, 0.75, 0.75]
    assert RewardNode("x").q == 0.0  # no readable reward


async def test_backup_is_half_own_q_plus_best_child_and_revisits_add_rewards() -> None:
    problem = Scripted({"": ["a", "b"], "a": ["aa", "ab"]},
                       {"": [[0.5]], "a": [[0.6], [0.6]], "b": [[0.4]], "aa": [[0.3]], "ab": [[0.9]]})
    tree = MCTSr(problem, max_children=2, max_depth=3)
    root = tree.new_root("", [0.5])
    await tree.search(root, simulations=2)
    nodes = by_state(root)
    assert problem.expanded == ["", "a"]  # a: UCT 0.6 + c·√(ln 3 / 1) beats b's 0.4 + the same
    assert nodes[""].visits == 2 and nodes["a"].visits == 2 and nodes["b"].visits == 1  # re-rewarded when visited
    assert nodes["a"].value == pytest.approx((0.6 + 0.9) / 2)  # Q'(a) = ½(Q(a) + max Q'(child))
    assert nodes[""].value == pytest.approx((0.5 + nodes["a"].value) / 2)  # recursive: max over Q' of children
    assert nodes["ab"].value == nodes["ab"].q == pytest.approx(0.9)


async def test_uct_uses_the_papers_exploration_term() -> None:
    problem = Scripted({"": ["a", "b"]}, {"": [[0.5]], "a": [[0.6, 0.2]], "b": [[0.4]]})
    tree = MCTSr(problem, exploration=1.4, max_children=2)
    root = tree.new_root("", [0.5])
    await tree.search(root, simulations=1)
    a, b = root.children
    assert tree.uct(root) == root.value  # N(parent) = 0 for the root: ln(1) = 0
    # UCT(a) = Q'(a) + c·sqrt(ln(N(parent) + 1) / (N(a) + ε)), N = rewards sampled
    assert tree.uct(a) == pytest.approx(a.value + 1.4 * math.sqrt(math.log(2 + 1) / (2 + 1e-5)))
    assert tree.uct(b) == pytest.approx(b.value + 1.4 * math.sqrt(math.log(2 + 1) / (1 + 1e-5)))


async def test_selection_skips_fully_expanded_nodes() -> None:
    # The root's only child is better: with max_children 1 the root is fully expanded.
    problem = Scripted({"": ["a"], "a": ["aa"]}, {"": [[0.5]], "a": [[0.7]], "aa": [[0.1]]})
    tree = MCTSr(problem, max_children=1, max_depth=5)
    root = tree.new_root("", [0.5])
    await tree.search(root, simulations=1)
    assert tree.select_many(root, 5) == [root.children[0]]
    # "a"'s child is worse than "a": "a" stays open after its expansion (paper: a node is
    # fully expanded only once a child beats it), beside the new leaf.
    await tree.search(root, simulations=1)
    nodes = by_state(root)
    assert {n.state for n in tree.select_many(root, 5)} == {"a", "aa"}
    # max_depth closes a node; a dead end (no children) is terminal.
    assert not MCTSr(problem, max_depth=2).expandable(nodes["aa"])


async def test_the_answer_is_the_best_q_not_the_luckiest_single_score() -> None:
    # "a" drew one lucky 0.9; its second visit reads 0.1, so Q(a) = (0.1 + 0.5) / 2 = 0.3.
    problem = Scripted({"": ["a", "b"], "a": ["aa"]},
                       {"": [[0.5]], "a": [[0.9], [0.1]], "b": [[0.7]], "aa": [[0.2]]})
    tree = MCTSr(problem, max_children=2, max_depth=3)
    root = tree.new_root("", [0.5])
    await tree.search(root, simulations=2)
    assert problem.expanded == ["", "a"]
    assert by_state(root)["a"].rewards == [0.9, 0.1]
    assert tree.best(root).state == "b"
    # A single raw full score is suppressed below a consistent 0.8.
    tree = MCTSr(Scripted({"": ["x", "y"]}, {"": [[0.5]], "x": [[1.0]], "y": [[0.8]]}), max_children=2)
    root = tree.new_root("", [0.5])
    await tree.search(root, simulations=1)
    assert tree.best(root).state == "y"


async def test_parallel_expands_the_top_uct_candidates_together() -> None:
    problem = Scripted({"": ["a", "b", "c"]}, {s: [[v]] for s, v in [("", 0.5), ("a", 0.6), ("b", 0.4), ("c", 0.2)]})
    tree = MCTSr(problem, max_children=3, parallel=2, max_depth=2)
    root = tree.new_root("", [0.5])
    await tree.search(root, simulations=3)
    assert problem.expanded[0] == "" and problem.expanded[1:] == ["a", "b"]


# == the mcts strategy's refine mode ============================================================


async def test_refine_mode_is_mctsr() -> None:
    gen = ScriptedGenerator(mcts_refine_script)
    result = await run_strategy("mcts", MATH, gen, params={
        "mode": "refine", "simulations": 10, "branching": 2, "value_samples": 2, "max_depth": 2})
    # draft/0/1 drew two full scores (the old max-of-raw-scores answer); suppressed, Q = 0.75
    # loses to draft/1/0's 0.8.
    assert result.answer == "draft/1/0"
    nodes = {}

    def collect(node: dict) -> None:
        nodes[node["state"]["text"]] = node
        for child in node["children"]:
            collect(child)

    collect(result.trace["tree"])
    assert set(nodes) == set(REFINE_SCORES)  # exhausted after 3 expansions: root, draft/0, draft/1
    assert result.trace["chosen"] == nodes["draft/1/0"]["id"]
    assert nodes["draft/0/1"]["rewards"] == [0.75, 0.75]
    assert nodes["draft"]["rewards"] == [0.6, 0.4, 0.6, 0.4]  # rewarded again when expanded
    q_d0, q_d1 = 0.6, 0.4
    assert nodes["draft/0"]["value"] == pytest.approx(round((q_d0 + 0.75) / 2, 4))
    assert nodes["draft/1"]["value"] == pytest.approx(round((q_d1 + 0.8) / 2, 4))
    assert nodes["draft"]["value"] == pytest.approx(round((0.45 + (q_d0 + 0.75) / 2) / 2, 4))

    # One expansion: the node's re-reward and the critiques (n=branching) together, then the
    # rewrites in one batch, then the children's rewards in one batch (n=value_samples each).
    critique_calls = gen.call_index(is_critique)
    assert len(critique_calls) == 3
    for index in critique_calls:
        (critique,) = gen.calls[index]
        assert critique.n == 2 and gen.overlapped(index, index - 1)
        assert match_template(gen.calls[index - 1][0], prompts.REWARD) is not None
        rewrites, rewards = gen.calls[index + 1], gen.calls[index + 2]
        assert len(rewrites) == 2 and all(is_refine(r) and r.n == 1 for r in rewrites)
        assert len(rewards) == 2 and all(match_template(r, prompts.REWARD) and r.n == 2 for r in rewards)
    assert result.usage.backend_calls == 2 + 3 * (2 + 2 * 2)


# == steps mode: what ends a step, what ends a solution ==========================================


STEP_TASK = Task(prompt="Q: What is 3 + 4?\nA:")


def steps_run(respond, task: Task = STEP_TASK, **params):
    def script(request: GenerationRequest, i: int) -> Choice:
        if is_step_score(request):
            return Choice(" 7", finish_reason="stop")
        return respond(request, i)

    gen = ScriptedGenerator(script)
    defaults = {"mode": "steps", "simulations": 6, "branching": 2, "max_depth": 4}
    return gen, run_strategy("mcts", task, gen, params={**defaults, **params})


def tree_texts(result) -> list[tuple[str, bool]]:
    """(text, done) of every node below the root, depth first."""
    out = []

    def walk(node: dict) -> None:
        out.append((node["state"]["text"], node["state"]["done"]))
        for child in node["children"]:
            walk(child)

    walk(result.trace["tree"])
    return out[1:]


def prefix_of(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt[len(STEP_TASK.prompt):]
    last = request.messages[-1]
    return last["content"] if last["role"] == "assistant" else ""


async def test_steps_blank_continuation_is_no_step_and_no_solution() -> None:
    def respond(request: GenerationRequest, i: int) -> Choice:
        prefix = prefix_of(request)
        if prefix == "" and i == 0:
            return Choice("", finish_reason="stop", stop_reason="\n")  # the delimiter first: a blank line
        if prefix == "" and i == 1:
            return Choice("  ", finish_reason="stop", stop_reason=None)  # EOS after blanks: no solution either
        if prefix == "":
            return Choice(" Add them.", finish_reason="stop", stop_reason="\n")
        return Choice(" The answer is 7.", finish_reason="stop", stop_reason="\n")

    gen, run = steps_run(respond, branching=3)
    result = await run
    assert tree_texts(result)[0] == (" Add them.\n", False)
    assert all(text.strip() for text, _ in tree_texts(result))
    assert result.answer == " Add them.\n The answer is 7."
    assert all(("min_tokens", 1) in r.extra for r in gen.requests_where(is_task_sample))


@pytest.mark.parametrize("finish, stop_reason, task_stop, done", [
    ("stop", "\n", (), False),          # the step delimiter: one more step
    ("stop", None, (), True),           # the model's end of sequence
    ("stop", 128001, (), True),         # a stop token
    ("stop", "Q:", ("Q:",), True),      # the task's own stop string
    ("stop", "\n", ("\n",), True),      # ... even when it equals the step delimiter
    ("length", None, (), False),        # cut at step_max_tokens: the step goes on
])
async def test_steps_finished_only_by_eos_task_stop_or_answer(finish, stop_reason, task_stop, done) -> None:
    task = Task(prompt=STEP_TASK.prompt, stop=task_stop)

    def respond(request: GenerationRequest, i: int) -> Choice:
        return Choice(" Compute 3 + 4 = 7", finish_reason=finish, stop_reason=stop_reason)

    gen, run = steps_run(respond, task=task, simulations=1, branching=1)
    result = await run
    ((text, finished),) = tree_texts(result)
    assert finished is done
    assert text == " Compute 3 + 4 = 7" + ("\n" if finish == "stop" and not done else "")


async def test_steps_answer_marker_finishes() -> None:
    def respond(request: GenerationRequest, i: int) -> Choice:
        return Choice(" so #### 7", finish_reason="stop", stop_reason="\n")

    gen, run = steps_run(respond, simulations=3, branching=1)
    result = await run
    assert tree_texts(result) == [(" so #### 7", True)]
    assert result.answer == " so #### 7"


TRIM_CHAT = Task(messages=({"role": "system", "content": "Solve step by step."},
                           {"role": "user", "content": "What is 3 + 4?"}))


def trimming_template_model(request: GenerationRequest, i: int) -> Choice:
    """A chat model behind a template that trims the continued assistant message: it sees
    "Step 1." for "Step 1.\\n", so it writes the newline again before the next step. Like vLLM,
    the newline ends the sample at once unless ``min_tokens`` lets the first token pass."""
    prefix = prefix_of(request)
    depth = prefix.count("\n")
    step = f" Step {depth + 1}." if depth < 2 else " The answer is 7."
    if not prefix:
        return Choice(step, finish_reason="stop", stop_reason="\n")
    if ("min_tokens", 1) not in request.extra:
        return Choice("", finish_reason="stop", stop_reason="\n")
    return Choice("\n" + step, finish_reason="stop", stop_reason="\n")


async def test_steps_chat_template_that_trims_still_grows_a_deep_tree() -> None:
    gen, run = steps_run(trimming_template_model, task=TRIM_CHAT, simulations=6, branching=1)
    result = await run
    assert result.answer == " Step 1.\n Step 2.\n The answer is 7."  # no doubled newline
    assert result.message == {"role": "assistant", "content": result.answer}
    continued = [r for r in gen.requests_where(is_task_sample) if r.messages[-1]["role"] == "assistant"]
    assert len(continued) == 2
    for request in continued:
        assert request.messages[:2] == TRIM_CHAT.messages  # the system prompt stays
        assert ("continue_final_message", True) in request.extra and ("add_generation_prompt", False) in request.extra


# == a backend error late in the search ==========================================================


class Broken(Exception):
    pass


def failing_after(calls: int, script) -> ScriptedGenerator:
    """A generator whose generate() calls fail from the ``calls + 1``-th on."""
    gen = ScriptedGenerator(script)
    generate = gen.generate

    async def wrapped(requests, *, return_exceptions=False):
        if len(gen.calls) >= calls:
            gen.calls.append(list(requests))
            error = Broken(f"backend down at call {len(gen.calls)}")
            if return_exceptions:
                return [error] * len(requests)
            raise error
        return await generate(requests, return_exceptions=return_exceptions)

    gen.generate = wrapped
    return gen


async def test_refine_error_late_in_the_search_returns_the_best_so_far() -> None:
    params = {"mode": "refine", "simulations": 10, "branching": 2, "value_samples": 2, "max_depth": 2}
    # draft, root reward, 2 expansions of 4 calls (root, then draft/0), then down
    gen = failing_after(10, mcts_refine_script)
    result = await run_strategy("mcts", MATH, gen, params=params)
    # Every later expansion's calls fail: the nodes become dead ends, listed as failed calls.
    assert result.trace["failed_calls"][0]["error"] == "Broken" and len(gen.calls) > 11
    assert "failed backend call" in result.stop_reason
    # The best Q' so far is draft/0/1 (0.75; draft/1/0 was never written), not the draft.
    assert result.answer == "draft/0/1"
    assert len(result.trace["tree"]["children"]) == 2


async def test_steps_error_late_returns_the_best_finished_solution() -> None:
    def script(request: GenerationRequest, i: int) -> Choice:
        if is_step_score(request):
            return Choice(" 7", finish_reason="stop")
        if prefix_of(request) == "":
            return Choice(" The answer is 7." if i == 0 else " Add.", finish_reason="stop", stop_reason="\n")
        return Choice(" More.", finish_reason="stop", stop_reason="\n")

    gen = failing_after(2, script)  # the root's expansion and its values, then down
    result = await run_strategy("mcts", STEP_TASK, gen, params={"mode": "steps", "simulations": 5, "branching": 2})
    assert result.answer == " The answer is 7."
    assert result.trace["failed_calls"][0]["error"] == "Broken"


async def test_an_error_before_any_answer_is_raised() -> None:
    with pytest.raises(Broken):
        await run_strategy("mcts", MATH, failing_after(0, mcts_refine_script), params={"mode": "refine"})
    gen = failing_after(2, lambda r, i: Choice(" 7" if is_step_score(r) else " Step.", finish_reason="stop",
                                               stop_reason="\n"))
    with pytest.raises(Broken):  # steps: no finished solution yet
        await run_strategy("mcts", STEP_TASK, gen, params={"mode": "steps", "simulations": 4})


async def test_an_interrupted_run_names_no_backend_address() -> None:
    class Unreachable(Exception):
        status_code = 502

    ctx = RunContext(ScriptedGenerator(mcts_refine_script), MATH)
    ctx.interrupt(Unreachable("cannot reach http://10.1.2.3:8000/v1/completions"))
    assert ctx.trace["error"] == ctx.interrupted == "backend error: Unreachable (status 502)"
