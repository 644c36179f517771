"""Datasets for ``ponder eval``, as lists of ``EvalItem`` (nothing is downloaded).

- ``arith:N[:difficulty]`` — built-in few-shot arithmetic completion problems (base models);
- ``gsm8k:PATH`` — JSONL with ``question`` and ``answer`` ending in ``#### n``;
- ``ifeval:PATH`` — JSONL with ``key``, ``prompt``, ``instruction_id_list``, ``kwargs``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies.answers import normalize_number

DATASET_KINDS = ("arith", "gsm8k", "ifeval")

# Completion-mode defaults per dataset (a base model continues the prompt).
ARITH_MAX_TOKENS = 8
GSM8K_MAX_TOKENS = 256
GSM8K_CHAT_MAX_TOKENS = 512
IFEVAL_MAX_TOKENS = 1024

ARITH_DIFFICULTIES = {
    1: "single-digit addition",
    2: "two-digit addition",
    3: "two-digit addition and subtraction",
    4: "two-digit times one-digit multiplication",
    5: "three two-digit terms, addition and subtraction",
}
ARITH_SHOTS = 4


@dataclass(frozen=True)
class EvalItem:
    """One problem: the task (a completion ``prompt`` or chat ``messages``), its gold answer,
    sampling defaults and the answer format used to extract and compare answers."""

    id: str
    kind: str
    """``arith``, ``gsm8k`` or ``ifeval``: decides how answers are scored."""
    question: str
    """The problem as a person would read it (not the few-shot prompt)."""
    gold: str | None = None
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    answer_format: str | None = None
    """Passed to strategies that take ``answer_format``; also used for scoring numeric items."""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"item {self.id}: needs exactly one of prompt or messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    count: int | None = None
    difficulty: int | None = None
    path: Path | None = None

    def identity(self) -> dict[str, Any]:
        """What makes two runs comparable (the item count may grow between resumes)."""
        if self.kind == "arith":
            return {"kind": "arith", "difficulty": self.difficulty}
        return {"kind": self.kind, "path": str(self.path.resolve()) if self.path else None}


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """``arith:100[:3]``, ``gsm8k:PATH``, ``ifeval:PATH``."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "arith":
        parts = [p for p in rest.split(":") if p] if rest else []
        if len(parts) > 2:
            raise ValueError(f"dataset {spec!r}: expected arith:N[:difficulty]")
        try:
            count = int(parts[0]) if parts else 100
            difficulty = int(parts[1]) if len(parts) > 1 else 2
        except ValueError:
            raise ValueError(f"dataset {spec!r}: expected arith:N[:difficulty] with integers") from None
        if count < 1:
            raise ValueError(f"dataset {spec!r}: N must be >= 1")
        if difficulty not in ARITH_DIFFICULTIES:
            raise ValueError(f"dataset {spec!r}: difficulty must be one of {sorted(ARITH_DIFFICULTIES)}")
        return DatasetSpec("arith", count=count, difficulty=difficulty)
    if kind in ("gsm8k", "ifeval"):
        if not rest:
            raise ValueError(f"dataset {spec!r}: expected {kind}:PATH")
        return DatasetSpec(kind, path=Path(rest).expanduser())
    raise ValueError(f"dataset {spec!r}: unknown kind {kind!r}; use arith:N[:difficulty], gsm8k:PATH or ifeval:PATH")


def load_dataset(
    spec: str | DatasetSpec,
    *,
    limit: int | None = None,
    seed: int = 0,
    fewshot: Path | None = None,
    shots: int = 4,
    max_tokens: int | None = None,
    chat: bool = False,
) -> list[EvalItem]:
    parsed = parse_dataset_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "arith":
        count = parsed.count or 100
        if limit is not None:
            count = min(count, limit)
        return arithmetic_items(count, difficulty=parsed.difficulty or 2, seed=seed, max_tokens=max_tokens)
    if parsed.kind == "gsm8k":
        items = gsm8k_items(parsed.path, fewshot_path=fewshot, shots=shots, seed=seed, max_tokens=max_tokens,
                            limit=limit, chat=chat)
    else:
        items = ifeval_items(parsed.path, max_tokens=max_tokens, limit=limit)
    return items


# -- built-in arithmetic ------------------------------------------------------------


def _problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    """One expression and its value, non-negative, at ``difficulty``."""
    if difficulty == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}", a + b
    if difficulty == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}", a + b
    if difficulty == 3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"{a}+{b}", a + b
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}", a - b
    if difficulty == 4:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        return f"{a}*{b}", a * b
    if difficulty == 5:
        while True:
            a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
            op1, op2 = rng.choice("+-"), rng.choice("+-")
            ab = a + b if op1 == "+" else a - b
            value = ab + c if op2 == "+" else ab - c
            if value >= 0:
                return f"{a}{op1}{b}{op2}{c}", value
    raise ValueError(f"difficulty must be one of {sorted(ARITH_DIFFICULTIES)}, not {difficulty}")


