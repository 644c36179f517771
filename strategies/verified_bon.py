"""Verified Best-of-N: sample, check with the request's verifiers, rewrite the failures with their feedback.

Algorithm (rejection sampling with verifier-guided repair, as in generate-verify-refine
pipelines such as Self-Debugging, Chen et al., 2023, and LEVER, Ni et al., 2023):

1. draw ``n`` candidates in one ``n=N`` request and verify every one;
2. if some candidate passes every verifier, stop;
3. otherwise, for up to ``rounds`` rounds: take the ``rewrites`` best failing candidates
   (by report: checks passed, then mean score; distinct texts only), rewrite each with the
   ``REFINE`` prompt (``Task.refine_request``: the caller's conversation kept) whose feedback is the failing verifiers' feedback (all rewrites in one
   batch), verify the rewrites, add them to the pool, and stop once one passes;
4. answer with ``verification.choose`` over the whole pool: a candidate passing every
   check, the earliest of those; else the best report. A rewrite never displaces a better
   candidate, because the pool keeps every version.

Needs a ``verify`` list (400 naming ``verify`` otherwise). Budget stops return the best
candidate so far. A rewrite whose call fails for good is left out (``trace["failed_calls"]``);
a round whose rewrites all fail ends the rounds.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from .base import Candidate, RunContext, Strategy, StrategyError, StrategyParams, register, temperature_field
from .protocol import Choice
from .verification import Report, choose, rewrite_failing


class VerifiedBoNParams(StrategyParams):
    n: int = Field(8, ge=1, le=128, description="Candidates drawn first.", json_schema_extra={"limit": "samples"})
    rounds: int = Field(2, ge=0, le=16, description="Rewrite rounds while nothing passes.",
                        json_schema_extra={"limit": "rounds"})
    rewrites: int = Field(2, ge=1, le=16, description="Best failing candidates rewritten per round.",
                          json_schema_extra={"limit": "branching"})
    default_temperature: ClassVar[float] = 0.8
    temperature: float | None = temperature_field(default_temperature)


@register
class VerifiedBestOfN(Strategy):
    name = "verified-bon"
    description = ("Sample N candidates, check them with the request's verifiers, rewrite the best failing "
                   "ones with the verifiers' feedback until one passes.")
    Params = VerifiedBoNParams

    async def run(self, ctx: RunContext, params: VerifiedBoNParams) -> Candidate:
        verification = ctx.verification
        if not verification:
            raise StrategyError("verified-bon needs a non-empty verify list", field="verify")
        pool: list[Choice] = await ctx.sample(ctx.task.sample_request(n=params.n, temperature=params.temperature))
        ctx.propose(pool[0])
        reports: list[Report] = await verification.check(ctx, [c.text for c in pool])
        rounds_trace: list[dict] = []
        ctx.trace.update({"candidates": [{"text": c.text, "round": 0, **r.as_trace()} for c, r in zip(pool, reports)],
                          "rounds": rounds_trace})
        ctx.propose(pool[choose(reports)])
        for round_ in range(1, params.rounds + 1):
            if any(r.passed for r in reports):
                break
            targets = self._targets(pool, reports, params.rewrites)
            written = await rewrite_failing(ctx, [pool[i].text for i in targets], [reports[i] for i in targets],
                                            temperature=params.temperature)
            targets = [i for i, choice in zip(targets, written) if choice is not None]
            rewritten = [choice for choice in written if choice is not None]
            if not rewritten:
                rounds_trace.append({"round": round_, "rewrote": [], "passed": [], "stop": "every rewrite failed"})
                break
            new_reports = await verification.check(ctx, [c.text for c in rewritten], stage=f"round {round_}")
            rounds_trace.append({"round": round_, "rewrote": targets, "passed": [r.passed for r in new_reports]})
            ctx.trace["candidates"] += [{"text": c.text, "round": round_, "from": i, **r.as_trace()}
                                        for c, r, i in zip(rewritten, new_reports, targets)]
            pool += rewritten
            reports += new_reports
            ctx.propose(pool[choose(reports)])
        chosen = choose(reports)
        ctx.trace.update({"chosen": chosen, "passed": reports[chosen].passed,
                          "stop": "a candidate passes every verifier" if reports[chosen].passed
                          else "rounds spent, none passes"})
        ctx.emit("chosen", index=chosen, passed=reports[chosen].passed)
        return Candidate.of(pool[chosen])

    @staticmethod
    def _targets(pool: list[Choice], reports: list[Report], count: int) -> list[int]:
        """The ``count`` best failing candidates with distinct texts, best first (earliest on ties)."""
        order = sorted(range(len(pool)), key=lambda i: (reports[i].rank, -i), reverse=True)
        distinct: dict[str, int] = {}
        for i in order:
            distinct.setdefault(pool[i].text.strip(), i)
        return list(distinct.values())[:count]
