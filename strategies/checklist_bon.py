"""Checklist Best-of-N (TICK/STICK, Cook et al., 2024).

The model writes a checklist of YES/NO requirement questions for the task (the whole
conversation, ``Task.conversation``; parsed, capped, cached per model + conversation).
N candidates are drawn in one ``n=N`` request *while* the checklist is written. Every
candidate is judged on every item, all N×K judgments at once (each cached by content).
A candidate's score is the weighted share of YES, score(y) = Σₖ wₖ·[YES] / Σₖ wₖ; the
best score wins, ties going to the earliest sample. ``refine: true`` (STICK) rewrites
the winner using its failed items as feedback (``Task.refine_request``: the caller's
conversation and extras kept), re-judges it, and keeps it only if it scores strictly
higher.

With ``verify``, candidates are checked while they are judged; ``verification.pick``
decides (the best checklist score among those passing every check, else the best
verifier report); STICK also rewrites a winner that fails a check, with the failing
checks' feedback added, and keeps the rewrite only with a better verifier report (or an
equal report and a higher checklist score).

Failed calls: a checklist that cannot be written falls back to the one-item
checklist used for an unparseable one; a judgment whose call failed is a missing
verdict (``"missing"`` in the trace, counted in ``missing``), left out of that
candidate's score rather than counted as NO; a candidate with no verdict at all is
not chosen; a failed rewrite keeps the winner. With no candidate judged, the
failure surfaces.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints, model_validator

from . import prompts
from .base import (
    Candidate, RunContext, Strategy, StrategyError, StrategyParams, cache_key, finished_first, gather_or_cancel,
    register, temperature_field,
)
from .protocol import Choice
from .verification import Report, alongside, keeps, pick, with_feedback

MISSING = "missing"
"""A verdict whose judgment call failed (as opposed to None: a reply that said neither YES nor NO)."""
Verdict = bool | None | str


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 4)


class ChecklistBoNParams(StrategyParams):
    n: int = Field(8, ge=1, le=128, description="Candidates drawn.", json_schema_extra={"limit": "samples"})
    default_temperature: ClassVar[float] = 0.8
    temperature: float | None = temperature_field(default_temperature)
    max_items: int = Field(8, ge=1, le=32, description="Checklist length cap.",
                           json_schema_extra={"limit": "checklist_items"})
    checklist: list[Annotated[str, StringConstraints(max_length=1000)]] | None = Field(
        None, description="Use these items instead of generating a checklist.",
        json_schema_extra={"limit": "checklist_items"})
    item_weights: list[float] | None = Field(None, description="One non-negative weight per item.",
                                             json_schema_extra={"limit": "checklist_items"})
    refine: bool = False
    checklist_max_tokens: int = Field(384, ge=32, le=4096, json_schema_extra={"limit": "tokens"})

    @model_validator(mode="after")
    def _weights_fit(self) -> "ChecklistBoNParams":
        if self.item_weights is not None:
            if any(w < 0 for w in self.item_weights) or not any(w > 0 for w in self.item_weights):
                raise ValueError("item_weights must be non-negative with at least one positive")
            if self.checklist is not None and len(self.item_weights) != len(self.checklist):
                raise ValueError("item_weights needs one weight per checklist item")
        if self.checklist is not None and not [i for i in self.checklist if i.strip()]:
            raise ValueError("checklist must hold at least one item")
        return self


@register
class ChecklistBestOfN(Strategy):
    name = "checklist-bon"
    description = "Sample N candidates, judge each against a generated YES/NO checklist, return the best."
    Params = ChecklistBoNParams

    async def run(self, ctx: RunContext, params: ChecklistBoNParams) -> Candidate:
        checklist, candidates = await gather_or_cancel(
            self._checklist(ctx, params),
            ctx.sample(ctx.task.sample_request(n=params.n, temperature=params.temperature)),
        )
        ctx.propose(candidates[0])
        weights = self._weights(params, checklist)
        ctx.trace["checklist"] = [{"item": item, "weight": w} for item, w in zip(checklist, weights)]
        ctx.emit("checklist", items=checklist)
        verdicts, reports = await alongside(ctx, [c.text for c in candidates],
                                            self._judge_all(ctx, [c.text for c in candidates], checklist))
        scores = [self._score(row, weights) for row in verdicts]
        judged = [i for i, score in enumerate(scores) if score is not None]
        if not judged and reports is None:
            raise ctx.first_failure()
        rank = finished_first(candidates, scores)
        best = max(judged or range(len(candidates)), key=lambda i: (rank(i), -i))
        best = pick(ctx, reports, rank, best)  # with verify: passing candidates first
        ctx.propose(candidates[best], score=scores[best])
        ctx.trace["candidates"] = [
            {"text": c.text, "verdicts": row, "score": _rounded(s), "missing": row.count(MISSING), "cut_off": c.cut_off}
            for c, row, s in zip(candidates, verdicts, scores)
        ]
        ctx.trace["unparsed"] = sum(v is None for row in verdicts for v in row)  # judge replies neither YES nor NO
        ctx.trace["missing_verdicts"] = sum(row.count(MISSING) for row in verdicts)
        ctx.trace["chosen"] = best
        ctx.emit("verdicts", scores=[_rounded(s) for s in scores], chosen=best)
        winner: Choice = candidates[best]
        report = reports[best] if reports else None
        _, score = rank(best)  # -1 when the winner has no verdict
        if params.refine and (score < 1.0 or (report is not None and not report.passed)):
            winner = await self._refine(ctx, params, winner, verdicts[best], score, checklist, weights, report)
        return Candidate.of(winner)

    async def _checklist(self, ctx: RunContext, params: ChecklistBoNParams) -> list[str]:
        if params.checklist is not None:
            return [item.strip() for item in params.checklist if item.strip()][: params.max_items]
        prompt = prompts.CHECKLIST.format(task=ctx.task.conversation, max_items=params.max_items)
        request = ctx.task.aux_request(prompt, temperature=0.0, max_tokens=params.checklist_max_tokens)
        key = cache_key(ctx.model_id, prompts.PROMPT_VERSION, "checklist", ctx.task.identity, params.max_items)
        # A checklist cut short (by its max_tokens or a clamped budget) is used but never cached.
        items = await ctx.cached_text("checklist", key, request, whole=True, allow_partial=True,
                                      parse=lambda choice: prompts.parse_checklist(
                                          choice.text, params.max_items, truncated=choice.finish_reason == "length"))
        # A model that writes no parseable checklist (or whose call failed) still gets
        # judged on the instruction itself.
        return items or [f"Does the response fully follow the instruction: {ctx.task.instruction[:300]}?"]

    @staticmethod
    def _weights(params: ChecklistBoNParams, checklist: list[str]) -> list[float]:
        if params.item_weights is None:
            return [1.0] * len(checklist)
        if len(params.item_weights) != len(checklist):
            raise StrategyError(
                f"item_weights has {len(params.item_weights)} weights for {len(checklist)} checklist items",
                field="item_weights",
            )
        return list(params.item_weights)

    async def _judge_all(self, ctx: RunContext, texts: list[str], checklist: list[str]) -> list[list[Verdict]]:
        """All candidate × item verdicts, cached ones reused, the rest issued at once;
        ``MISSING`` where the judgment call failed."""
        pairs = [(t, item) for t in texts for item in checklist]
        requests = [ctx.task.aux_request(prompts.JUDGE_ITEM.format(task=ctx.task.conversation, response=text, item=item),
                                         temperature=0.0, max_tokens=3, allowed_replies=prompts.VERDICT_REPLIES)
                    for text, item in pairs]
        replies = await ctx.cached_texts("judgment", requests, lambda: [
            cache_key(ctx.model_id, prompts.PROMPT_VERSION, "judge-item", ctx.task.identity, item, text)
            for text, item in pairs], whole=False, allow_partial=True)
        verdicts = [MISSING if r is None else prompts.parse_yes_no(r) for r in replies]
        width = len(checklist)
        return [verdicts[i * width:(i + 1) * width] for i in range(len(texts))]

    @staticmethod
    def _score(row: list[Verdict], weights: list[float]) -> float | None:
        """Weighted share of YES among the verdicts given; an unparseable verdict counts
        as NO, a missing one (failed call) is left out. None when every verdict is missing."""
        given = [(v, w) for v, w in zip(row, weights) if v != MISSING]
        total = sum(w for _, w in given)
        if not given or total == 0:
            return None
        return sum(w for v, w in given if v is True) / total

    async def _refine(self, ctx: RunContext, params: ChecklistBoNParams, winner: Choice, row: list[Verdict],
                      score: float, checklist: list[str], weights: list[float], report: Report | None) -> Choice:
        """STICK: one rewrite from the failed items (and failing verifiers), kept only if
        better (``verification.keeps``: verifier report first, then the checklist score).
        A missing verdict is no failed item; a failed rewrite call or a blank rewrite keeps the winner."""
        failed = [item for item, verdict in zip(checklist, row) if verdict is not True and verdict != MISSING]
        feedback = ("The response fails these requirements:\n" + "\n".join(f"- {item}" for item in failed)
                    if failed else "")
        rewrites = await ctx.sample(ctx.task.refine_request(winner.text, with_feedback(feedback, report),
                                                            temperature=params.temperature,
                                                            max_tokens=ctx.task.max_tokens or 512),
                                    allow_partial=True)
        if rewrites is None:
            ctx.trace["refine"] = {"failed": True, "kept": False}
            return winner
        (rewrite,) = rewrites
        if rewrite.blank:
            ctx.trace["refine"] = {"text": rewrite.text, "blank": True, "kept": False}
            return winner
        (new_row,), new_reports = await alongside(ctx, [rewrite.text],
                                                  self._judge_all(ctx, [rewrite.text], checklist))
        new_score = self._score(new_row, weights)
        new_report = new_reports[0] if new_reports else None
        kept = keeps(new_report, report, -1.0 if new_score is None else new_score, score)
        ctx.trace["refine"] = {"text": rewrite.text, "verdicts": new_row, "score": _rounded(new_score), "kept": kept}
        if new_report is not None:
            ctx.trace["refine"]["verification"] = new_report.as_trace()
        ctx.emit("refine", score=_rounded(new_score), kept=kept)
        if kept:
            ctx.propose(rewrite)  # kept only when better
            return rewrite
        return winner
