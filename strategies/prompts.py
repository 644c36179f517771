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

PROMPT_VERSION = "2026-11-30.1"

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

_INT_RE = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, *, low: float = 0, high: float = 10) -> float | None:
    """First number in ``text`` within [low, high], normalised to [0, 1].

    Handles "7", "Score: 7/10", "8 out of 10"; a number outside the range is no score.
    """
    match = _INT_RE.search(text)
    if match is None:
        return None
    value = float(match.group(0))
    if not low <= value <= high:
        return None
    return (value - low) / (high - low)


def parse_yes_no(text: str) -> bool | None:
    """YES/NO verdict from the start of a reply; None when it says neither."""
    words = re.findall(r"[a-z]+", text.lower())[:4]
    for word in words:
        if word in ("yes", "true", "correct"):
            return True
        if word in ("no", "false", "incorrect"):
            return False
    return None


def parse_choice_number(text: str, count: int) -> int | None:
    """1-based response number → 0-based index, when in range."""
    match = re.search(r"\d+", text)
    if match is None:
        return None
    index = int(match.group(0)) - 1
    return index if 0 <= index < count else None


def parse_checklist(text: str, max_items: int, *, numbered_from: int = 1) -> list[str]:
    """Questions from a numbered or bulleted list; de-duplicated, capped.

    ``numbered_from`` restores the "1." that the prompt's cue already wrote.
    """
    if numbered_from and not re.match(r"\s*\d+[.)]", text):
        text = f"{numbered_from}.{text}"
    items: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        match = re.match(r"\s*(?:\d+[.)]|[-*•])\s*(.+)", line)
        if not match:
            continue
        item = match.group(1).strip()
        if len(item) < 8:
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
