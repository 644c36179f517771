"""Outside checks on candidate answers ("verifiers") and the rules strategies share for them.

A request may carry ``verify``: a list of checks, each a JSON object with a ``type``
(``json_schema``, ``regex``, ``ifeval``, ``python_tests``, ``webhook``) and an optional
``name``. This module holds the parts strategies see:

- the spec models (``VerifierSpec``) and ``parse_verify``, which turns the raw list into
  specs or raises ``StrategyError`` naming the field (``verify[1].pattern``);
- the contract an implementation meets: ``Verifier.verify(text) -> Verdict`` with
  ``passed``, ``score`` in [0, 1] and a short ``feedback`` text. Implementations that need
  processes, sandboxes or HTTP live in ``service/verifiers.py``;
- ``Verification``: a run's verifiers, checking many candidates at once (every
  verifier x candidate pair concurrently, identical texts once, verdicts cached by
  (spec, candidate) hash), emitting ``verified`` events;
- ``Report``: one candidate's verdicts, ranked by (passes every check, checks passed,
  mean score);
- the shared rules: ``choose`` (selection: candidates passing every verifier win, the
  strategy's own rule decides among them; if none pass, the best report wins, the
  strategy's rule breaking ties) and ``Report.improves`` (refinement: a later version
  replaces an earlier one only with a strictly better report, so a version passing
  fewer checks never replaces one passing more).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal, Protocol, Sequence, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .base import StrategyError, cache_key, gather_or_cancel

if TYPE_CHECKING:
    from .base import RunContext
    from .protocol import Choice

T = TypeVar("T")

MAX_VERIFIERS = 8
"""Checks per request (each multiplies the work per candidate)."""

VERDICT_CACHE_KIND = "verdict"


# -- specs --------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, max_length=64, description="Label in traces and feedback (default: the type).")

    @property
    def label(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]

    def identity(self) -> str:
        """Canonical JSON of everything that decides a verdict (the name does not)."""
        return json.dumps(self.model_dump(exclude={"name"}, by_alias=True), sort_keys=True, ensure_ascii=False)


class JsonSchemaSpec(_Spec):
    """The answer, or its fenced JSON block, parses as JSON and validates against ``schema``."""

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(..., alias="schema", description="A JSON Schema (draft 4-2020-12).")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RegexSpec(_Spec):
    """``pattern`` is searched for (``mode: search``) or must match the whole answer (``fullmatch``);
    ``must_match: false`` inverts the check."""

    type: Literal["regex"]
    pattern: str = Field(..., min_length=1, max_length=2000)
    mode: Literal["search", "fullmatch"] = "search"
    flags: list[Literal["IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII"]] = Field(default_factory=list)
    must_match: bool = True


class IFEvalInstruction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(..., min_length=1, description="An IFEval instruction id, e.g. 'punctuation:no_comma'.")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class IFEvalSpec(_Spec):
    """IFEval instructions checked with ``if-verifiable``; score = share followed (strict)."""

    type: Literal["ifeval"]
    instructions: list[IFEvalInstruction] = Field(..., min_length=1, max_length=32)
    prompt: str | None = Field(None, description="The prompt the instructions belong to (default: the task's).")


class PythonTestsSpec(_Spec):
    """The answer's Python code block, then each test (an ``assert`` or any statement), run in a
    separate, resource-limited process. Score = share of tests passing. Off unless the server
    sets ``PONDER_ALLOW_CODE_EXECUTION=true``."""

    type: Literal["python_tests"]
    tests: list[str] = Field(..., min_length=1, max_length=64)
    timeout_s: float = Field(5.0, gt=0, le=30, description="Wall-clock limit for the whole run.")
    memory_mb: int = Field(256, ge=32, le=2048, description="Address-space limit of the process.")

    @field_validator("tests")
    @classmethod
    def _compiles(cls, tests: list[str]) -> list[str]:
        for i, test in enumerate(tests):
            try:
                compile(test, f"<test {i}>", "exec")
            except SyntaxError as exc:
                raise ValueError(f"test {i} is not valid Python: {exc.msg}") from None
        return tests


class WebhookSpec(_Spec):
    """POST ``{"candidate", "name", "task"}`` to ``url``; it answers ``{"pass", "score", "feedback"}``.
    Only URLs on the server's ``PONDER_WEBHOOK_ALLOWLIST``."""

    type: Literal["webhook"]
    url: str = Field(..., min_length=8, max_length=2000)
    timeout_s: float = Field(5.0, gt=0, le=30)


