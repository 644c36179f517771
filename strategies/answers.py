"""Answers: find them in a sample, and decide which samples gave the same one.

Extraction (ours; small on purpose). Formats:

- ``numeric``: GSM8K ``#### n``, else the last ``\\boxed{...}``, else "the answer is ..." /
  "Answer: ...", else the last number.
- ``first_number``: the first number (few-shot completions that run on past the answer).
- ``choice``: a multiple-choice letter A-J. An explicit "the answer is X" / "Answer: X" /
  ``\\boxed{X}`` (the last one written) beats letters that start lines (option lists).
- ``text``: "the answer is ..." or the first non-empty line, case/punctuation/space-folded.
- ``auto``: ``####``/``\\boxed{}``, then "the answer is" (number, letter, expression or text),
  then the last number, then text.

Notation is normalised once for the whole kind, not per input: unicode minus, thin spaces,
``\\,``/``\\!``/``{,}`` digit grouping, ``\\dfrac``/``\\tfrac``, ``\\frac12``, ``\\text{}``,
``\\left``/``\\right``, ``$`` and ``\\%``, degree signs and trailing unit words. When the answer
span is an equation (``5 + 2 = 7``), its right-hand side is the answer.

Equivalence (``answer_key``, ``AnswerBuckets``):

- Plain numbers compare exactly by rational value: ``1/2``, ``0.5``, ``\\frac{1}{2}`` and
  ``\\frac12`` are one answer; ``12345.67`` and ``12345.66`` are two. Decimals are written out
  in full, never in scientific notation.
- Other mathematical answers (``\\sqrt{2}/2``, ``2\\pi``, ``2^{10}``) are parsed with
  HuggingFace Math-Verify (``math_verify.parse``). A closed expression with a rational value
  joins that number's bucket; otherwise the parsed form is the key, and near-misses
  (``\\frac{1}{\\sqrt{2}}`` vs ``\\sqrt{2}/2``) are merged with ``math_verify.verify``.
- Text and choice letters compare by their normalised string.

Math-Verify's own timeouts use ``signal.alarm``, which only works in the main thread and
would stall the event loop; we turn them off and bound the work instead: an answer span
longer than ``MAX_MATH_CHARS`` is never parsed, a parsed tree that is large or holds a large
power or factorial is never evaluated or verified, and one vote table spends at most
``MAX_VERIFY_CALLS`` verify calls. Plain numbers never reach Math-Verify.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal

AnswerFormat = Literal["auto", "numeric", "first_number", "choice", "text"]

MAX_MATH_CHARS = 120
"""Longer answer spans are compared as text, never parsed."""
MAX_VERIFY_CALLS = 64
"""Per vote table: ``verify`` calls spent merging near-miss expressions."""
_MAX_TREE_NODES = 64
_MAX_POWER = 100  # largest |exponent| or factorial argument evaluated

# A number: optional sign, digits with optional comma grouping, optional decimals; or ".5".
_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUM}(?:\s*/\s*{_NUM})?(?![\d])")
# A span that is nothing but a number (or a fraction), optionally followed by unit words.
_PLAIN_RE = re.compile(rf"\(?\s*({_NUM})\s*(?:/\s*({_NUM}))?\s*\)?(?:\s*[A-Za-z][A-Za-z]+(?:\s+[A-Za-z]+)*)?\.?")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)[\s:*]*([^\n]*)", re.IGNORECASE)
_EXPLICIT_CHOICE_RE = re.compile(r"answer\s*(?:is|:)[\s:*]*\(?([A-J])\)?\**(?=[.):,\s*]|$)", re.IGNORECASE)
# At a line start: only a letter standing alone or as "(B)", "B.", "B)", "B:", so a line
# opening with the words "I ..." or "A ..." is not read as a choice.
_LINE_CHOICE_RE = re.compile(r"^\s*\**\(?([A-J])\)?(?:[.):]|\**\s*$)", re.IGNORECASE | re.MULTILINE)
_LETTER_RE = re.compile(r"\b([A-J])\b")
_ONLY_LETTER_RE = re.compile(r"\s*\(?([A-J])\)?\s*\.?\s*")
_MATH_CHARS_RE = re.compile(r"[\\^*+/(){}\[\]=<>-]")

# -- notation ----------------------------------------------------------------------

_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
# Digit grouping: 9{,}500, 9\,500, 9\!500, 9 500 (thin/no-break spaces), 9'500.
_GROUPING_RE = re.compile(r"(?<=\d)(?:\{,\}|\\[,!; ]|[\u2009\u202f\u00a0']|\\text\{\s*\})(?=\d{3}(?!\d))")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_NUM_FRAC_RE = re.compile(rf"(-?)\\frac\{{\s*({_NUM})\s*\}}\{{\s*({_NUM})\s*\}}")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP_RE = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigg|Bigg)(?![A-Za-z])|\^\s*\{?\\circ\}?|°|\\?\$|\\?%"
                      r"|\\[()\[\]]")  # \( \) \[ \] math delimiters
_SPACING_RE = re.compile(r"\\[,!;: ]|\\q?quad(?![A-Za-z])|~")


def clean_notation(span: str) -> str:
    """Write a span's notation one way: ``\\boxed{-\\dfrac12 \\text{ m}}`` content ``−\\dfrac12 \\text{ m}``
    becomes ``-1/2 m``; ``9{,}500`` becomes ``9,500``; LaTeX that is not a plain number stays LaTeX."""
    s = span.translate(_MINUS)
    s = _GROUPING_RE.sub(",", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = _FRAC_SHORT_RE.sub(lambda m: "\\frac{" + m.group(1).strip("{}") + "}{" + m.group(2).strip("{}") + "}", s)
    s = _NUM_FRAC_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}/{m.group(3)}", s)
    s = _TEXT_CMD_RE.sub(r" \1 ", s)
    s = _DROP_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    return " ".join(s.split())


def _number_value(numerator: str, denominator: str | None) -> Fraction | None:
    try:
        value = Fraction(numerator.replace(",", ""))
        return value / Fraction(denominator.replace(",", "")) if denominator else value
    except (ValueError, ZeroDivisionError):
        return None


def _number_text(numerator: str, denominator: str | None) -> str | None:
    """Canonical written form: integers plain, fractions reduced ``p/q``, decimals in full."""
    value = _number_value(numerator, denominator)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    if denominator is not None:
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(numerator.replace(",", "")).normalize(), "f")


def normalize_number(raw: str) -> str | None:
    """'1,234.50' -> '1234.5'; '$7' -> '7'; '6/8' -> '3/4'; '19.0' -> '19'; '.5' -> '0.5';
    None when ``raw`` is not a number."""
    match = re.fullmatch(rf"\s*({_NUM})\s*(?:/\s*({_NUM}))?\s*\.?\s*", clean_notation(raw))
    return _number_text(match.group(1), match.group(2)) if match else None


def normalize_text(text: str) -> str:
    folded = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(folded.split())


# -- extraction --------------------------------------------------------------------


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


def _first_sentence(line: str) -> str:
    """"18. I checked it 2 times." -> "18"; a decimal point is not a sentence end."""
    return re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]


def _right_hand_side(span: str) -> str:
    """``5 + 2 = 7`` -> ``7``: the result, not the expression before it."""
    parts = re.split(r"=|\\approx|≈", span)
    return parts[-1].strip() if parts[-1].strip() else span


def _span_answer(span: str, *, whole: bool) -> str | None:
    """The answer an answer span states. ``whole``: the span is only the answer (``\\boxed{}``,
    ``####``), so a non-number is kept as an expression; else (a sentence after "the answer
    is") its first number wins over the words around it."""
    s = _right_hand_side(clean_notation(span))
    plain = _PLAIN_RE.fullmatch(s)
    if plain:
        return _number_text(plain.group(1), plain.group(2))
    if (whole and (_MATH_CHARS_RE.search(s) or re.search(r"\d[A-Za-z]|[A-Za-z]\d", s))) or "\\" in s:
        return s.replace(" ", "")  # 2\pi, x^2+1, 2x: the expression, not a number inside it
    number = _NUMBER_RE.search(s)
    if number:
        return normalize_number(number.group(0))
    return normalize_text(s) or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(clean_notation(text))
    return normalize_number(numbers[-1]) if numbers else None


def _numeric(text: str, *, fallback: bool = True) -> str | None:
    hashes = _HASHES_RE.search(text)
    if hashes and hashes.group(1).strip():
        return _span_answer(hashes.group(1), whole=True)
    boxed = _boxed(text)
    if boxed is not None:
        return _span_answer(boxed, whole=True)
    said = _ANSWER_IS_RE.findall(text)
    if said:
        answer = _span_answer(_first_sentence(said[-1]), whole=False)
        if answer is not None and (normalize_number(answer) is not None or needs_math(answer)):
            return answer
    return _last_number(text) if fallback else None


def _boxed_letter(text: str) -> str | None:
    boxed = _boxed(text)
    if boxed is None:
        return None
    letter = _ONLY_LETTER_RE.fullmatch(clean_notation(boxed))
    return letter.group(1).upper() if letter else None


def _choice(text: str) -> str | None:
    explicit = [(m.start(), m.group(1)) for m in _EXPLICIT_CHOICE_RE.finditer(text)]
    boxed = _boxed_letter(text)
    if boxed is not None:
        explicit.append((text.rfind("\\boxed{"), boxed))
    if explicit:
        return max(explicit)[1].upper()
    line_starts = _LINE_CHOICE_RE.findall(text)
    if line_starts:
        return line_starts[-1].upper()
    letters = _LETTER_RE.findall(text)
    return letters[-1].upper() if letters else None


def _text(text: str, *, fallback: bool = True) -> str | None:
    said = _ANSWER_IS_RE.findall(text)
    if not said and not fallback:
        return None
    source = said[-1] if said else next((line for line in text.splitlines() if line.strip()), "")
    return normalize_text(source) or None


def extract_answer(text: str, fmt: AnswerFormat = "auto", *, cut_off: bool = False) -> str | None:
    """The answer ``text`` states, in canonical notation, or None when it states none.

    Numbers come back as ``"9500"``, ``"-7"``, ``"1/2"``, ``"0.5"``; other math as compact
    LaTeX (``"\\sqrt{2}"``); letters upper-case; text folded. Compare answers with
    ``answer_key``/``AnswerBuckets``, not ``==`` (``"1/2"`` and ``"0.5"`` are one answer).

    ``cut_off``: the text ended at max_tokens, not where its writer stopped. Then only an
    answer it states outright counts (``####``, ``\\boxed{}``, "the answer is"; choice letters
    and ``first_number`` read as always): the fallbacks of ``auto``, ``numeric`` and ``text``
    (the last number, the first line) would read wherever the cut fell.
    """
    fallback = not cut_off
    if fmt == "numeric":
        return _numeric(text, fallback=fallback)
    if fmt == "first_number":
        number = _NUMBER_RE.search(clean_notation(text))
        return normalize_number(number.group(0)) if number else None
    if fmt == "choice":
        return _choice(text)
    if fmt == "text":
        return _text(text, fallback=fallback)
    if (hashes := _HASHES_RE.search(text)) and hashes.group(1).strip() or _boxed(text) is not None:
        return _boxed_letter(text) or _numeric(text)
    said = _ANSWER_IS_RE.findall(text)
    if said:
        sentence = _first_sentence(said[-1])
        letter = _ONLY_LETTER_RE.match(sentence)
        if letter and (letter.end() == len(sentence) or not sentence[letter.end()].isalpha()):
            return letter.group(1).upper()
        return _span_answer(sentence, whole=False)
    return (_last_number(text) or _text(text)) if fallback else None


# -- equivalence -------------------------------------------------------------------


def needs_math(answer: str) -> bool:
    """Whether comparing ``answer`` takes Math-Verify (math beyond a plain number; folded
    text and letters never hold these characters)."""
    return normalize_number(answer) is None and bool(_MATH_CHARS_RE.search(answer))


def _safe(expr: Any) -> bool:
    """Small enough to evaluate and verify without risk of an unbounded computation
    (``2^{10^{10}}`` would hang sympy, and nothing can interrupt it off the main thread)."""
    from sympy import Number, factorial, preorder_traversal

    for count, node in enumerate(preorder_traversal(expr)):
        if count >= _MAX_TREE_NODES:
            return False
        if node.is_Pow:
            exponent = node.exp
            if exponent.free_symbols:
                continue
            if not isinstance(exponent, Number) or abs(exponent) > _MAX_POWER:
                return False
        if isinstance(node, factorial):
            argument = node.args[0]
            if not argument.free_symbols and (not isinstance(argument, Number) or abs(argument) > _MAX_POWER):
                return False
    return True


@lru_cache(maxsize=4096)
def _parsed(answer: str) -> Any | None:
    """Math-Verify's sympy form of a math answer, when it parses and is safe to work with."""
    if len(answer) > MAX_MATH_CHARS:
        return None
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Basic

    results = parse(f"${answer}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                    fallback_mode="no_fallback", parsing_timeout=None)
    expr = next((r for r in results if isinstance(r, Basic)), None)
    return expr if expr is not None and _safe(expr) else None


def _rational_value(expr: Any) -> Fraction | None:
    """The exact value of a closed expression that is rational (``2^{10}``, ``3 \\times 4``)."""
    if expr.free_symbols:
        return None
    try:
        value = expr.doit()
    except Exception:  # sympy raises many kinds on odd input; such an answer is not a number
        return None
    if getattr(value, "is_Rational", False):
        return Fraction(int(value.p), int(value.q))
    return None


@lru_cache(maxsize=4096)
def answer_key(answer: str) -> str:
    """Cheap canonical key: equal keys are the same answer.

    ``"1/2"``, ``"0.5"``, ``"\\frac{2}{4}"`` -> ``"1/2"``; ``"2^{10}"`` -> ``"1024"``; other
    math -> ``"math:<sympy form>"``; text and letters -> themselves. Different keys may still be
    one answer for math (see ``AnswerBuckets``), never for numbers.
    """
    number = normalize_number(answer)
    if number is not None:
        return str(Fraction(number))
    if not needs_math(answer):
        return answer
    expr = _parsed(answer)
    if expr is None:
        return "text:" + answer
    value = _rational_value(expr)
    return str(value) if value is not None else f"math:{expr}"


def same_answer(answer: str, other: str) -> bool:
    """Whether two extracted answers are one answer: equal canonical keys, else (math only)
    Math-Verify's ``verify``. Scoring uses it against a gold answer, as ``AnswerBuckets`` does
    within a vote."""
    buckets = AnswerBuckets()  # its canonical key decides first; Math-Verify only for math with another key
    first = buckets.representative(other)
    return buckets.representative(answer) == first


def _verify(gold: Any, target: Any) -> bool:
    from math_verify import verify

    return verify(gold, target, timeout_seconds=None)


class AnswerBuckets:
    """Groups answers by equivalence; the first-seen answer represents its bucket.

    ``representative(answer)`` costs a dict lookup when the canonical key decides (every
    number, letter and text); only a math answer with a new key is verified against the
    math buckets so far, within ``MAX_VERIFY_CALLS`` for the whole table.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}
        self._math: list[tuple[str, Any]] = []
        self.verify_calls = 0

    def representative(self, answer: str) -> str:
        key = answer_key(answer)
        if key in self._by_key:
            return self._by_key[key]
        expr = _parsed(answer) if key.startswith("math:") else None
        if expr is not None:
            for representative, other in self._math:
                if self.verify_calls >= MAX_VERIFY_CALLS:
                    break
                self.verify_calls += 1
                if _verify(other, expr):
                    self._by_key[key] = representative
                    return representative
            self._math.append((answer, expr))
        self._by_key[key] = answer
        return answer

    def representatives(self, answers: list[str | None]) -> list[str | None]:
        """``representative`` of each answer (None stays None), in order; callers run it in a
        worker thread when ``needs_math`` says sympy work is coming."""
        return [None if answer is None else self.representative(answer) for answer in answers]

