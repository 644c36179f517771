"""Scoring an answer against an item.

- numeric items (``arith``, ``gsm8k``): ``extract_answer(answer, item.answer_format) == gold``;
- ``ifeval``: every instruction checked with ``if-verifiable``, strict and loose. An instruction
  whose checker cannot run here (sentence counting and capital-word frequency need nltk's
  ``punkt_tab`` data, which is not installed offline) is *unscored*, not failed; a prompt is
  unscored when no scored instruction failed but some instruction is unscored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from strategies.answers import extract_answer

from .data import EvalItem

log = logging.getLogger("ponder.eval")


@dataclass
class Score:
    correct: bool | None
    """None: the item could not be scored (counted apart, never as wrong)."""
    extracted: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def score_answer(item: EvalItem, answer: str) -> Score:
    if item.kind == "ifeval":
        return score_ifeval(item, answer)
    extracted = extract_answer(answer or "", item.answer_format or "auto")
    return Score(correct=extracted is not None and extracted == item.gold, extracted=extracted)


def _all(values: list[bool | None]) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is unknown, else True."""
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


_RESOURCE_RE = re.compile(r"Resource\s+(?:\x1b\[[0-9;]*m)?'?(\w+)")


def _unscored_reason(exc: Exception) -> str:
    if isinstance(exc, LookupError):
        found = _RESOURCE_RE.search(str(exc))
        return f"missing nltk data: {found.group(1)}" if found else "missing nltk data"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")


def score_ifeval(item: EvalItem, response: str) -> Score:
    """Prompt-level strict/loose and per-instruction strict/loose (``correct`` = prompt-level strict)."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    meta = item.meta
    instructions: list[dict[str, Any]] = []
    for instruction_id, kwargs in zip(meta["instruction_id_list"], meta["kwargs"]):
        row: dict[str, Any] = {"id": instruction_id, "strict": None, "loose": None}
        if instruction_id not in INSTRUCTION_DICT:
            row["unscored"] = "unknown instruction"
            instructions.append(row)
            continue
        # One instruction per call, so a checker that cannot run spoils only itself.
        sample = IFEvalSample(key=meta["key"], prompt=item.question, instruction_id_list=[instruction_id],
                              kwargs=[kwargs])
        try:
            results, _ = evaluate_output_for_sample("ifeval", sample, response or "")
        except Exception as exc:  # noqa: BLE001 — a checker crash must not end a long run
            row["unscored"] = _unscored_reason(exc)
            if not isinstance(exc, LookupError):
                log.warning("ifeval %s: checker %s failed: %r", item.id, instruction_id, exc)
            instructions.append(row)
            continue
        # No result for a known instruction means an empty response (after stripping thinking): a fail.
        row["strict"] = bool(results and results[0].strict_pass)
        row["loose"] = bool(results and results[0].loose_pass)
        instructions.append(row)
    prompt_strict = _all([r["strict"] for r in instructions])
    prompt_loose = _all([r["loose"] for r in instructions])
    return Score(
        correct=prompt_strict,
        details={"prompt_strict": prompt_strict, "prompt_loose": prompt_loose, "instructions": instructions},
    )
