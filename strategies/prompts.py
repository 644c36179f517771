"""Every prompt a strategy sends, in one place, and the parsers for their replies.

``PROMPT_VERSION`` is part of every cache key: change a template, bump it, and
stale critiques/checklists are never reused. Templates end with a cue
("Score:", "Answer:") so base models (completion mode) continue in the expected
shape; the parsers are lenient because small models are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

PROMPT_VERSION = "2026-11-30.3"

FEEDBACK = """You are reviewing a response to a task.

Task:
{task}

Response:
{response}

Give feedback. Use exactly this format:
Score: <integer 0-10, 10 = perfect>
Issues:
- <one concrete problem per line, or "none">
Verdict: <DONE if nothing important is left to fix, otherwise REVISE>

Score:"""

REFINE = """Improve a response to a task using the feedback.

Task:
{task}

Previous response:
{response}

Feedback:
{feedback}

Write the improved response. Output only the response itself.

Improved response:
"""

# Completion mode: the rewrite is this, then the task's own prompt, which the model continues
# as it does a sample. The task is not quoted again and no "Improved response:" cue ends it:
# after REFINE's cue the 135M model began a few-shot rewrite with a blank line in 79 of 80 tries
# (arith, 10 items x 2 critiques x 4), after this one in 0 of 80.
REFINE_CONTINUATION = """Improve the previous response using the feedback.

Previous response:
{response}

Feedback:
{feedback}

"""

CRITIQUE = """Task:
{task}

Response:
{response}

Point out every flaw, error or missing piece in the response, strictly and concisely.

Critique:
"""

SCORE = """Task:
{task}

Response:
{response}

Rate how correct and complete the response is, strictly. Reply with one integer from 0 (wrong) to 10 (perfect).

Score:"""

REWARD = """Task:
{task}

Response:
{response}

Analyze this response strictly and critically: every flaw, however small, costs points. Be harsh and never give full marks. Reply with one integer from 0 (wrong) to 10 (perfect).

Score:"""

STEP_SCORE = """Problem:
{task}

Partial solution so far:
{response}

Rate how likely this partial solution is correct and on track to solve the problem. Reply with one integer from 0 (wrong) to 10 (certainly right).

Score:"""

CHECKLIST = """Write a checklist for judging responses to the instruction below: at most {max_items} YES/NO questions, each checking one requirement the instruction states or clearly implies. A good response gets YES on every question.

Instruction:
{task}

Checklist, one numbered question per line:
1."""

JUDGE_ITEM = """Instruction:
{task}

Response:
{response}

Question about the response: {item}
Answer YES or NO.

Answer:"""

SELECT_CONSISTENT = """I sampled several responses to the same task.

Task:
{task}

{responses}

Which response agrees most with the majority of the responses (the most consistent one)? Reply with its number only.

The most consistent response is Response"""


CONVERSATION = """A conversation; the response answers its last {last} message.

{turns}"""

ANSWER_CONSTRAINTS = """The response must also satisfy the caller's settings (JSON):
{settings}"""

_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_conversation(messages: Sequence[Mapping[str, Any]] | None, prompt: str | None = None,
                        constraints: Mapping[str, Any] | None = None) -> str:
    """The caller's whole task as text for a helper prompt's ``{task}``.

    A lone user message (or a completion ``prompt``) renders as its text; a longer
    conversation (system prompt, earlier turns, tool calls and results) renders turn by
    turn under ``CONVERSATION``. ``constraints`` (the caller's ``tools``,
    ``response_format`` ...) follow as JSON under ``ANSWER_CONSTRAINTS``.
    """
    if prompt is not None:
        text = prompt
    elif len(messages) == 1 and messages[0].get("role") == "user":
        text = message_text(messages[0])
    else:
        last = next((_ROLE_NAMES.get(m.get("role"), "user") for m in reversed(messages)
                     if m.get("role") in ("user", "tool")), "User")
        turns = "\n\n".join(f"{_ROLE_NAMES.get(m.get('role'), str(m.get('role')))}: {message_text(m)}"
                             for m in messages)
        text = CONVERSATION.format(last=last.lower(), turns=turns)
    if constraints:
        settings = json.dumps(dict(constraints), ensure_ascii=False, sort_keys=True, default=str)
        text = f"{text}\n\n{ANSWER_CONSTRAINTS.format(settings=settings)}"
    return text


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text: its content (text parts of a list; other parts named in
    brackets) and any tool calls it makes, as ``[tool call] name(arguments)``."""
    content = message.get("content")
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [content]
    else:
        parts = [part.get("text", "") if part.get("type", "text") == "text" else f"[{part.get('type')}]"
                 for part in content if isinstance(part, dict)]
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append(f"[tool call] {function.get('name')}({function.get('arguments', '')})")
    return "\n".join(p for p in parts if p)


def render_responses(responses: list[str], max_chars: int = 1200) -> str:
    return "\n\n".join(f"Response {i + 1}:\n{r.strip()[:max_chars]}" for i, r in enumerate(responses))


# -- parsers ---------------------------------------------------------------------

_NUMBER = r"-?\d+(?:\.\d+)?"
# "Score: 8", "Rating (0-10): **8**", "0-10 scale: 8", "I'd rate it 8".
_LABELLED_SCORE_RE = re.compile(
    rf"(?:score|rating|rate(?: it)?|scale|grade)\s*(?:\([^)]*\))?\s*(?:is|of)?\s*[:=]?\s*\**\s*({_NUMBER})(?![\d-])(?!\s*(?:–|to)\s*\d)",
    re.IGNORECASE)
