"""Self-consistency (Wang et al., 2022): sample k reasoning paths, majority-vote the answers.

- Samples of the one prompt go out as ``n=k`` requests (split above ``n_per_request``),
  all at once.
- Votes count extracted answers (``answers.extract_answer``), grouped by equivalence
  (``answers.AnswerBuckets``: ``1/2``, ``0.5`` and ``\\frac12`` are one answer; the first-seen
  form names the bucket); samples without an answer do not vote. A sample cut off by
  max_tokens votes only for an answer it states outright (``####``, ``\\boxed{}``, "the
  answer is"): its last number is wherever the cut fell (``extract_answer(cut_off=True)``).
  The winning answer's text is a finished sample's where it has one. ``weighting: logprob``
  weighs each vote by exp(mean token logprob), a weight in (0, 1].
- Tie-break: the larger vote weight, then the answer first seen earliest.
- ``adaptive`` (Adaptive-Consistency, Aggarwal et al., 2023) samples in waves and stops
  once the leader cannot be overtaken by the samples left, or the Beta posterior
  probability that the leader beats the runner-up passes ``confidence``. Stop rules use
  the decision's measure: with ``weighting: logprob`` only the overtaking rule applies,
  in weight (each sample left adds at most 1); the Beta posterior counts votes, so it is
  not used there.
- ``aggregate: llm`` (Universal Self-Consistency, Chen et al., 2023) asks the model which
  sample is most consistent with the others, for free-form answers.
- With ``verify``, every sample is checked once drawn and ``verification.pick`` decides:
  the vote among the samples passing every check (the first-drawn passing sample of the
  winning answer), else the sample with the best verifier report; ``aggregate: llm`` is
  then not used.
- Failed calls: the samples of a failed request are missing (``samples_missing``); the
  vote runs over the samples drawn. A wave that draws nothing ends sampling early once
  there are samples; with none at all, the failure surfaces. A failed USC selection
  falls back to the vote.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

from pydantic import Field, model_validator

from . import prompts
from .answers import AnswerBuckets, AnswerFormat, extract_answer, needs_math
from .base import Candidate, RunContext, Strategy, StrategyParams, cache_key, register, temperature_field
from .protocol import Choice
from .verification import Report, pick


class SelfConsistencyParams(StrategyParams):
    k: int = Field(8, ge=1, le=256, description="Samples to draw (the maximum, in adaptive mode).",
                   json_schema_extra={"limit": "samples"})
    default_temperature: ClassVar[float] = 0.7
    temperature: float | None = temperature_field(default_temperature)
    answer_format: AnswerFormat = "auto"
    weighting: Literal["none", "logprob"] = "none"
    adaptive: bool = False
    wave_size: int = Field(4, ge=1, le=64, description="Samples per wave in adaptive mode.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Adaptive stop: P(leader beats runner-up).")
    aggregate: Literal["vote", "llm"] = "vote"
    n_per_request: int = Field(16, ge=1, le=128, description="Split n above this into several requests.",
                               json_schema_extra={"limit": "samples"})

    @model_validator(mode="after")
    def _compatible(self) -> "SelfConsistencyParams":
        if self.aggregate == "llm" and self.adaptive:
            raise ValueError("aggregate=llm and adaptive cannot be combined")
        return self


@dataclass
class Tally:
    """Vote table: answer bucket -> count/weight/sample indices, in first-seen order.

    Rows are keyed by the bucket's representative (``answers.AnswerBuckets``)."""

    rows: dict[str, dict] = field(default_factory=dict)
    buckets: AnswerBuckets = field(default_factory=AnswerBuckets)

    def add(self, answer: str | None, weight: float, index: int) -> str | None:
        """Count one sample's vote; return the representative it was counted under."""
        if answer is None:
            return None
        answer = self.buckets.representative(answer)
        row = self.rows.setdefault(answer, {"answer": answer, "votes": 0, "weight": 0.0, "samples": []})
        row["votes"] += 1
        row["weight"] += weight
        row["samples"].append(index)
        return answer

    def ranked(self) -> list[dict]:
        # Stable sort keeps first-seen order among equal weights: the stated tie-break.
        return sorted(self.rows.values(), key=lambda r: r["weight"], reverse=True)

    def table(self) -> list[dict]:
        return [{**r, "weight": round(r["weight"], 4)} for r in self.ranked()]


def prob_leader_ahead(leader: int, runner_up: int) -> float:
    """P(p_leader > p_runner_up) under a uniform prior: P(X > 1/2), X ~ Beta(a+1, b+1).

    For integer parameters I_x(a, b) = P(Binomial(a+b-1, x) >= a), so the answer is a
    binomial tail sum — exact, no SciPy.
    """
    a, b = leader + 1, runner_up + 1
    n = a + b - 1
    return sum(math.comb(n, j) for j in range(a)) / 2**n


def should_stop(tally: Tally, drawn: int, k: int, confidence: float, *, weighted: bool) -> tuple[bool, str]:
    """Adaptive stop, in the measure that decides the winner: vote weight (``weighted``;
    each sample left can add at most 1) or vote count (then also the Beta posterior rule)."""
    ranked = tally.ranked()
    if not ranked:
        return False, ""
    measure = "weight" if weighted else "votes"
    leader = ranked[0][measure]
    runner_up = ranked[1][measure] if len(ranked) > 1 else 0
    if leader - runner_up > k - drawn:
        return True, "leader cannot be overtaken"
    if not weighted and prob_leader_ahead(leader, runner_up) >= confidence:
        return True, f"P(leader ahead) >= {confidence}"
    return False, ""