def arithmetic_item(index: int, *, difficulty: int = 2, seed: int = 0, max_tokens: int | None = None) -> EvalItem:
    """Item ``index`` of the stream for (``seed``, ``difficulty``): independent of how many are drawn,
    so ``arith:100`` is a prefix of ``arith:200``. A string seed makes ``random`` hash-independent."""
    rng = random.Random(f"ponder-arith:{seed}:{difficulty}:{index}")
    question, value = _problem(rng, difficulty)
    shots: list[tuple[str, int]] = []
    while len(shots) < ARITH_SHOTS:
        shot = _problem(rng, difficulty)
        if shot[0] != question and shot not in shots:
            shots.append(shot)
    prompt = "".join(f"{expr}={val}\n" for expr, val in shots) + f"{question}="
    return EvalItem(
        id=f"arith-d{difficulty}-s{seed}-{index}",
        kind="arith",
        question=question,
        gold=str(value),
        prompt=prompt,
        max_tokens=max_tokens or ARITH_MAX_TOKENS,
        stop=("\n",),
        answer_format="first_number",
        meta={"difficulty": difficulty},
    )


def arithmetic_items(count: int, *, difficulty: int = 2, seed: int = 0, max_tokens: int | None = None) -> list[EvalItem]:
    """``count`` few-shot completion problems like ``"3+4=7\\n...\\n12+5="`` (gold ``"17"``)."""
    if difficulty not in ARITH_DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(ARITH_DIFFICULTIES)}, not {difficulty}")
    return [arithmetic_item(i, difficulty=difficulty, seed=seed, max_tokens=max_tokens) for i in range(count)]


# -- JSONL files --------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
    return rows


_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


def gsm8k_gold(answer: str) -> str:
    """The normalised number after ``####``."""
    if "####" not in answer:
        raise ValueError("answer has no '#### n' line")
    gold = normalize_number(answer.rsplit("####", 1)[1].strip())
    if gold is None:
        raise ValueError(f"answer's '####' part is not a number: {answer.rsplit('####', 1)[1].strip()!r}")
    return gold


GSM8K_CHAT_INSTRUCTION = ("Solve the math problem. Reason step by step, then give the final answer on the last "
                          "line as '#### <number>'.\n\n")


def _gsm8k_fewshot_rows(path: Path, *, shots: int, seed: int) -> list[dict[str, Any]]:
    rows = _read_jsonl(path)
    if shots > len(rows):
        raise ValueError(f"{path}: {shots} shots asked, {len(rows)} examples present")
    chosen = sorted(random.Random(f"ponder-gsm8k-fewshot:{seed}").sample(range(len(rows)), shots))
    return [{"question": rows[i]["question"].strip(), "answer": _CALCULATOR_RE.sub("", rows[i]["answer"]).strip()}
            for i in chosen]


def gsm8k_items(
    path: Path,
    *,
    fewshot_path: Path | None = None,
    shots: int = 4,
    seed: int = 0,
    max_tokens: int | None = None,
    limit: int | None = None,
    chat: bool = False,
) -> list[EvalItem]:
    """GSM8K, answers extracted as ``numeric``.

    Completion mode (default; base models such as the embedded one): few-shot from ``fewshot_path``
    (solutions end in ``#### n``, and so should the model's), else zero-shot "Let's think step by step.".
    ``chat``: for instruct models — the same examples as earlier user/assistant turns, and an
    instruction to end with ``#### n``."""
    rows = _read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    examples = _gsm8k_fewshot_rows(fewshot_path, shots=shots, seed=seed) if fewshot_path and shots > 0 else []
    if examples:
        prefix = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
        suffix, stop = "", ("\n\n", "\nQuestion:")
    else:
        prefix, suffix, stop = "", " Let's think step by step.", ("\nQuestion:", "\n\n\n")
    turns: tuple[dict[str, Any], ...] = tuple(
        turn for e in examples for turn in ({"role": "user", "content": GSM8K_CHAT_INSTRUCTION + e["question"]},
                                            {"role": "assistant", "content": e["answer"]}))
    items = []
    for i, row in enumerate(rows):
        try:
            question, gold = row["question"].strip(), gsm8k_gold(row["answer"])
        except (KeyError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path}: item {i}: {exc}") from None
        task: dict[str, Any]
        if chat:
            task = {"messages": turns + ({"role": "user", "content": GSM8K_CHAT_INSTRUCTION + question},)}
        else:
            task = {"prompt": f"{prefix}Question: {question}\nAnswer:{suffix}", "stop": stop}
        items.append(EvalItem(
            id=f"gsm8k-{i}",
            kind="gsm8k",
            question=question,
            gold=gold,
            max_tokens=max_tokens or (GSM8K_CHAT_MAX_TOKENS if chat else GSM8K_MAX_TOKENS),
            answer_format="numeric",
            **task,
        ))
    return items


def ifeval_items(path: Path, *, max_tokens: int | None = None, limit: int | None = None) -> list[EvalItem]:
    """Chat-mode IFEval: the prompt as one user message; scored by ``if-verifiable``."""
    rows = _read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    items = []
    for i, row in enumerate(rows):
        try:
            key, prompt = row["key"], row["prompt"]
            instruction_ids = list(row["instruction_id_list"])
            kwargs = [dict(k or {}) for k in row["kwargs"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: item {i}: missing or malformed field ({exc})") from None
        if len(kwargs) != len(instruction_ids):
            raise ValueError(f"{path}: item {i}: {len(instruction_ids)} instructions but {len(kwargs)} kwargs")
        items.append(EvalItem(
            id=f"ifeval-{key}",
            kind="ifeval",
            question=prompt,
            messages=({"role": "user", "content": prompt},),
            max_tokens=max_tokens or IFEVAL_MAX_TOKENS,
            meta={"key": key, "instruction_id_list": instruction_ids, "kwargs": kwargs},
        ))
    return items