VerifierSpec = Annotated[
    Union[JsonSchemaSpec, RegexSpec, IFEvalSpec, PythonTestsSpec, WebhookSpec], Field(discriminator="type")
]
VERIFIER_TYPES = ("json_schema", "regex", "ifeval", "python_tests", "webhook")
_SPECS = TypeAdapter(list[VerifierSpec])


def parse_verify(raw: Any) -> list[VerifierSpec]:
    """The request's ``verify`` list as specs.

    Raises ``StrategyError`` with ``field`` like ``verify[0].pattern`` for an unknown type,
    a malformed spec or more than ``MAX_VERIFIERS`` checks."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise StrategyError("verify must be a list of verifier objects", field="verify")
    if len(raw) > MAX_VERIFIERS:
        raise StrategyError(f"verify holds {len(raw)} checks; at most {MAX_VERIFIERS}", field="verify")
    for i, item in enumerate(raw):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in VERIFIER_TYPES:
            raise StrategyError(f"unknown verifier type {kind!r}; known: {', '.join(VERIFIER_TYPES)}",
                                field=f"verify[{i}].type")
    try:
        return _SPECS.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = list(first["loc"])
        # pydantic puts the discriminator tag after the index: [0, 'regex', 'pattern'].
        if len(loc) > 1 and loc[1] in VERIFIER_TYPES:
            del loc[1]
        where = f"verify[{loc[0]}]" + "".join(f".{part}" for part in loc[1:])
        raise StrategyError(f"invalid verifier {where}: {first['msg']}", field=where) from None


# -- the contract ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One verifier's judgement of one candidate.

    ``score`` is in [0, 1] (1 = fully passes); ``feedback`` is a short text fit for a
    rewrite prompt. ``cacheable`` is false for verdicts that reflect trouble rather than
    the candidate (a timeout, a webhook that did not answer), which are never cached."""

    passed: bool
    score: float
    feedback: str = ""
    cacheable: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"verdict score {self.score} is outside [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "score": round(self.score, 4), "feedback": self.feedback}


class Verifier(Protocol):
    """A built check: its spec and an async ``verify`` that never raises for a bad candidate
    (a crash, timeout or junk answer is a failing ``Verdict`` with feedback saying so)."""

    spec: VerifierSpec

    async def verify(self, text: str) -> Verdict: ...


@dataclass(frozen=True)
class Report:
    """One candidate's verdicts, in the order of the request's ``verify`` list."""

    labels: tuple[str, ...]
    verdicts: tuple[Verdict, ...]

    @property
    def passed(self) -> bool:
        """Passes every verifier."""
        return all(v.passed for v in self.verdicts)

    @property
    def passes(self) -> int:
        return sum(v.passed for v in self.verdicts)

    @property
    def score(self) -> float:
        """Mean verifier score in [0, 1]."""
        return sum(v.score for v in self.verdicts) / len(self.verdicts) if self.verdicts else 0.0

    @property
    def rank(self) -> tuple[bool, int, float]:
        """Order of preference: passes all, then checks passed, then mean score."""
        return self.passed, self.passes, self.score

    def improves(self, other: "Report | None") -> bool:
        """Whether a version with this report may replace one with ``other``: strictly better."""
        return other is None or self.rank > other.rank

    @property
    def feedback(self) -> str:
        """The failing checks' feedback, one line each, for a rewrite prompt."""
        return "\n".join(f"- [{label}] {v.feedback or 'failed'}" for label, v in zip(self.labels, self.verdicts)
                         if not v.passed)

    def as_trace(self) -> dict[str, Any]:
        return {"passed": self.passed, "score": round(self.score, 4),
                "verdicts": {label: v.as_dict() for label, v in zip(self.labels, self.verdicts)}}


