"""Scoring an answer against an item.

- numeric items (``arith``, ``gsm8k``): the answer ``extract_answer`` finds is correct when it is the
  same answer as the gold by ``strategies.answers.same_answer`` (the equivalence votes use:
  ``9,500`` = ``9500``, ``\\frac12`` = ``0.5``), not when the strings are equal;
- ``ifeval``: every instruction checked with ``if-verifiable``, strict and loose. An instruction
  whose checker cannot run here (sentence counting and capital-word frequency need nltk's
  ``punkt_tab`` data, which is not installed offline) is *unscored*, not failed; a prompt is
  unscored when no scored instruction failed but some instruction is unscored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strategies.answers import extract_answer, same_answer

from ..verifiers import ifeval_instruction_rows
from .data import EvalItem

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
    correct = extracted is not None and item.gold is not None and same_answer(extracted, item.gold)
    return Score(correct=correct, extracted=extracted)


def _all(values: list[bool | None]) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is unknown, else True."""
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


def score_ifeval(item: EvalItem, response: str) -> Score:
    """Prompt-level strict/loose and per-instruction strict/loose (``correct`` = prompt-level strict)."""
    meta = item.meta
    instructions = ifeval_instruction_rows(meta["key"], item.question, meta["instruction_id_list"], meta["kwargs"],
                                           response)
    prompt_strict = _all([r["strict"] for r in instructions])
    prompt_loose = _all([r["loose"] for r in instructions])
    return Score(
        correct=prompt_strict,
        details={"prompt_strict": prompt_strict, "prompt_loose": prompt_loose, "instructions": instructions},
    )
