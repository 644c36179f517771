"""Answer extraction and normalisation, shared by every strategy that compares answers.

Formats:
- ``numeric``: GSM8K ``#### n``, ``\\boxed{n}``, "the answer is n", else the last number.
- ``first_number``: the first number (few-shot completions that run on past the answer).
- ``choice``: a multiple-choice letter A-J.
- ``text``: "the answer is ..." or the first non-empty line, case/punctuation/space-folded.
- ``auto``: numeric markers, then a choice marker, then the last number, then text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

AnswerFormat = Literal["auto", "numeric", "first_number", "choice", "text"]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*[:\s]*\(?([^\n]*)", re.IGNORECASE)
# After "answer is": a letter. At a line start: only a letter standing alone or as "(B)", "B.", "B)", "B:",
# so a line opening with the words "I ..." or "A ..." is not read as a choice.
_CHOICE_MARK_RE = re.compile(
    r"answer\s*(?:is|:)\s*\(?([A-J])\)?(?:[.):\s]|$)|^\s*\(?([A-J])\)?(?:[.):]|\s*$)", re.IGNORECASE | re.MULTILINE
)
_CHOICE_LAST_RE = re.compile(r"\b([A-J])\b")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def normalize_number(raw: str) -> str | None:
    """'1,234.50' -> '1234.5'; '$7' -> '7'; '3/4' -> '3/4'; '19.0' -> '19'."""
    cleaned = raw.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    if "/" in cleaned:
        return f"{value.numerator}/{value.denominator}"
    return format(float(value), "g")


def normalize_text(text: str) -> str:
    folded = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(folded.split())


def _numeric(text: str) -> str | None:
    hashes = _HASHES_RE.search(text)
    if hashes:
        return normalize_number(hashes.group(1))
    boxed = _boxed(text)
    if boxed is not None:
        boxed = _FRAC_RE.sub(r"\1/\2", boxed)  # \frac{3}{4} -> 3/4, not "3"
        number = _NUMBER_RE.search(boxed)
        return normalize_number(number.group(0)) if number else normalize_text(boxed) or None
    said = _ANSWER_IS_RE.findall(text)
    if said:
        number = _NUMBER_RE.search(said[-1])
        if number:
            return normalize_number(number.group(0))
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _choice(text: str) -> str | None:
    marked = [after_answer or line_start for after_answer, line_start in _CHOICE_MARK_RE.findall(text)]
    if marked:
        return marked[-1].upper()
    letters = _CHOICE_LAST_RE.findall(text)
    return letters[-1].upper() if letters else None


def _text(text: str) -> str | None:
    said = _ANSWER_IS_RE.findall(text)
    source = said[-1] if said else next((line for line in text.splitlines() if line.strip()), "")
    return normalize_text(source) or None


def extract_answer(text: str, fmt: AnswerFormat = "auto") -> str | None:
    """The comparable answer in ``text``, or None when there is none."""
    if fmt == "numeric":
        return _numeric(text)
    if fmt == "first_number":
        number = _NUMBER_RE.search(text)
        return normalize_number(number.group(0)) if number else None
    if fmt == "choice":
        return _choice(text)
    if fmt == "text":
        return _text(text)
    if _HASHES_RE.search(text) or _boxed(text) is not None:
        return _numeric(text)
    said = _ANSWER_IS_RE.findall(text)
    if said:
        number = _NUMBER_RE.search(said[-1])
        if number:
            return normalize_number(number.group(0))
        letter = re.match(r"\s*\(?([A-J])\)?(?:[.)\s]|$)", said[-1])
        if letter:
            return letter.group(1).upper()
        return normalize_text(said[-1]) or None
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return normalize_number(numbers[-1])
    return _text(text)