@register
class SelfConsistency(Strategy):
    name = "self-consistency"
    description = "Sample k answers in one batched request and return the majority answer."
    Params = SelfConsistencyParams

    async def run(self, ctx: RunContext, params: SelfConsistencyParams) -> Candidate:
        samples: list[Choice] = []
        tally = Tally()
        ctx.trace.update({"samples": [], "adaptive": params.adaptive})
        wave = params.wave_size if params.adaptive else params.k
        stop_reason = "k samples drawn"
        missing = 0  # samples of requests that failed
        while len(samples) + missing < params.k:
            count = min(wave, params.k - len(samples) - missing)
            new, lost = await self._draw(ctx, params, count)
            missing += lost
            if not new:  # every request of the wave failed
                if not samples:
                    raise ctx.first_failure()
                stop_reason = "sampling failed"
                break
            extracted = [extract_answer(choice.text, params.answer_format, cut_off=choice.cut_off) for choice in new]
            if any(answer is not None and needs_math(answer) for answer in extracted):
                # Math-Verify (sympy) work, bounded but CPU-bound: off the event loop.
                await asyncio.to_thread(tally.buckets.representatives, extracted)
            for choice, answer in zip(new, extracted):
                index = len(samples)
                samples.append(choice)
                weight = math.exp(choice.mean_logprob) if params.weighting == "logprob" and choice.mean_logprob is not None else 1.0
                answer = tally.add(answer, weight, index)
                ctx.trace["samples"].append({"text": choice.text, "answer": answer, "weight": round(weight, 4),
                                             "cut_off": choice.cut_off})
            ctx.emit("votes", drawn=len(samples), table=tally.table())
            ctx.propose(self._winner(samples, tally))
            if params.adaptive:
                stop, why = should_stop(tally, len(samples) + missing, params.k, params.confidence,
                                        weighted=params.weighting == "logprob")
                if stop:
                    stop_reason = why
                    break
        ctx.trace.update({"votes": tally.table(), "samples_used": len(samples), "stop": stop_reason,
                          "samples_missing": missing})
        if ctx.verification:
            reports = await ctx.verification.check(ctx, [s.text for s in samples])
            chosen = pick(ctx, reports, self.vote_among_passing(ctx.trace["samples"], reports),
                          self.winner_index(samples, tally))
            return Candidate.of(samples[chosen])
        if params.aggregate == "llm" and len(samples) > 1:
            return await self._select_consistent(ctx, samples, self._winner(samples, tally))
        return self._winner(samples, tally)

    async def _draw(self, ctx: RunContext, params: SelfConsistencyParams, count: int) -> tuple[list[Choice], int]:
        """The samples drawn, and how many were lost to failed requests."""
        sizes = [min(params.n_per_request, count - i) for i in range(0, count, params.n_per_request)]
        requests = [
            ctx.task.sample_request(n=size, temperature=params.temperature, logprobs=params.weighting == "logprob")
            for size in sizes
        ]
        generations = await ctx.generate(requests, allow_partial=True)
        drawn = [choice for generation in generations if generation is not None for choice in generation.choices]
        return drawn, sum(r.n for r, g in zip(requests, generations) if g is None)

    @classmethod
    def _winner(cls, samples: list[Choice], tally: Tally) -> Candidate:
        return Candidate.of(samples[cls.winner_index(samples, tally)])

    @staticmethod
    def winner_index(samples: list[Choice], tally: Tally) -> int:
        ranked = tally.ranked()
        if not ranked:  # no sample states an answer: the first finished one
            return next((i for i, sample in enumerate(samples) if not sample.cut_off), 0)
        members = ranked[0]["samples"]
        # Representative: a finished sample before one cut off, then the most confident (first on ties).
        return max(members, key=lambda i: (not samples[i].cut_off,
                                           samples[i].mean_logprob if samples[i].mean_logprob is not None else 0.0))

    @staticmethod
    def vote_among_passing(rows: list[dict], reports: list[Report]) -> Callable[[int], float]:
        """The vote with verifiers: a sample's answer weighs the votes of the samples that pass
        every check (all samples if none does)."""
        pool = [i for i, r in enumerate(reports) if r.passed] or range(len(reports))
        weights: dict[str, float] = {}
        for i in pool:
            if rows[i]["answer"] is not None:
                weights[rows[i]["answer"]] = weights.get(rows[i]["answer"], 0.0) + rows[i]["weight"]
        return lambda i: weights.get(rows[i]["answer"], 0.0)

    async def _select_consistent(self, ctx: RunContext, samples: list[Choice], fallback: Candidate) -> Candidate:
        texts = [s.text for s in samples]
        prompt = prompts.SELECT_CONSISTENT.format(task=ctx.task.conversation, responses=prompts.render_responses(texts))
        numbers = tuple(f"{space}{i + 1}" for space in ("", " ") for i in range(len(samples)))
        request = ctx.task.aux_request(prompt, temperature=0.0, max_tokens=8, allowed_replies=numbers)
        key = cache_key(ctx.model_id, prompts.PROMPT_VERSION, "usc", ctx.task.identity, texts)
        reply = await ctx.cached_text("judgment", key, request, whole=False, allow_partial=True)
        if reply is None:  # the selection call failed: the vote decides
            ctx.trace["usc"] = {"failed": True, "selected": None}
            return fallback
        index = prompts.parse_choice_number(reply, len(samples))
        ctx.trace["usc"] = {"reply": reply, "selected": index}
        ctx.emit("selected", index=index)
        return Candidate.of(samples[index if index is not None else 0])
