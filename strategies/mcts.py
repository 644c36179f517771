"""MCTS with an LLM, on the generic searches in ``search.py``. Two modes:

- ``refine``: MCTSr (Monte Carlo Tree Self-refine; Zhang et al., 2024, "Accessing GPT-4
  level Mathematical Olympiad Solutions via Monte Carlo Tree Self-refine with LLaMa-3
  8B", arXiv:2406.07394), on ``search.MCTSr``. Nodes are whole answers; the root is a
  sampled draft. Expanding a node asks for ``branching`` critiques in one ``n`` request
  and rewrites the answer with each (``refine_request``: the caller's conversation,
  tools and response format kept), concurrently. Rewards: ``value_samples`` strict
  self-evaluations (``REWARD``, 0-10 read as [0, 1]) in one ``n`` request per visit;
  full-score suppression (>= 0.975 counts 0.75);
  Q(a) = ½(min R_a + mean R_a); backup Q'(a) = ½(Q(a) + max over children Q'(c));
  selection by UCT(a) = Q'(a) + c·sqrt(ln(N(parent) + 1) / (N(a) + ε)) among nodes
  not fully expanded (fewer than ``branching`` children, or every child below the node);
  a selected node is rewarded again while it is expanded. The answer is the node with
  the highest Q'. Per simulation: the re-reward and the critiques together, then the
  rewrites, then the children's rewards: 3 rounds.
- ``steps``: plain UCT (``search.MCTS``; as in RAP, Hao et al., 2023) over partial
  solutions. Expansion asks for ``branching`` next steps in one ``n`` request that
  continues the prefix and stops at ``step_delimiter``. A step is finished only by the
  model's end of sequence, the task's own stop string or an answer marker ("the answer
  is", ``####``, ``\\boxed{``). A blank step is no step (an empty continuation is no
  solution): it is dropped, and ``min_tokens: 1`` (vLLM) keeps a delimiter the model
  opens with from ending a step at once. In chat mode the prefix travels as a continued
  assistant message (``continue_final_message``); templates that trim it (Gemma's,
  Llama 3's) drop its trailing delimiter, which the model then writes again: that
  leading delimiter is not doubled in the step. A node's value comes from self-evaluating
  the partial solution (``value_samples`` scores, ½(min + mean)), or (``value:
  rollout``) from completing it greedily and scoring the full solution. The answer is
  the highest-valued finished solution, else the best path completed greedily.

Budget in simulations; each simulation's independent requests go out together.
``parallel`` expands that many nodes at once (refine: the top-UCT candidates; steps:
distinct leaves kept apart by virtual loss): the same calls in fewer sequential
rounds. Refine mode with simulations 5, branching 2 takes 2 + 3×5 = 17 rounds at
parallel 1 and 2 + 3×3 = 11 at parallel 2 (the first iteration has only the root to
expand); in steps mode a branching-1 tree is a chain, which parallelism cannot shorten.

Failed calls: a child whose critique, rewrite, step, reward or evaluation call failed
for good, or whose rewrite is blank (refine mode), is left out of the tree (an expansion left with no child is a dead end; a
failed re-reward adds no reward), listed in ``trace["failed_calls"]``, and the search
carries on. Any other backend call that fails for good ends the search, not the run:
the best answer so far comes back with ``budget_limited``, the error in
``trace["error"]`` and the stop reason saying so. With no draft, no reward for the
draft or no final completion, the error is raised.

With ``verify`` (refine mode): a node's reward is its mean verifier score (one per visit,
no full-score suppression), the failing checks' feedback joins each critique in the
rewrite prompt, the search stops as soon as an answer passes every check, and the answer
is the node with the best verifier report (then the highest Q'). Steps mode does not
verify partial solutions; it picks among the finished ones with ``verification.pick``
(passing ones first, then the highest mean value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import Field

from . import prompts
from .base import (
    BudgetExhausted, Candidate, RunContext, Strategy, StrategyError, StrategyParams, register, temperature_field,
)
from .protocol import Choice, GenerationRequest
from .search import MCTS, MCTSr, Node, RewardNode, tree_trace
from .verification import Report, pick, with_feedback


class _Passed(Exception):
    """Ends a verified refine search: an answer passes every verifier."""


class MCTSParams(StrategyParams):
    mode: Literal["refine", "steps"] = "refine"
    simulations: int = Field(4, ge=1, le=256, json_schema_extra={"limit": "simulations"})
    branching: int = Field(2, ge=1, le=16, description="Children per expansion (refine: also the children a node "
                           "needs to count as fully expanded).", json_schema_extra={"limit": "branching"})
    parallel: int = Field(1, ge=1, le=16, description="Leaves expanded concurrently per iteration "
                          "(virtual loss): same calls, fewer sequential rounds.",
                          json_schema_extra={"limit": "branching"})
    max_depth: int = Field(4, ge=1, le=32, json_schema_extra={"limit": "depth"})
    exploration: float = Field(1.0, ge=0, le=10, description="UCT exploration constant c.")
    value_samples: int = Field(2, ge=1, le=16, description="Self-evaluations per visit (refine: rewards sampled "
                               "each time a node is valued or selected; steps: per node).",
                               json_schema_extra={"limit": "samples"})
    value: Literal["self_eval", "rollout"] = Field("self_eval", description="steps mode: how nodes are valued.")
    default_temperature: ClassVar[float] = 0.8
    temperature: float | None = temperature_field(default_temperature)
    eval_temperature: float = Field(0.7, ge=0, le=2)
    step_delimiter: str = Field("\n", min_length=1, max_length=16)
    step_max_tokens: int = Field(128, ge=1, le=2048, json_schema_extra={"limit": "tokens"})


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
    """Shared by both modes: ``value_samples`` self-evaluations of texts in one ``n`` request each."""

    def __init__(self, ctx: RunContext, params: MCTSParams) -> None:
        self.ctx, self.params = ctx, params

    async def sample_scores(self, template: str, texts: Sequence[str]) -> list[list[float] | None]:
        """Each text's readable scores in [0, 1] (unreadable replies are left out);
        None where the call failed."""
        requests = [
            self.ctx.task.aux_request(template.format(task=self.ctx.task.conversation, response=text),
                                      n=self.params.value_samples, temperature=self.params.eval_temperature,
                                      max_tokens=4, allowed_replies=prompts.SCORE_REPLIES)
            for text in texts
        ]
        generations = await self.ctx.generate(requests, allow_partial=True)
        return [None if g is None else [s for s in (prompts.parse_score(c.text) for c in g.choices) if s is not None]
                for g in generations]


class RefineProblem(LLMProblem):
    """MCTSr's answer space for ``search.MCTSr``."""

    def is_terminal(self, state: Answer) -> bool:
        return False

    def __init__(self, ctx: RunContext, params: MCTSParams) -> None:
        super().__init__(ctx, params)
        self.reports: dict[str, Report] = {}
        """With ``verify``: each answer text's verifier report."""

    async def expand(self, state: Answer) -> list[Answer]:
        task = self.ctx.task
        critique_prompt = prompts.CRITIQUE.format(task=task.conversation, response=state.choice.text)
        critiques = await self.ctx.sample(task.aux_request(critique_prompt, n=self.params.branching,
                                                           temperature=self.params.temperature, max_tokens=256),
                                          allow_partial=True)
        if critiques is None:
            return []
        report = self.reports.get(state.choice.text)
        rewrites = [task.refine_request(state.choice.text, with_feedback(c.text, report),
                                        temperature=self.params.temperature,
                                        max_tokens=task.max_tokens or 512)
                    for c in critiques]
        generations = await self.ctx.generate(rewrites, allow_partial=True)
        # A failed call or a blank rewrite adds no child: a blank answer is no answer to score.
        return [Answer(g.choices[0], c.text) for c, g in zip(critiques, generations)
                if g is not None and not g.choices[0].blank]

    async def rewards(self, states: Sequence[Answer]) -> list[list[float] | None]:
        """Self-rewards (None where the call failed); with ``verify``, the mean verifier
        score instead (one reward per visit)."""
        texts = [s.choice.text for s in states]
        if not self.ctx.verification:
            return await self.sample_scores(prompts.REWARD, texts)
        reports = await self.ctx.verification.check(self.ctx, texts)
        self.reports.update(zip(texts, reports))
        return [[report.score] for report in reports]


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
        # min_tokens (vLLM): a delimiter the model opens with (a blank line, or the one a
        # trimming chat template dropped from the prefix) cannot end the step at once.
        request = self._continue(state.text, n=self.params.branching, temperature=self.params.temperature,
                                 max_tokens=self.params.step_max_tokens, stop=(delimiter, *self.ctx.task.stop))
        request = replace(request, extra=request.extra + (("min_tokens", 1),))
        choices = await self.ctx.sample(request, allow_partial=True)
        if choices is None:
            return []
        children: dict[str, Partial] = {}
        for choice in choices:
            step = choice.text
            if state.text.endswith(delimiter) and step.startswith(delimiter):
                step = step[len(delimiter):]  # the delimiter a trimming template dropped, said again
            if not step.strip():
                continue  # a blank step is no step (and an empty continuation no solution)
            ended = _ending(choice, delimiter, self.ctx.task.stop)
            finished = ended == "solution" or _states_answer(step)
            text = state.text + step + (delimiter if ended == "step" and not finished else "")
            children.setdefault(text.strip(), Partial(text, finished, choice))  # identical steps merge
        return list(children.values())

    async def evaluate(self, states: Sequence[Partial]) -> list[float | None]:
        """Each state's value; None where a rollout or evaluation call failed."""
        if self.params.value == "self_eval":
            scores = await self.sample_scores(prompts.STEP_SCORE, [s.text for s in states])
        else:
            completed = await self.complete(states)
            rolled = iter(await self.sample_scores(prompts.SCORE, [s.text for s in completed if s is not None]))
            scores = [None if s is None else next(rolled) for s in completed]
        return [None if row is None else (min(row) + sum(row) / len(row)) / 2 if row else 0.0 for row in scores]

    async def complete(self, states: Sequence[Partial]) -> list[Partial | None]:
        """Greedy rollouts of unfinished solutions, concurrently; None where one failed."""
        todo = [s for s in states if not s.done]
        generations = await self.ctx.generate([self._continue(s.text, temperature=0.0) for s in todo],
                                              allow_partial=True)
        finished = iter(None if g is None else Partial(s.text + g.choices[0].text, True, g.choices[0])
                        for s, g in zip(todo, generations))
        return [s if s.done else next(finished) for s in states]


