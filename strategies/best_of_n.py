"""LLM-judge Best-of-N (optillm's ``bon``), with the ratings issued concurrently.

N candidates are drawn in one ``n=N`` request; the model then rates every distinct
candidate 0-10 with the ``SCORE`` prompt, all ratings at once rather than one after
another. ``judge_samples`` ratings per candidate travel as one ``n`` request and are
averaged; an unparseable rating counts as 0. The best mean wins, ties going to the
earliest sample; a candidate cut off by max_tokens (``cut_off`` in the trace) only wins
when every candidate was. A single greedy rating (the default) is cached by content.
With ``verify``, candidates are checked while they are rated, and ``verification.pick``
decides: the best-rated among those passing every check, else the best verifier report.

A rating call that fails for good drops its candidate (``score: null``,
``trace["unrated"]`` counts them); with no candidate rated, the failure surfaces.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from . import prompts
from .base import (
    Candidate, RunContext, Strategy, StrategyParams, cache_key, finished_first, register, temperature_field,
)
from .verification import alongside, pick


class BestOfNParams(StrategyParams):
    n: int = Field(8, ge=1, le=128, description="Candidates drawn.", json_schema_extra={"limit": "samples"})
    default_temperature: ClassVar[float] = 0.8
    temperature: float | None = temperature_field(default_temperature)
    judge_samples: int = Field(1, ge=1, le=16, description="Ratings per candidate, averaged (1 = one greedy rating).",
                               json_schema_extra={"limit": "samples"})
    judge_temperature: float = Field(0.7, ge=0, le=2, description="Rating temperature when judge_samples > 1.")


@register
class BestOfN(Strategy):
    name = "best-of-n"
    description = "Sample N candidates, have the model rate each 0-10, return the best-rated."
    Params = BestOfNParams

    async def run(self, ctx: RunContext, params: BestOfNParams) -> Candidate:
        candidates = await ctx.sample(ctx.task.sample_request(n=params.n, temperature=params.temperature))
        ctx.propose(candidates[0])
        distinct = list(dict.fromkeys(c.text for c in candidates))  # identical texts are rated once
        rated_replies, reports = await alongside(ctx, [c.text for c in candidates], self._rate(ctx, params, distinct))
        ratings = dict(zip(distinct, rated_replies))
        # A candidate whose rating call failed has no row: it is left out, not scored 0.
        parsed = [None if ratings[c.text] is None else [prompts.parse_score(reply) for reply in ratings[c.text]]
                  for c in candidates]
        means = [None if row is None else sum(s or 0.0 for s in row) / len(row) for row in parsed]
        rated = [i for i, m in enumerate(means) if m is not None]
        if not rated and reports is None:
            raise ctx.first_failure()
        rank = finished_first(candidates, means)
        best = max(rated or range(len(candidates)), key=rank)  # max keeps the first of equals
        best = pick(ctx, reports, rank, best)  # with verify: passing candidates first
        ctx.propose(candidates[best], score=means[best])
        ctx.trace["candidates"] = [
            {"text": c.text, "scores": None if row is None else [None if s is None else round(s, 4) for s in row],
             "score": None if m is None else round(m, 4), "cut_off": c.cut_off}
            for c, row, m in zip(candidates, parsed, means)
        ]
        ctx.trace["unparsed"] = sum(s is None for row in parsed if row is not None for s in row)
        ctx.trace["unrated"] = len(candidates) - len(rated)
        ctx.trace["chosen"] = best
        ctx.emit("verdicts", scores=[None if m is None else round(m, 4) for m in means], chosen=best)
        return Candidate.of(candidates[best])

    async def _rate(self, ctx: RunContext, params: BestOfNParams, texts: list[str]) -> list[list[str] | None]:
        """Each text's rating replies (``None`` where the call failed), all issued at once:
        one batch, or, for cacheable greedy ratings, concurrent cached lookups that rate
        only the misses."""
        greedy = params.judge_samples == 1
        requests = [
            ctx.task.aux_request(prompts.SCORE.format(task=ctx.task.conversation, response=text),
                                 n=params.judge_samples, temperature=0.0 if greedy else params.judge_temperature,
                                 max_tokens=4, allowed_replies=prompts.SCORE_REPLIES)
            for text in texts
        ]
        if not greedy:  # sampled ratings are never cached
            generations = await ctx.generate(requests, allow_partial=True)
            return [None if g is None else [c.text for c in g.choices] for g in generations]
        replies = await ctx.cached_texts("judgment", requests, lambda: [
            cache_key(ctx.model_id, prompts.PROMPT_VERSION, "rate", ctx.task.identity, text) for text in texts],
            whole=False, allow_partial=True)
        return [None if reply is None else [reply] for reply in replies]
