"""``none``: one plain generation, so every strategy and the baseline share one path.
With ``verify``, the answer's verifier report goes to ``trace["verification"]`` (nothing
else changes: there is nothing to choose from)."""

from __future__ import annotations

from typing import ClassVar

from .base import Candidate, RunContext, Strategy, StrategyParams, register, temperature_field


class PassthroughParams(StrategyParams):
    default_temperature: ClassVar[float] = 0.0
    temperature: float | None = temperature_field(default_temperature, "Overrides the request's temperature")


@register
class Passthrough(Strategy):
    name = "none"
    description = "A single generation with the caller's settings (the baseline)."
    Params = PassthroughParams

    async def run(self, ctx: RunContext, params: PassthroughParams) -> Candidate:
        (choice,) = await ctx.sample(ctx.task.sample_request(n=1, temperature=params.temperature))
        ctx.trace["samples"] = [choice.text]
        if ctx.verification:
            (report,) = await ctx.verification.check(ctx, [choice.text])
            ctx.trace["verification"] = report.as_trace()
        return Candidate.of(choice)
