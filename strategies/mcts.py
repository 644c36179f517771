"""MCTS with an LLM, on the generic core in ``search.py``. Two modes:

- ``refine`` (MCTSr, Zhang et al., 2024): nodes are whole answers. Expansion asks for
  ``branching`` critiques in one ``n`` request and rewrites the answer with each,
  concurrently. A node's value is its self-evaluated score sampled ``value_samples``
  times in one ``n`` request, combined as (min + mean) / 2 as in the paper. The answer
  is the node with the highest value.
- ``steps``: nodes are partial solutions. Expansion asks for ``branching`` next steps in
  one ``n`` request that continues the prefix and stops at ``step_delimiter``. A node's
  value comes from self-evaluating the partial solution, or (``value: rollout``) from
  completing it greedily and scoring the full solution. A node is terminal when its
  step holds a final answer or the model ended the solution. The answer is the
  highest-valued finished solution, else the best path completed greedily.

Budget in simulations; each simulation's independent requests go out together.
``parallel`` expands that many distinct leaves at once (virtual loss steers the
selections apart): the same calls in fewer sequential rounds, since each
expansion is 2–3 dependent rounds. Refine mode with simulations 5, branching 2
takes 2 + 3×5 = 17 rounds at parallel 1 and 2 + 3×3 = 11 at parallel 2 (the first
iteration has only the root to expand); a branching-1 tree is a chain, which
parallelism cannot shorten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import Field

from . import prompts
from .base import Candidate, RunContext, Strategy, StrategyParams, register
from .protocol import Choice, GenerationRequest
from .search import MCTS, Node, tree_trace


class MCTSParams(StrategyParams):
    mode: Literal["refine", "steps"] = "refine"
    simulations: int = Field(4, ge=1, le=256, json_schema_extra={"limit": "simulations"})
    branching: int = Field(2, ge=1, le=16, description="Children per expansion.", json_schema_extra={"limit": "branching"})
    parallel: int = Field(1, ge=1, le=16, description="Leaves expanded concurrently per iteration "
                          "(virtual loss): same calls, fewer sequential rounds.",
                          json_schema_extra={"limit": "branching"})
    max_depth: int = Field(4, ge=1, le=32, json_schema_extra={"limit": "depth"})
    exploration: float = Field(1.0, ge=0, le=10, description="UCT exploration constant c.")
    value_samples: int = Field(2, ge=1, le=16, description="Self-evaluations per node (r).",
                               json_schema_extra={"limit": "samples"})
    value: Literal["self_eval", "rollout"] = Field("self_eval", description="steps mode: how nodes are valued.")
    temperature: float = Field(0.8, ge=0, le=2)
    eval_temperature: float = Field(0.7, ge=0, le=2)
    step_delimiter: str = Field("\n", min_length=1, max_length=16)
    step_max_tokens: int = Field(128, ge=1, le=2048)


@dataclass(frozen=True)
class Answer:
    """refine mode state: a whole answer and the critique that produced it."""

    choice: Choice
    critique: str | None = None


@dataclass(frozen=True)
class Partial:
    """steps mode state: the solution so far; ``done`` once it is finished."""

    text: str
    done: bool = False
    choice: Choice | None = None


class LLMProblem:
    """Shared by both modes: scoring texts with ``value_samples`` self-evaluations."""

    def __init__(self, ctx: RunContext, params: MCTSParams) -> None:
        self.ctx, self.params = ctx, params

    async def score_texts(self, template: str, texts: Sequence[str]) -> list[float]:
        requests = [
            self.ctx.task.aux_request(template.format(task=self.ctx.task.instruction, response=text),
                                      n=self.params.value_samples, temperature=self.params.eval_temperature,
                                      max_tokens=4)
            for text in texts
        ]
        generations = await self.ctx.generate(requests)
        values = []
        for generation in generations:
            scores = [s for s in (prompts.parse_score(c.text) for c in generation.choices) if s is not None]
            values.append((min(scores) + sum(scores) / len(scores)) / 2 if scores else 0.0)
        return values


class RefineProblem(LLMProblem):
    def is_terminal(self, state: Answer) -> bool:
        return False

    async def expand(self, state: Answer) -> list[Answer]:
        task = self.ctx.task
        critique_prompt = prompts.CRITIQUE.format(task=task.instruction, response=state.choice.text)
        critiques = await self.ctx.sample(task.aux_request(critique_prompt, n=self.params.branching,
                                                           temperature=self.params.temperature, max_tokens=256))
        rewrites = [
            task.aux_request(prompts.REFINE.format(task=task.instruction, response=state.choice.text, feedback=c.text),
                             temperature=self.params.temperature, max_tokens=task.max_tokens or 512, stop=task.stop)
            for c in critiques
        ]
        generations = await self.ctx.generate(rewrites)
        return [Answer(g.choices[0], c.text) for c, g in zip(critiques, generations)]

    async def evaluate(self, states: Sequence[Answer]) -> list[float]:
        return await self.score_texts(prompts.SCORE, [s.choice.text for s in states])


class StepsProblem(LLMProblem):
    def is_terminal(self, state: Partial) -> bool:
        return state.done

    def _continue(self, prefix: str, **sampling) -> GenerationRequest:
        task = self.ctx.task
        if not task.is_chat:
            return task.sample_request(prompt=task.prompt + prefix, **sampling)
        if not prefix:
            return task.sample_request(**sampling)
        messages = task.messages + ({"role": "assistant", "content": prefix},)
        extra = task.extra + (("continue_final_message", True), ("add_generation_prompt", False))
        return task.sample_request(messages=messages, extra=extra, **sampling)

    async def expand(self, state: Partial) -> list[Partial]:
        delimiter = self.params.step_delimiter
        choices = await self.ctx.sample(self._continue(
            state.text, n=self.params.branching, temperature=self.params.temperature,
            max_tokens=self.params.step_max_tokens, stop=(delimiter, *self.ctx.task.stop)))
        children: dict[str, Partial] = {}
        for choice in choices:
            ended_step = choice.finish_reason == "stop" and choice.stop_reason == delimiter
            finished = (not choice.text.strip() or (choice.finish_reason == "stop" and not ended_step)
                        or _states_answer(choice.text))
            text = state.text + choice.text + (delimiter if ended_step and not finished else "")
            children.setdefault(text.strip(), Partial(text, finished, choice))  # identical steps merge
        return list(children.values())

    async def evaluate(self, states: Sequence[Partial]) -> list[float]:
        if self.params.value == "self_eval":
            return await self.score_texts(prompts.STEP_SCORE, [s.text for s in states])
        completed = await self.complete(states)
        return await self.score_texts(prompts.SCORE, [s.text for s in completed])

    async def complete(self, states: Sequence[Partial]) -> list[Partial]:
        """Greedy rollouts of unfinished solutions, concurrently."""
        todo = [s for s in states if not s.done]
        generations = await self.ctx.generate([self._continue(s.text, temperature=0.0) for s in todo])
        finished = iter(Partial(s.text + g.choices[0].text, True, g.choices[0]) for s, g in zip(todo, generations))
        return [s if s.done else next(finished) for s in states]


def _states_answer(text: str) -> bool:
    """A step that states a final answer ("the answer is", ####, \\boxed)."""
    lowered = text.lower()
    return "answer is" in lowered or "####" in text or "\\boxed{" in text


@register
class MonteCarloTreeSearch(Strategy):
    name = "mcts"
    description = "Monte Carlo Tree Search over refined answers (MCTSr) or solution steps."
    Params = MCTSParams

    async def run(self, ctx: RunContext, params: MCTSParams) -> Candidate:
        if params.mode == "refine":
            return await self._refine(ctx, params)
        return await self._steps(ctx, params)

    def _search(self, ctx: RunContext, problem, params: MCTSParams) -> MCTS:
        def on_expand(node: Node) -> None:
            ctx.emit("expand", node=node.index, depth=node.depth,
                     children=[{"id": c.index, "value": round(c.value, 4)} for c in node.children])
        return MCTS(problem, exploration=params.exploration, max_depth=params.max_depth, on_expand=on_expand,
                    parallel=params.parallel)

    async def _refine(self, ctx: RunContext, params: MCTSParams) -> Candidate:
        problem = RefineProblem(ctx, params)
        (draft,) = await ctx.sample(ctx.task.sample_request(temperature=params.temperature))
        ctx.propose(draft)
        (root_value,) = await problem.evaluate([Answer(draft)])
        tree = self._search(ctx, problem, params)
        root = tree.new_root(Answer(draft), root_value)

        def best(root: Node) -> Node:
            return max(root.walk(), key=lambda n: (n.value if n.value is not None else -1.0, -n.index))

        def track(root: Node) -> None:
            node = best(root)
            ctx.propose(node.state.choice, score=node.value)

        await tree.search(root, params.simulations, after_simulation=track)
        chosen = best(root)
        ctx.trace["tree"] = tree_trace(root, lambda s: {"text": s.choice.text, "critique": s.critique})
        ctx.trace["chosen"] = chosen.index
        return Candidate.of(chosen.state.choice)

    async def _steps(self, ctx: RunContext, params: MCTSParams) -> Candidate:
        problem = StepsProblem(ctx, params)
        tree = self._search(ctx, problem, params)
        root = tree.new_root(Partial(""))

        def finished(node: Node) -> bool:
            return node.state.done

        def track(root: Node) -> None:
            if any(finished(n) for n in root.walk()):
                node = tree.best_node(root, finished)
                ctx.propose(Candidate(node.state.text, None, "stop"), score=node.q)

        await tree.search(root, params.simulations, after_simulation=track)
        if any(finished(n) for n in root.walk()):
            chosen = tree.best_node(root, finished)
            state = chosen.state
        else:
            chosen = tree.best_path(root)[-1]
            (state,) = await problem.complete([chosen.state])
        ctx.trace["tree"] = tree_trace(root, lambda s: {"text": s.text, "done": s.done})
        ctx.trace["chosen"] = chosen.index
        message = {"role": "assistant", "content": state.text} if ctx.task.is_chat else None
        return Candidate(state.text, message, "stop")