class Verification:
    """A run's verifiers. Falsy when the request has none, so strategies write
    ``if ctx.verification:`` around their verifier-aware branches."""

    def __init__(self, verifiers: Sequence[Verifier] = ()) -> None:
        self.verifiers = tuple(verifiers)
        labels = [v.spec.label for v in self.verifiers]
        # Two checks of one type get distinct labels: json_schema, json_schema#2.
        self.labels = tuple(label if labels[:i].count(label) == 0 else f"{label}#{labels[:i].count(label) + 1}"
                            for i, label in enumerate(labels))

    def __bool__(self) -> bool:
        return bool(self.verifiers)

    def __len__(self) -> int:
        return len(self.verifiers)

    async def check(self, ctx: "RunContext", texts: Sequence[str], *, stage: str = "candidates") -> list[Report]:
        """Reports for ``texts`` (same order): every verifier x distinct text at once, each
        verdict cached under (verifier spec, text) unless the run opted out of the cache.
        Emits a ``verified`` event with each text's pass/score."""
        distinct = list(dict.fromkeys(texts))
        pairs = [(v, t) for t in distinct for v in self.verifiers]
        verdicts = await gather_or_cancel(*(self._verdict(ctx, v, t) for v, t in pairs))
        width = len(self.verifiers)
        by_text = {t: Report(self.labels, tuple(verdicts[i * width:(i + 1) * width])) for i, t in enumerate(distinct)}
        reports = [by_text[t] for t in texts]
        ctx.emit("verified", stage=stage, passed=[r.passed for r in reports],
                 scores=[round(r.score, 4) for r in reports])
        return reports

    @staticmethod
    async def _verdict(ctx: "RunContext", verifier: Verifier, text: str) -> Verdict:
        if not ctx.use_cache:
            return await verifier.verify(text)
        key = cache_key(VERDICT_CACHE_KIND, verifier.spec.type, verifier.spec.identity(), text)
        cached = await ctx.cache.get(VERDICT_CACHE_KIND, key)
        if cached is not None:
            ctx.usage.cache_hits += 1
            return Verdict(**cached)
        ctx.usage.cache_misses += 1
        verdict = await verifier.verify(text)
        if verdict.cacheable:
            await ctx.cache.put(VERDICT_CACHE_KIND, key, {"passed": verdict.passed, "score": verdict.score,
                                                           "feedback": verdict.feedback})
        return verdict


# -- rules shared by strategies -------------------------------------------------------


def choose(reports: Sequence[Report], own_key: Callable[[int], Any] = lambda i: 0) -> int:
    """Selection with verifiers: the index of the winner among ``len(reports)`` candidates.

    Candidates passing every verifier win and the strategy's own rule (``own_key``, higher
    is better) picks among them; if none passes, the best report (checks passed, then mean
    score) wins, ``own_key`` breaking ties. Remaining ties go to the earliest candidate."""
    if not reports:
        raise ValueError("choose() needs at least one report")
    indices = range(len(reports))
    passing = [i for i in indices if reports[i].passed]
    if passing:
        return max(passing, key=lambda i: (own_key(i), -i))
    return max(indices, key=lambda i: (reports[i].rank, own_key(i), -i))


async def alongside(ctx: "RunContext", texts: Sequence[str], work: Awaitable[T]) -> tuple[T, list[Report] | None]:
    """``work``'s result and, when the run has verifiers, the reports for ``texts``, computed
    concurrently (verification overlaps the strategy's own judging). Reports are None without
    verifiers."""
    if not ctx.verification:
        return await work, None
    result, reports = await gather_or_cancel(work, ctx.verification.check(ctx, texts))
    return result, reports


def pick(ctx: "RunContext", reports: Sequence[Report] | None, own_key: Callable[[int], Any], own_choice: int) -> int:
    """A selection strategy's final index: ``own_choice`` without verifiers, else ``choose``
    with the strategy's rule as ``own_key``; records ``trace["verification"]``."""
    if reports is None:
        return own_choice
    chosen = choose(reports, own_key)
    ctx.trace["verification"] = {"reports": [r.as_trace() for r in reports], "chosen": chosen,
                                 "passed": reports[chosen].passed, "overrode": chosen != own_choice}
    return chosen


def keeps(new: Report | None, old: Report | None, new_own: Any, old_own: Any) -> bool:
    """Refinement: whether a new version replaces the kept one. With verifiers, only with a
    strictly better report, or an equal report and a strictly better own key (a score, or a
    tuple of them; higher is better); without, only with a strictly better own key."""
    if new is not None and old is not None and new.rank != old.rank:
        return new.rank > old.rank
    return new_own > old_own


def with_feedback(self_feedback: str, report: Report | None) -> str:
    """Rewrite feedback: the failing verifiers' feedback joined with the strategy's own critique."""
    if report is None or report.passed:
        return self_feedback
    outside = "Checks the response fails:\n" + report.feedback
    return f"{outside}\n{self_feedback}" if self_feedback.strip() else outside


async def rewrite_failing(ctx: "RunContext", texts: Sequence[str], reports: Sequence[Report], *,
                          temperature: float) -> list["Choice | None"]:
    """One rewrite of each text from its verifiers' feedback (the REFINE prompt in the caller's
    conversation, ``Task.refine_request``), all in one batch; None where the call failed for good
    or the rewrite is blank (no answer to check)."""
    requests = [ctx.task.refine_request(text, report.feedback, temperature=temperature,
                                        max_tokens=ctx.task.max_tokens or 512)
                for text, report in zip(texts, reports)]
    return [None if g is None or g.choices[0].blank else g.choices[0]
            for g in await ctx.generate(requests, allow_partial=True)]
