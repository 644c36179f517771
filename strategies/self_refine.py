"""Self-Refine (Madaan et al., 2023): draft -> feedback -> refine, repeated.

Feedback is structured (score, issues, DONE/REVISE) and parsed leniently. A chain
stops on DONE, on reaching ``stop_score``, when a refinement changes nothing, or
after ``max_rounds``. Every version is scored, and the run returns the best-scored
version seen: a later version replaces an earlier one only with a strictly higher
score (a finished version always replaces one cut off by max_tokens, and a cut-off one
never replaces a finished one), because self-correction without outside signal often makes answers worse
(Huang et al., 2023). ``chains`` runs independent chains concurrently, their drafts
drawn in one ``n=chains`` request. Feedback at temperature 0 is cached by content
(never when cut short at its max_tokens).

With ``verify`` (``strategies.verification``), every version is also checked, alongside its
feedback; the failing checks' feedback joins the self-critique in the rewrite prompt; a
chain stops as soon as a version passes every check (DONE and ``stop_score`` no longer stop
it while a check fails); a version replaces the kept one only with a strictly better
verifier report, or an equal report and a higher self-score.

A feedback or refinement call that fails for good, or a blank rewrite, ends that chain
(``stop``: "feedback failed" / "refine failed" / "blank rewrite") with its best version so far; when no version
of any chain got feedback (or a verifier report), the failure surfaces.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from . import prompts
from .base import (
    Candidate, RunContext, Strategy, StrategyParams, cache_key, gather_or_cancel, register, temperature_field,
)
from .protocol import Choice
from .verification import Report, alongside, keeps, with_feedback


class SelfRefineParams(StrategyParams):
    max_rounds: int = Field(3, ge=1, le=32, description="Refinements per chain.", json_schema_extra={"limit": "rounds"})
    stop_score: float = Field(9, ge=0, le=10, description="Stop once feedback scores a version at least this (0-10).")
    chains: int = Field(1, ge=1, le=32, description="Independent chains run concurrently.",
                        json_schema_extra={"limit": "branching"})
    default_temperature: ClassVar[float] = 0.7
    temperature: float | None = temperature_field(default_temperature, "Drafting and refining temperature")
    feedback_temperature: float = Field(0.0, ge=0, le=2)
    feedback_max_tokens: int = Field(256, ge=16, le=4096, json_schema_extra={"limit": "tokens"})


class Version:
    """One version of the answer in a chain, with its feedback."""

    def __init__(self, choice: Choice, round_: int) -> None:
        self.choice = choice
        self.round = round_
        self.feedback: prompts.Feedback | None = None
        self.report: Report | None = None
        """Its verifier report, when the request has ``verify``."""

    @property
    def score(self) -> float:
        score = self.feedback.score if self.feedback else None
        return -1.0 if score is None else score

    def beats(self, other: "Version") -> bool:
        """Strictly better: verifier report first (``verification.keeps``), then a finished
        version over one cut off by max_tokens, then the self-score."""
        return keeps(self.report, other.report, (not self.choice.cut_off, self.score),
                     (not other.choice.cut_off, other.score))

    def as_trace(self) -> dict:
        fb = self.feedback
        return {
            "round": self.round,
            "text": self.choice.text,
            "score": None if fb is None or fb.score is None else round(fb.score * 10, 2),
            "issues": fb.issues if fb else [],
            "done": fb.done if fb else False,
            **({"verification": self.report.as_trace()} if self.report is not None else {}),
        }


@register
class SelfRefine(Strategy):
    name = "self-refine"
    description = "Draft, get structured feedback, refine; return the best-scored version."
    Params = SelfRefineParams

    async def run(self, ctx: RunContext, params: SelfRefineParams) -> Candidate:
        drafts = await ctx.sample(ctx.task.sample_request(n=params.chains, temperature=params.temperature))
        ctx.propose(drafts[0])
        ctx.trace["chains"] = [[] for _ in drafts]
        bests = await gather_or_cancel(*(self._chain(ctx, params, i, d) for i, d in enumerate(drafts)))
        if all(v.feedback is None and v.report is None for v in bests):  # every chain's first feedback failed
            raise ctx.first_failure()
        best = bests[0]
        for version in bests[1:]:  # first chain wins ties
            if version.beats(best):
                best = version
        ctx.trace["best"] = {"chain": bests.index(best), "round": best.round, "score": best.as_trace()["score"]}
        return Candidate.of(best.choice)

    async def _chain(self, ctx: RunContext, params: SelfRefineParams, chain: int, draft: Choice) -> Version:
        history: list[dict] = ctx.trace["chains"][chain]
        current = best = Version(draft, 0)
        stop_at = params.stop_score / 10
        for round_ in range(params.max_rounds + 1):
            current.feedback, reports = await alongside(ctx, [current.choice.text],
                                                        self._feedback(ctx, params, current.choice.text))
            current.report = reports[0] if reports else None
            if current.feedback is None:
                history.append({**current.as_trace(), "stop": "feedback failed"})
                break
            history.append(current.as_trace())
            ctx.emit("critique", chain=chain, **history[-1])
            if current.beats(best):
                best = current
            ctx.propose(best.choice, score=(best.report.rank, best.score) if best.report else best.score)
            if current.report is not None:  # the outside signal decides when to stop
                if current.report.passed:
                    history[-1]["stop"] = "passes every verifier"
                    break
            elif current.feedback.done or current.score >= stop_at:
                history[-1]["stop"] = "done" if current.feedback.done else "score threshold"
                break
            if round_ == params.max_rounds:
                history[-1]["stop"] = "max rounds"
                break
            refined = await self._refine(ctx, params, current)
            if refined is None:
                history[-1]["stop"] = "refine failed"
                break
            if refined.blank:
                history[-1]["stop"] = "blank rewrite"
                break
            if refined.text.strip() == current.choice.text.strip():
                history[-1]["stop"] = "no change"
                break
            current = Version(refined, round_ + 1)
        return best

    async def _feedback(self, ctx: RunContext, params: SelfRefineParams, response: str) -> prompts.Feedback | None:
        """Parsed feedback on ``response``; None when the call failed."""
        prompt = prompts.FEEDBACK.format(task=ctx.task.conversation, response=response)
        request = ctx.task.aux_request(prompt, temperature=params.feedback_temperature,
                                       max_tokens=params.feedback_max_tokens)
        if params.feedback_temperature > 0:  # sampled critiques are never served from cache
            choices = await ctx.sample(request, allow_partial=True)
            text = None if choices is None else choices[0].text
        else:
            key = cache_key(ctx.model_id, prompts.PROMPT_VERSION, "self-refine/feedback", ctx.task.identity,
                            response)
            text = await ctx.cached_text("critique", key, request, whole=True, allow_partial=True)
        return None if text is None else prompts.parse_feedback(text)

    async def _refine(self, ctx: RunContext, params: SelfRefineParams, version: Version) -> Choice | None:
        feedback = version.feedback
        issues = "\n".join(f"- {issue}" for issue in feedback.issues) or feedback.text
        request = ctx.task.refine_request(version.choice.text, with_feedback(issues, version.report),
                                          temperature=params.temperature,
                                          max_tokens=ctx.task.max_tokens or 512)
        choices = await ctx.sample(request, allow_partial=True)
        return None if choices is None else choices[0]