_FRACTION_SCORE_RE = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*(\d+)", re.IGNORECASE)
# A number that stands alone at the start ("8", "**8**.", "7.5\nIssues"), not "3 errors".
_LEADING_SCORE_RE = re.compile(rf"\s*\**\s*({_NUMBER})\s*\**\s*(?:[.,;:)!]|\n|$)")
_RANGE_RE = re.compile(rf"{_NUMBER}\s*(?:-|–|to)\s*{_NUMBER}")


# The replies a verdict or a 0-10 rating may be, for constrained decoding (``allowed_replies``);
# with and without the leading space a completion-mode reply after the "Answer:" cue takes.
VERDICT_REPLIES = ("YES", "NO", " YES", " NO")
SCORE_REPLIES = tuple(f"{space}{i}" for space in ("", " ") for i in range(11))


def parse_score(text: str, *, low: float = 0, high: float = 10) -> float | None:
    """A ``low``-``high`` rating in ``text``, normalised to [0, 1]; None when there is none.

    In order: a number standing alone at the start ("7", "**8**."), a labelled number
    ("Score: 7", "0-10 scale: 8"), a fraction ("3 errors. 4/10", "8 out of 10", read on its own
    denominator), then the first number that is not part of a range ("0-10"). A value outside
    [low, high] is no score.
    """
    value: float | None = None
    if match := _LEADING_SCORE_RE.match(text):
        value = float(match.group(1))
    elif match := _LABELLED_SCORE_RE.search(text):
        value = float(match.group(1))
    elif (match := _FRACTION_SCORE_RE.search(text)) and int(match.group(2)) > 0:
        value = low + float(match.group(1)) / int(match.group(2)) * (high - low)
    elif match := re.search(_NUMBER, _RANGE_RE.sub(" ", text)):
        value = float(match.group(0))
    if value is None or not low <= value <= high:
        return None
    return (value - low) / (high - low)


_YES = frozenset({"yes", "true", "correct", "right", "yep", "yeah"})
_NO = frozenset({"no", "false", "incorrect", "wrong", "nope", "fails"})
_NEGATIONS = frozenset({"not", "isn't", "isnt", "never", "hardly", "doesn't", "doesnt", "cannot"})


def parse_yes_no(text: str) -> bool | None:
    """YES/NO verdict from the start of a reply (its first six words); None when it says
    neither. A negation before a yes-word makes it NO (" Not correct", "isn't right")."""
    words = re.findall(r"[a-z']+", text.lower())[:6]
    for i, word in enumerate(words):
        if word in _NO:
            return False
        if word in _YES:
            return not (i > 0 and words[i - 1] in _NEGATIONS)
    return None


def parse_choice_number(text: str, count: int) -> int | None:
    """1-based response number → 0-based index, when in range."""
    match = re.search(r"\d+", text)
    if match is None:
        return None
    index = int(match.group(0)) - 1
    return index if 0 <= index < count else None


_LIST_ITEM_RE = re.compile(r"\s*(?:\d+\s*[.)]|[-*•])\s*(.+)")


def parse_checklist(text: str, max_items: int, *, numbered_from: int = 1, truncated: bool = False) -> list[str]:
    """Questions from a numbered or bulleted list; de-duplicated, capped.

    ``numbered_from`` restores the "1." that the prompt's cue already wrote, unless the reply
    starts its own list (a chat model's "Here is a checklist:" preamble, then "1. ..."); lines
    that are not list items are dropped. Markdown emphasis (``**1. Is it formal?**``) is
    ignored. ``truncated`` (the reply hit max_tokens): its last item is cut off and dropped.
    """
    lines = [re.sub(r"\*\*|__", "", line) for line in text.splitlines()]
    if truncated and lines and not text.endswith("\n"):
        lines.pop()
    starts_list = bool(lines) and _LIST_ITEM_RE.match(lines[0])
    has_own_list = any(re.match(r"\s*1\s*[.)]", line) for line in lines)
    if numbered_from and lines and not starts_list and not has_own_list:
        lines[0] = f"{numbered_from}. {lines[0]}"
    items: list[str] = []
    seen: set[str] = set()
    for line in lines:
        match = _LIST_ITEM_RE.match(line)
        if not match:
            continue
        item = match.group(1).strip()
        if len(item) < 8 or item.endswith(":"):
            continue
        item = item if item.endswith("?") else item + "?"
        key = item.lower()  # after adding "?", so "X" and "X?" are one item
        if key in seen:
            continue
        seen.add(key)
        items.append(item)
        if len(items) == max_items:
            break
    return items


@dataclass
class Feedback:
    score: float | None
    """Normalised to [0, 1]; None when the reply held no score."""
    issues: list[str] = field(default_factory=list)
    done: bool = False
    text: str = ""


def parse_feedback(text: str) -> Feedback:
    """Parse the FEEDBACK format; the reply starts after the "Score:" cue."""
    score = parse_score(text)
    issues = [
        m.group(1).strip()
        for m in re.finditer(r"^\s*[-*•]\s*(.+)$", text, re.MULTILINE)
        if m.group(1).strip().lower() not in ("none", "none.", "n/a")
    ]
    verdict = re.search(r"verdict\s*:\s*(done|revise)", text, re.IGNORECASE)
    done = bool(verdict and verdict.group(1).lower() == "done")
    return Feedback(score=score, issues=issues, done=done, text=text.strip())
