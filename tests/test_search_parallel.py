"""MCTS tree parallelisation: ``parallel`` leaves per iteration, kept apart by virtual loss.

A toy ``SearchProblem`` (no model) checks the generic core; the scripted generator
checks the mcts strategy: same calls, fewer sequential rounds.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any, Callable, Sequence

import pytest

from strategies import Choice, GenerationRequest, Task, prompts, run_strategy
from strategies.search import MCTS, Node

from tests.scripted import ScriptedGenerator, is_critique, is_step_score, is_task_sample, match_template

pytestmark = pytest.mark.asyncio


# == a sequential reference: the search as it was before ``parallel`` ======================


def reference_uct(child: Node[Any], parent_visits: int, exploration: float) -> float:
    if child.visits == 0:
        return math.inf
    return child.q + exploration * math.sqrt(math.log(parent_visits) / child.visits)


def reference_select(tree: MCTS, root: Node[Any]) -> Node[Any] | None:
    node = root
    while node.expanded:
        open_children = [c for c in node.children if tree._expandable(c)]
        if not open_children:
            node.exhausted = True
            if node is root:
                return None
            node = root
            continue
        parent_visits = max(node.visits, 1)
        node = max(open_children, key=lambda c: reference_uct(c, parent_visits, tree.exploration))
    return node


async def reference_search(tree: MCTS, root: Node[Any], simulations: int,
                           after_simulation: Callable[[Node[Any]], None] | None = None) -> Node[Any]:
    for _ in range(simulations):
        leaf = reference_select(tree, root)
        if leaf is None:
            break
        await tree.expand(leaf)
        if after_simulation is not None:
            after_simulation(root)
    return root


# == toy problems =============================================================================


class Toy:
    """Binary strings; children of ``s`` are ``s+"0"``, ``s+"1"`` (``width`` of them), values
    fixed by a seeded hash. Records expansion order, overlap and peak concurrency."""

    def __init__(self, *, width: int = 2, seed: int = 0, delay: float = 0.0,
                 dead_ends: Sequence[str] = (), terminal: Sequence[str] = ()) -> None:
        self.width, self.seed, self.delay = width, seed, delay
        self.dead_ends, self.terminal = set(dead_ends), set(terminal)
        self.expanded: list[str] = []
        self.evaluated: list[list[str]] = []
        self.spans: list[list[int]] = []
        self._tick = 0
        self.in_flight = 0
        self.peak = 0

    def value(self, state: str) -> float:
        return random.Random(f"{self.seed}:{state}").random()

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    async def expand(self, state: str) -> list[str]:
        self.expanded.append(state)
        span = [self._next_tick(), -1]
        self.spans.append(span)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
            span[1] = self._next_tick()
        if state in self.dead_ends:
            return []
        return [state + str(i) for i in range(self.width)]

    async def evaluate(self, states: Sequence[str]) -> list[float]:
        self.evaluated.append(list(states))
        await asyncio.sleep(0)
        return [self.value(s) for s in states]

    def is_terminal(self, state: str) -> bool:
        return state in self.terminal


def rounds(spans: Sequence[Sequence[int]]) -> int:
    """Sequential rounds: the longest chain of calls each started after the previous ended."""
    level: list[int] = []
    for start, _end in spans:
        before = [level[j] for j, (_, end) in enumerate(spans[:len(level)]) if end < start]
        level.append(1 + max(before, default=0))
    return max(level, default=0)


def waves(spans: Sequence[Sequence[int]]) -> list[int]:
    """Sizes of the groups of expansions in flight together (an iteration each)."""
    sizes: list[int] = []
    last_end = 0
    for start, end in spans:
        if start > last_end:
            sizes.append(0)
        sizes[-1] += 1
        last_end = max(last_end, end)
    return sizes


def snapshot(root: Node[Any]) -> list[tuple]:
    return [(n.index, n.state, n.depth, n.visits, n.value_sum, n.value, n.expanded, n.terminal, n.exhausted,
             n.parent.index if n.parent else None) for n in root.walk()]


def check_invariants(root: Node[Any]) -> int:
    """No virtual loss left, and visits / value_sum are exactly the real backups: a node's own
    evaluation (if any) plus one backup per expanded node in its subtree. Returns expansions."""
    def reward(node: Node[Any]) -> float:
        return max(c.value for c in node.children) if node.children else (node.value or 0.0)

    for node in root.walk():
        assert node.pending == 0
        below = [m for m in node.walk() if m.expanded]
        own = node.value is not None
        assert node.visits == int(own) + len(below)
        assert node.value_sum == pytest.approx((node.value if own else 0.0) + sum(reward(m) for m in below))
    return sum(1 for n in root.walk() if n.expanded)


# == parallel=1 is the sequential search, bit for bit =========================================


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["binary", "ternary", "dead_ends", "valued_root"])
async def test_parallel_1_reproduces_the_sequential_search(seed: int, kind: str) -> None:
    def make() -> Toy:
        if kind == "ternary":
            return Toy(width=3, seed=seed)
        if kind == "dead_ends":
            return Toy(seed=seed, dead_ends=["1", "01", "000"], terminal=["10"])
        return Toy(seed=seed)

    root_value = 0.5 if kind == "valued_root" else None
    runs = []
    for search in ("reference", "parallel=1"):
        problem = make()
        tree = MCTS(problem, exploration=1.4, max_depth=5)
        root = tree.new_root("", root_value)
        seen: list[list[tuple]] = []
        after = lambda r: seen.append(snapshot(r))  # noqa: E731
        if search == "reference":
            await reference_search(tree, root, 25, after)
        else:
            await tree.search(root, 25, after)
        runs.append((problem.expanded, problem.evaluated, snapshot(root), seen))
    assert runs[0] == runs[1]  # same expansion order, same batches, same tree after every simulation
    assert len(runs[0][0]) > 5


async def test_default_is_parallel_1() -> None:
    assert MCTS(Toy()).parallel == 1
    with pytest.raises(ValueError):
        MCTS(Toy(), parallel=0)


# == parallel > 1 ==============================================================================


async def test_parallel_2_expands_two_distinct_leaves_at_a_time() -> None:
    problem = Toy(delay=0.005)
    tree = MCTS(problem, max_depth=10, parallel=2)
    root = await tree.search(tree.new_root(""), simulations=8)
    assert len(problem.expanded) == 8
    assert len(set(problem.expanded)) == 8  # never the same leaf twice
    assert problem.peak == 2
    # The first iteration has only the root; then two leaves per iteration: 5 rounds for 8.
    assert waves(problem.spans) == [1, 2, 2, 2, 1]
    assert rounds(problem.spans) == 5
    assert check_invariants(root) == 8
    # The root's two children were expanded together, in the second iteration.
    assert sorted(problem.expanded[1:3]) == ["0", "1"]


@pytest.mark.parametrize("parallel", [2, 3, 4, 8])
@pytest.mark.parametrize("simulations", [1, 2, 7, 13])
async def test_simulations_are_counted_exactly_and_virtual_losses_vanish(parallel: int, simulations: int) -> None:
    problem = Toy(width=3, seed=simulations, delay=0.001)
    tree = MCTS(problem, max_depth=12, parallel=parallel)
    after: list[int] = []
    root = await tree.search(tree.new_root(""), simulations, lambda r: after.append(len(problem.expanded)))
    assert len(problem.expanded) == simulations == len(set(problem.expanded))
    assert len(after) == simulations  # after_simulation follows each expansion
    assert check_invariants(root) == simulations
    assert all(size <= parallel for size in waves(problem.spans))
    assert problem.peak <= parallel


@pytest.mark.parametrize("parallel", [1, 2, 4, 16])
async def test_an_exhausted_tree_ends_the_search(parallel: int) -> None:
    problem = Toy(seed=3, dead_ends=["01"], terminal=["10"], delay=0.001)
    tree = MCTS(problem, max_depth=3, parallel=parallel)
    root = await tree.search(tree.new_root(""), simulations=10_000)
    # Every node above depth 3 once, except the terminal "10" (never expanded) and the
    # dead end "01" (expanded, no children).
    assert sorted(problem.expanded) == ["", "0", "00", "01", "1", "11"]
    assert tree.select(root) is None
    check_invariants(root)


async def test_selection_stops_rather_than_picking_a_leaf_twice() -> None:
    # A chain (one child each) offers one leaf at a time: nothing to run in parallel.
    chain = Toy(width=1, delay=0.001)
    tree = MCTS(chain, max_depth=10, parallel=4)
    root = await tree.search(tree.new_root(""), simulations=5)
    assert chain.expanded == ["", "0", "00", "000", "0000"]
    assert chain.peak == 1 and waves(chain.spans) == [1] * 5
    check_invariants(root)

    # No virtual loss: selection always comes back to the same leaf, so parallel=4
    # degenerates to the sequential search.
    runs = []
    for parallel in (1, 4):
        problem = Toy(seed=1, delay=0.001)
        tree = MCTS(problem, max_depth=6, parallel=parallel, virtual_loss=0.0)
        root = await tree.search(tree.new_root(""), simulations=12)
        runs.append((problem.expanded, snapshot(root), problem.peak))
    assert runs[0] == runs[1]
    assert runs[1][2] == 1


async def test_a_larger_virtual_loss_spreads_the_selections() -> None:
    for virtual_loss in (1.0, 3.0):
        problem = Toy(width=4, seed=2)
        tree = MCTS(problem, max_depth=4, parallel=4, virtual_loss=virtual_loss)
        root = await tree.search(tree.new_root(""), simulations=5)
        assert problem.expanded[0] == "" and sorted(problem.expanded[1:]) == ["0", "1", "2", "3"]
        check_invariants(root)


async def test_a_failing_expansion_cancels_its_siblings() -> None:
    cancelled: list[str] = []

    class Failing(Toy):
        async def expand(self, state: str) -> list[str]:
            if state == "":
                return ["0", "1"]
            self.expanded.append(state)
            if state == "1":
                await asyncio.sleep(0.001)
                raise RuntimeError("backend down")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(state)
                raise
            return []

        def value(self, state: str) -> float:
            return 0.5

    problem = Failing()
    tree = MCTS(problem, max_depth=5, parallel=2)
    root = tree.new_root("")
    with pytest.raises(RuntimeError, match="backend down"):
        await asyncio.wait_for(tree.search(root, simulations=3), timeout=5)
    assert sorted(problem.expanded) == ["0", "1"]
    assert cancelled == ["0"]
    assert all(node.pending == 0 for node in root.walk())


# == through the mcts strategy ===================================================================


MATH = Task(messages=({"role": "user", "content": "What is 6 times 7?"},))


def refine_script(request: GenerationRequest, i: int) -> str:
    """Draft "d"; a rewrite appends "/<critique index>"; a reward depends on the text only."""
    if (fields := match_template(request, prompts.REWARD)) is not None:
        return f" {random.Random(fields['response'] + str(i)).randint(1, 10)}"
    if is_critique(request):
        return f"critique {i}"
    if (fields := match_template(request, prompts.REFINE)) is not None:
        return f"{fields['response']}/{fields['feedback'].split()[-1]}"
    return "d"


STEP_TASK = Task(prompt="Q: What is 3 + 4?\nA:")


def steps_script(request: GenerationRequest, i: int) -> Choice:
    if (fields := match_template(request, prompts.STEP_SCORE)) is not None:
        return Choice(f" {random.Random(fields['response']).randint(1, 10)}", finish_reason="stop")
    depth = request.prompt.count("\n") - STEP_TASK.prompt.count("\n")
    if depth >= 2:
        return Choice(f" The answer is {7 + i}.", finish_reason="stop", stop_reason="\n")
    return Choice(f" step {depth}.{i}", finish_reason="stop", stop_reason="\n")


async def test_strategy_parallel_1_sends_what_the_sequential_search_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    task, script = STEP_TASK, steps_script
    params = {"mode": "steps", "simulations": 8, "branching": 2, "max_depth": 4}
    runs = []
    for extra in (None, {}, {"parallel": 1}):
        gen = ScriptedGenerator(script)
        with monkeypatch.context() as patch:
            if extra is None:
                patch.setattr(MCTS, "search", reference_search)
            events: list[tuple[str, dict]] = []
            result = await run_strategy("mcts", task, gen, params={**params, **(extra or {})},
                                        on_event=lambda e, d: events.append((e, d)))
        events = [(e, d) for e, d in events if e == "expand"]
        runs.append((gen.calls, result.answer, result.trace, events, result.usage.backend_calls))
    assert runs[0] == runs[1] == runs[2]


def refine_params(simulations: int, branching: int, parallel: int) -> dict:
    return {"mode": "refine", "simulations": simulations, "branching": branching, "value_samples": 2,
            "max_depth": 4, "parallel": parallel}


@pytest.mark.parametrize("simulations,branching,sequential,parallel_2", [
    (4, 2, 14, 11),  # root alone, then 2 nodes, then the 4th: 2 + 3×3
    (5, 2, 17, 11),  # root alone, then 2 + 2: 2 + 3×3
    (4, 1, 14, 11),  # MCTSr's candidates are every open node, not only leaves: 2 at a time
])
async def test_strategy_refine_same_calls_in_fewer_rounds(
        simulations: int, branching: int, sequential: int, parallel_2: int) -> None:
    seen = {}
    for parallel in (1, 2):
        gen = ScriptedGenerator(refine_script, delay=0.02)
        result = await run_strategy("mcts", MATH, gen, params=refine_params(simulations, branching, parallel))
        assert not result.budget_limited
        # draft + root reward, then per expansion: the node's reward and the critique (together),
        # the rewrites (one batch), the children's rewards (one batch)
        assert result.usage.backend_calls == 2 + simulations * (2 + 2 * branching)
        seen[parallel] = (len(gen.calls), rounds(gen.spans), gen.max_in_flight, len(gen.call_index(is_critique)))
    assert seen[1] == (2 + 4 * simulations, sequential, 2, simulations)
    assert seen[2] == (2 + 4 * simulations, parallel_2, 4, simulations)


async def test_strategy_steps_parallel_keeps_the_answer_and_the_call_count() -> None:
    results = {}
    for parallel in (1, 3):
        gen = ScriptedGenerator(steps_script, delay=0.01)
        result = await run_strategy("mcts", STEP_TASK, gen, params={
            "mode": "steps", "simulations": 7, "branching": 2, "max_depth": 3, "parallel": parallel})
        expansions = gen.requests_where(is_task_sample)
        assert len(expansions) == 7
        assert len({r.prompt for r in expansions}) == 7  # no prefix continued twice
        assert len(gen.requests_where(is_step_score)) == len(gen.requests_where(is_task_sample)) * 2
        results[parallel] = (result.answer, rounds(gen.spans), gen.max_in_flight, len(gen.calls))
    assert all("The answer is" in answer for answer, *_ in results.values())
    assert results[3][3] == results[1][3]
    assert results[3][1] < results[1][1]
    assert results[3][2] > 1


async def test_parallel_is_capped_by_the_branching_limit() -> None:
    from strategies import Limits, StrategyError

    gen = ScriptedGenerator(refine_script)
    with pytest.raises(StrategyError, match="parallel"):
        await run_strategy("mcts", MATH, gen, params={"parallel": 4}, limits=Limits(branching=2))
    with pytest.raises(StrategyError):
        await run_strategy("mcts", MATH, gen, params={"parallel": 0})
    assert gen.calls == []