def _ending(choice: Choice, delimiter: str, task_stop: Sequence[str]) -> str:
    """How a continuation ended: ``"step"`` at the step delimiter, ``"solution"`` by the
    model's end of sequence (or a stop token) or by the task's own stop string (even one
    equal to the delimiter), ``"cut"`` at ``step_max_tokens``."""
    if choice.finish_reason != "stop":
        return "cut"
    if choice.stop_reason == delimiter and delimiter not in task_stop:
        return "step"
    return "solution"


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

    @staticmethod
    def _on_expand(ctx: RunContext) -> Callable[[Any], None]:
        def on_expand(node: Any) -> None:
            ctx.emit("expand", node=node.index, depth=node.depth,
                     children=[{"id": c.index, "value": round(c.value, 4)} for c in node.children])
        return on_expand

    @staticmethod
    async def _search(ctx: RunContext, tree: MCTS | MCTSr, root: Any, simulations: int,
                      track: Callable[[Any], None]) -> None:
        """The search; a backend call that fails for good ends it, not the run, once an
        answer exists (``ctx.interrupt``)."""
        try:
            await tree.search(root, simulations, after_simulation=track)
        except _Passed:
            ctx.trace["stop"] = "an answer passes every verifier"
        except (BudgetExhausted, StrategyError):
            raise
        except Exception as exc:
            if ctx.best is None:
                raise
            ctx.interrupt(exc)

    async def _refine(self, ctx: RunContext, params: MCTSParams) -> Candidate:
        problem = RefineProblem(ctx, params)
        (draft,) = await ctx.sample(ctx.task.sample_request(temperature=params.temperature))
        ctx.propose(draft)
        verified = bool(ctx.verification)
        # Verifier scores are not self-rewards: no full-score suppression for them.
        tree = MCTSr(problem, exploration=params.exploration, max_depth=params.max_depth,
                     max_children=params.branching, parallel=params.parallel, on_expand=self._on_expand(ctx),
                     **({"full_score": math.inf} if verified else {}))
        root = None

        def best(root: RewardNode) -> RewardNode:
            if not verified:
                return tree.best(root)
            # With verify: the best verifier report, then MCTSr's Q' (ties: the earlier node).
            return max(root.walk(), key=lambda n: (problem.reports[n.state.choice.text].rank, n.value, -n.index))

        def track(root: RewardNode) -> None:
            node = best(root)
            if not verified:
                ctx.propose(node.state.choice, score=node.value)
                return
            report = problem.reports[node.state.choice.text]
            ctx.propose(node.state.choice, score=(report.rank, node.value))
            if report.passed:
                raise _Passed

        try:
            (rewards,) = await problem.rewards([Answer(draft)])
            if rewards is None:  # nothing to compare the children with
                raise ctx.first_failure()
            root = tree.new_root(Answer(draft), rewards)
            if verified and problem.reports[draft.text].passed:
                ctx.trace["stop"] = "an answer passes every verifier"
            else:
                await self._search(ctx, tree, root, params.simulations, track)
        finally:
            if root is not None:
                ctx.trace["tree"] = tree_trace(root, lambda s: {"text": s.choice.text, "critique": s.critique})
        chosen = best(root)
        ctx.trace["chosen"] = chosen.index
        if verified:
            ctx.trace["verification"] = problem.reports[chosen.state.choice.text].as_trace()
        return Candidate.of(chosen.state.choice)

    async def _steps(self, ctx: RunContext, params: MCTSParams) -> Candidate:
        problem = StepsProblem(ctx, params)
        tree = MCTS(problem, exploration=params.exploration, max_depth=params.max_depth,
                    on_expand=self._on_expand(ctx), parallel=params.parallel)
        root = tree.new_root(Partial(""))

        def finished(node: Node) -> bool:
            return node.state.done

        def track(root: Node) -> None:
            if any(finished(n) for n in root.walk()):
                node = tree.best_node(root, finished)
                message = {"role": "assistant", "content": node.state.text} if ctx.task.is_chat else None
                ctx.propose(Candidate(node.state.text, message, "stop"), score=node.q)

        try:
            await self._search(ctx, tree, root, params.simulations, track)
        finally:
            ctx.trace["tree"] = tree_trace(root, lambda s: {"text": s.text, "done": s.done})
        if ctx.interrupted:
            return ctx.best
        solutions = [n for n in root.walk() if finished(n)]
        if solutions and ctx.verification:  # the finished solutions, passing ones first (verification.pick)
            reports = await ctx.verification.check(ctx, [n.state.text for n in solutions])
            own = solutions.index(tree.best_node(root, finished))
            chosen = solutions[pick(ctx, reports, lambda i: solutions[i].q, own)]
            state = chosen.state
        elif solutions:
            chosen = tree.best_node(root, finished)
            state = chosen.state
        else:
            chosen = tree.best_path(root)[-1]
            (state,) = await problem.complete([chosen.state])
            if state is None:
                raise ctx.first_failure()
        ctx.trace["chosen"] = chosen.index
        message = {"role": "assistant", "content": state.text} if ctx.task.is_chat else None
        return Candidate(state.text, message, "stop")
