"""``auto``: spend compute only where the samples disagree (or fail the checks).

The idea of MAgICoRe (Chen et al., 2024, "MAgICoRe: Multi-Agent, Iterative, Coarse-to-Fine
Refinement for Reasoning", arXiv:2409.12147): sort problems into easy and hard by how well
the first samples agree; answer easy ones by aggregation, and spend refinement, guided by
an outside reviewer, on hard ones only. Between the two stages, more samples are drawn in
waves with Adaptive-Consistency's stopping rule (Aggarwal et al., 2023, "Let's Sample Step
by Step: Adaptive-Consistency for Efficient Reasoning and Coding with LLMs"). Here the
reviewer is the request's ``verify`` list (no learned reward model, and no self-critique:
without an outside signal, refinement does not help; Huang et al., 2023).

1. First wave: ``first_wave`` samples in one ``n`` request; answers extracted and
   grouped as in self-consistency; every sample verified.
2. Answer at once when some sample passes every verifier, or, without verifiers, when
   the share of the first wave voting for the leading answer reaches ``agreement``
   (1.0 = unanimous).
3. Otherwise escalate: waves of ``wave_size`` more samples up to ``max_samples``, each
   verified, stopping once a sample passes every verifier or, without verifiers, once
   the leader cannot be overtaken or P(leader ahead) >= ``confidence`` (Beta posterior,
   as in ``self-consistency``'s adaptive mode).
4. With verifiers and still no passing sample: up to ``refine_rounds`` rounds of
   verifier-guided refinement of the disagreeing answers: per round, the best-reported
   sample of each of the ``refine_width`` leading answer groups (distinct answers first,
   then the best remaining reports) is rewritten with its failing checks' feedback, all
   rewrites in one batch, then verified; stop once one passes.
5. The answer: ``verification.pick`` over every sample and rewrite (passing ones first,
   the vote among them), or the plain vote without verifiers.

``trace["path"]`` lists the stages taken, each with why it ended the run or escalated.

Failed calls (``trace["failed_calls"]``): a later wave whose request fails for good ends
the sampling with the samples drawn; a rewrite that fails is left out (a round whose
rewrites all fail ends the refinement). Without a first wave, the failure surfaces.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from pydantic import Field, model_validator

from .answers import AnswerFormat, extract_answer, needs_math
from .base import Candidate, RunContext, Strategy, StrategyParams, register, temperature_field
from .protocol import Choice
from .self_consistency import SelfConsistency, Tally, should_stop
from .verification import Report, pick, rewrite_failing


class AutoParams(StrategyParams):
    first_wave: int = Field(4, ge=1, le=64, description="Samples drawn first (one n request).",
                            json_schema_extra={"limit": "samples"})
    max_samples: int = Field(16, ge=1, le=256, description="Samples at most, first wave included.",
                             json_schema_extra={"limit": "samples"})
    wave_size: int = Field(4, ge=1, le=64, description="Samples per escalation wave.")
    agreement: float = Field(1.0, gt=0.5, le=1, description="Share of the first wave on the leading answer "
                             "that answers at once (without verifiers).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Escalation stop: P(leader beats runner-up).")
    refine_rounds: int = Field(2, ge=0, le=16, description="Verifier-guided refinement rounds when nothing passes.",
                               json_schema_extra={"limit": "rounds"})
    refine_width: int = Field(2, ge=1, le=16, description="Answers rewritten per refinement round.",
                              json_schema_extra={"limit": "branching"})
    default_temperature: ClassVar[float] = 0.7
    temperature: float | None = temperature_field(default_temperature)
    answer_format: AnswerFormat = "auto"

    @model_validator(mode="after")
    def _waves_fit(self) -> "AutoParams":
        if self.first_wave > self.max_samples:
            raise ValueError("first_wave must not exceed max_samples")
        return self


class Pool:
    """Every sample and rewrite so far, their vote rows, tally and (with verifiers) reports."""

    def __init__(self) -> None:
        self.choices: list[Choice] = []
        self.rows: list[dict] = []
        self.reports: list[Report] = []
        self.tally = Tally()

    async def add(self, ctx: RunContext, params: AutoParams, new: list[Choice], stage: str) -> list[Report]:
        extracted = [extract_answer(c.text, params.answer_format, cut_off=c.cut_off) for c in new]
        if any(a is not None and needs_math(a) for a in extracted):
            # Math-Verify grouping is CPU-bound: off the event loop (as in self-consistency).
            await asyncio.to_thread(self.tally.buckets.representatives, extracted)
        for choice, answer in zip(new, extracted):
            index = len(self.choices)
            self.choices.append(choice)
            self.rows.append({"text": choice.text, "answer": self.tally.add(answer, 1.0, index), "weight": 1.0,
                              "cut_off": choice.cut_off, "stage": stage})
        reports: list[Report] = []
        if ctx.verification:
            reports = await ctx.verification.check(ctx, [c.text for c in new], stage=stage)
            self.reports += reports
            for row, report in zip(self.rows[-len(new):], reports):
                row.update(report.as_trace())
        ctx.emit("votes", drawn=len(self.choices), table=self.tally.table())
        return reports

    @property
    def any_passed(self) -> bool:
        return any(r.passed for r in self.reports)

    def choice(self, ctx: RunContext) -> int:
        own = SelfConsistency.winner_index(self.choices, self.tally)
        if not self.reports:
            return own
        return pick(ctx, self.reports, SelfConsistency.vote_among_passing(self.rows, self.reports), own)

    def refine_targets(self, width: int) -> list[int]:
        """The best-reported sample of each leading answer group, then the best other reports."""
        by_rank = sorted(range(len(self.choices)), key=lambda i: (self.reports[i].rank, -i), reverse=True)
        targets: list[int] = []
        for row in self.tally.ranked():
            members = set(row["samples"])
            targets.append(next(i for i in by_rank if i in members))
        seen = {self.choices[i].text.strip() for i in targets}
        for i in by_rank:
            if self.choices[i].text.strip() not in seen:
                targets.append(i)
                seen.add(self.choices[i].text.strip())
        return targets[:width]


@register
class Auto(Strategy):
    name = "auto"
    description = ("Small first wave; answer at once if it agrees or a sample passes every verifier, else more "
                   "samples, then verifier-guided refinement of the disagreeing answers.")
    Params = AutoParams

    async def run(self, ctx: RunContext, params: AutoParams) -> Candidate:
        pool = Pool()
        path: list[dict] = []
        ctx.trace.update({"path": path, "samples": pool.rows})
        await self._draw(ctx, params, pool, params.first_wave, "first wave")
        done, why = self._first_wave_settles(ctx, params, pool)
        path.append({"stage": "first wave", "samples": params.first_wave, "answer_now": done, "why": why})
        if not done:
            await self._escalate(ctx, params, pool, path)
        if ctx.verification and not pool.any_passed and params.refine_rounds:
            await self._refine(ctx, params, pool, path)
        chosen = pool.choice(ctx)
        ctx.trace.update({"votes": pool.tally.table(), "samples_used": len(pool.choices), "chosen": chosen,
                          "decided_by": path[-1]["stage"]})
        return Candidate.of(pool.choices[chosen])

    @staticmethod
    async def _draw(ctx: RunContext, params: AutoParams, pool: Pool, count: int, stage: str) -> bool:
        """Draw and verify a wave; False when its request failed for good (after a first wave)."""
        new = await ctx.sample(ctx.task.sample_request(n=count, temperature=params.temperature),
                               allow_partial=True)
        if new is None:
            if not pool.choices:
                raise ctx.first_failure()
            return False
        await pool.add(ctx, params, new, stage)
        ctx.propose(pool.choices[pool.choice(ctx)])
        return True

    @staticmethod
    def _first_wave_settles(ctx: RunContext, params: AutoParams, pool: Pool) -> tuple[bool, str]:
        if ctx.verification:
            if pool.any_passed:
                return True, "a sample passes every verifier"
            return False, "no sample passes every verifier"
        ranked = pool.tally.ranked()
        share = ranked[0]["votes"] / params.first_wave if ranked else 0.0
        if share >= params.agreement:
            return True, f"{share:.0%} of the first wave agree (>= {params.agreement:.0%})"
        return False, f"only {share:.0%} of the first wave agree (< {params.agreement:.0%})"

    async def _escalate(self, ctx: RunContext, params: AutoParams, pool: Pool, path: list[dict]) -> None:
        stage = {"stage": "more samples", "samples": 0, "why": f"max_samples={params.max_samples} drawn"}
        path.append(stage)
        while len(pool.choices) < params.max_samples:
            count = min(params.wave_size, params.max_samples - len(pool.choices))
            if not await self._draw(ctx, params, pool, count, "more samples"):
                stage["why"] = "sampling failed"
                return
            stage["samples"] += count
            if ctx.verification:
                if pool.any_passed:
                    stage["why"] = "a sample passes every verifier"
                    return
                continue
            stop, why = should_stop(pool.tally, len(pool.choices), params.max_samples, params.confidence,
                                    weighted=False)
            if stop:
                stage["why"] = why
                return

    async def _refine(self, ctx: RunContext, params: AutoParams, pool: Pool, path: list[dict]) -> None:
        stage = {"stage": "refinement", "rounds": 0, "why": "refine_rounds spent, none passes"}
        path.append(stage)
        for _ in range(params.refine_rounds):
            targets = pool.refine_targets(params.refine_width)
            rewrites = await rewrite_failing(ctx, [pool.choices[i].text for i in targets],
                                             [pool.reports[i] for i in targets], temperature=params.temperature)
            written = [(rewrite, source) for rewrite, source in zip(rewrites, targets) if rewrite is not None]
            if not written:
                stage["why"] = "every rewrite failed"
                return
            await pool.add(ctx, params, [rewrite for rewrite, _ in written], "refinement")
            for row, (_, source) in zip(pool.rows[-len(written):], written):
                row["from"] = source
            ctx.propose(pool.choices[pool.choice(ctx)])
            stage["rounds"] += 1
            if pool.any_passed:
                stage["why"] = "a rewrite passes every verifier"
                return
