"""The evaluation harness (``ponder eval``): datasets, scoring, the resumable runner, the summary
and plot, URL mode over a served ponder. No engine, no network, no data files outside tmp_path."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from service.evaluation import (
    DEFAULT_SETTINGS,
    EvalItem,
    EvalSetting,
    HTTPSolver,
    InProcessSolver,
    Progress,
    arithmetic_items,
    gsm8k_items,
    ifeval_items,
    load_settings,
    parse_dataset_spec,
    read_results,
    run_eval,
    score_answer,
    summarize,
    wilson_interval,
    write_plot,
    write_summary,
)
from service.evaluation.runner import effective_params, prepare_out_dir
from strategies import Budget, GenerationRequest, StrategyError, get_strategy
from strategies.base import parse_params
from tests.scripted import ScriptedGenerator, request_text

# -- the arithmetic generator -------------------------------------------------------

PATTERNS = {
    1: r"\d\+\d",
    2: r"\d\d\+\d\d",
    3: r"\d\d[+-]\d\d",
    4: r"\d\d\*\d",
    5: r"\d\d[+-]\d\d[+-]\d\d",
}


def _value(expression: str) -> int:
    assert re.fullmatch(r"[\d+\-*]+", expression)
    return eval(expression)  # noqa: S307 — digits and + - * only, checked above


def test_arith_is_deterministic_and_prefix_stable() -> None:
    a = arithmetic_items(20, difficulty=3, seed=7)
    assert a == arithmetic_items(20, difficulty=3, seed=7)
    assert arithmetic_items(5, difficulty=3, seed=7) == a[:5]  # arith:5 is a prefix of arith:20
    assert [i.prompt for i in arithmetic_items(20, difficulty=3, seed=8)] != [i.prompt for i in a]
    assert len({i.id for i in a}) == 20


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arith_difficulty_and_gold_answers(difficulty: int) -> None:
    items = arithmetic_items(30, difficulty=difficulty, seed=1)
    for item in items:
        assert re.fullmatch(PATTERNS[difficulty], item.question), item.question
        assert item.gold == str(_value(item.question)) and int(item.gold) >= 0
        lines = item.prompt.split("\n")
        assert len(lines) == 5 and lines[-1] == f"{item.question}="
        for shot in lines[:-1]:  # 4 solved examples, correct, same difficulty
            expression, answer = shot.split("=")
            assert re.fullmatch(PATTERNS[difficulty], expression) and int(answer) == _value(expression)
        assert (item.max_tokens, item.stop, item.answer_format) == (8, ("\n",), "first_number")
        assert item.kind == "arith" and not item.is_chat
    if difficulty == 3:
        assert {"+", "-"} <= {c for i in items for c in i.question}


def test_arith_rejects_unknown_difficulty() -> None:
    with pytest.raises(ValueError):
        arithmetic_items(3, difficulty=6)


def test_parse_dataset_spec() -> None:
    assert parse_dataset_spec("arith:100").count == 100
    spec = parse_dataset_spec("arith:50:4")
    assert (spec.kind, spec.count, spec.difficulty) == ("arith", 50, 4)
    assert parse_dataset_spec("gsm8k:/tmp/x:y.jsonl").path == Path("/tmp/x:y.jsonl")
    assert parse_dataset_spec("ifeval:data.jsonl").kind == "ifeval"
    for bad in ("arith:0", "arith:10:9", "arith:x", "gsm8k:", "mmlu:foo"):
        with pytest.raises(ValueError):
            parse_dataset_spec(bad)


def test_numeric_scoring() -> None:
    (item,) = arithmetic_items(1, difficulty=2, seed=0)
    assert score_answer(item, f" {item.gold}").correct is True
    assert score_answer(item, f"{item.gold}\n3+4=7").correct is True  # runs on past the answer
    assert score_answer(item, f"{int(item.gold) + 1}").correct is False
    assert score_answer(item, "no number").correct is False
    assert score_answer(item, "").extracted is None


# -- GSM8K --------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_loader_zero_and_few_shot(tmp_path: Path) -> None:
    test = _write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Big sum?", "answer": "It is big.\n#### 1,234"},
    ])
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"question": f"Q{i}?", "answer": f"Work {i}*2=<<{i}*2={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(6)
    ])
    zero = gsm8k_items(test)
    assert [i.gold for i in zero] == ["7", "1234"] and [i.id for i in zero] == ["gsm8k-0", "gsm8k-1"]
    assert zero[0].prompt == "Question: Tom has 3 apples and buys 4. How many?\nAnswer: Let's think step by step."
    assert zero[0].answer_format == "numeric" and zero[0].max_tokens == 256 and "\nQuestion:" in zero[0].stop
    few = gsm8k_items(test, fewshot_path=train, shots=3, seed=0, limit=1)
    assert len(few) == 1
    prompt = few[0].prompt
    assert prompt.count("Question:") == 4 and prompt.count("####") == 3
    assert "<<" not in prompt  # calculator annotations removed
    assert prompt.endswith("Question: Tom has 3 apples and buys 4. How many?\nAnswer:")
    assert gsm8k_items(test, fewshot_path=train, shots=3, seed=0)[0].prompt == prompt  # deterministic
    assert score_answer(few[0], " 3 + 4 = 7\n#### 7").correct is True
    assert score_answer(zero[1], "so the answer is 1234.").correct is True
    chat = gsm8k_items(test, fewshot_path=train, shots=2, seed=0, chat=True)
    assert chat[0].is_chat and chat[0].prompt is None and chat[0].stop == ()
    assert [m["role"] for m in chat[0].messages] == ["user", "assistant", "user", "assistant", "user"]
    assert chat[0].messages[-1]["content"].endswith("Tom has 3 apples and buys 4. How many?")
    assert "#### " in chat[0].messages[1]["content"] and "<<" not in chat[0].messages[1]["content"]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="item 0"):
        gsm8k_items(bad)


# -- IFEval -------------------------------------------------------------------------


def _ifeval_file(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "ifeval.jsonl", [
        {"key": 1, "prompt": "Describe rain in lowercase, without commas.",
         "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
        {"key": 2, "prompt": "Write fewer than 3 sentences, in lowercase.",
         "instruction_id_list": ["length_constraints:number_sentences", "change_case:english_lowercase"],
         "kwargs": [{"relation": "less than", "num_sentences": 3}, {}]},
    ])


def test_ifeval_scoring_strict_loose_and_instruction_level(tmp_path: Path) -> None:
    pytest.importorskip("if_verifiable")
    first, _ = ifeval_items(_ifeval_file(tmp_path))
    assert first.is_chat and first.messages[0]["content"].startswith("Describe rain")
    assert first.id == "ifeval-1" and first.gold is None
    good = score_answer(first, "rain falls softly on the quiet town and everything smells of wet earth")
    assert good.correct is True and good.details["prompt_loose"] is True
    assert [(i["strict"], i["loose"]) for i in good.details["instructions"]] == [(True, True), (True, True)]
    comma = score_answer(first, "rain falls softly, and the town is quiet")
    assert comma.correct is False
    assert [i["strict"] for i in comma.details["instructions"]] == [False, True]
    upper = score_answer(first, "Rain Falls Softly on the town")
    assert upper.correct is False and upper.details["instructions"][1]["strict"] is False
    # Loose mode forgives a first line of chatter, strict does not.
    chatter = score_answer(first, "Sure, Here It Is:\nrain falls softly on the town")
    assert chatter.details["prompt_strict"] is False and chatter.details["prompt_loose"] is True
    empty = score_answer(first, "")
    assert empty.correct is False


def test_ifeval_checks_needing_missing_nltk_data_are_unscored(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("if_verifiable")
    from if_verifiable.ifeval import instructions_util

    def no_punkt(text: str) -> int:
        raise LookupError("\n****\n  Resource 'punkt_tab' not found.\n")

    monkeypatch.setattr(instructions_util, "count_sentences", no_punkt)
    _, second = ifeval_items(_ifeval_file(tmp_path))
    passing = score_answer(second, "rain falls. it is wet.")
    sentences, lowercase = passing.details["instructions"]
    assert sentences["strict"] is None and "punkt_tab" in sentences["unscored"]
    assert lowercase["strict"] is True
    assert passing.correct is None  # unknown, not wrong
    failing = score_answer(second, "Rain Falls.")
    assert failing.correct is False  # a scored instruction failed: wrong whatever the other says


# -- settings -----------------------------------------------------------------------


def test_default_settings_and_params_per_strategy() -> None:
    labels = [s.label for s in load_settings(None)]
    assert labels == ["greedy", "sc-k4", "sc-k8", "sc-adaptive-k8", "self-refine", "mcts-refine", "mcts-steps",
                      "checklist-bon"]
    assert DEFAULT_SETTINGS[0].strategy == "none" and DEFAULT_SETTINGS[0].params == {"temperature": 0}
    (item,) = arithmetic_items(1)
    for setting in DEFAULT_SETTINGS:
        params = effective_params(setting, item)
        # answer_format only where the strategy's Params accepts it, and every param set validates.
        assert ("answer_format" in params) == (setting.strategy == "self-consistency")
        parse_params(get_strategy(setting.strategy), params)
    fixed = EvalSetting("sc-text", "self-consistency", {"k": 2, "answer_format": "text"})
    assert effective_params(fixed, item)["answer_format"] == "text"


def test_load_settings_forms(tmp_path: Path) -> None:
    inline = load_settings('[{"label": "a", "strategy": "none"}, {"strategy": "self-consistency", "params": {"k": 2}}]')
    assert [(s.label, s.strategy, s.params) for s in inline] == [
        ("a", "none", {}), ("self-consistency-k2", "self-consistency", {"k": 2})]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"settings": [{"label": "b", "strategy": "mcts", "params": {"mode": "steps"}}]}))
    assert load_settings(str(path))[0].params == {"mode": "steps"}
    assert [s.label for s in load_settings("greedy,sc-k8")] == ["greedy", "sc-k8"]
    with pytest.raises(ValueError, match="nope"):
        load_settings("greedy,nope")
    with pytest.raises(ValueError, match="twice"):
        load_settings('[{"label": "a", "strategy": "none"}, {"label": "a", "strategy": "none"}]')
    with pytest.raises(StrategyError):
        load_settings('[{"label": "a", "strategy": "self-consistency", "params": {"k": 0}}]')
    with pytest.raises(StrategyError):
        load_settings('[{"label": "a", "strategy": "no-such-strategy"}]')


# -- the runner, in-process over a scripted generator --------------------------------

WRONG = 3  # the scripted model gets the first 3 (of 10) problems wrong


def arithmetic_model(items):
    wrong = {item.prompt for item in items[:WRONG]}

    def respond(request: GenerationRequest, index: int) -> str:
        text = request_text(request)
        expression = text.rsplit("\n", 1)[-1].rstrip("=")
        value = _value(expression)
        return str(value + 1 if text in wrong else value)
    return respond


SETTINGS = [EvalSetting("greedy", "none", {"temperature": 0}),
            EvalSetting("sc-k3", "self-consistency", {"k": 3})]


async def test_runner_in_process_writes_jsonl_and_summary(tmp_path: Path) -> None:
    items = arithmetic_items(10, difficulty=2, seed=0)
    gen = ScriptedGenerator(arithmetic_model(items))
    stream = io.StringIO()
    progress = Progress(len(items) * len(SETTINGS), stream=stream, every_s=0)
    stats = await run_eval(items, SETTINGS, InProcessSolver(gen), tmp_path, concurrency=4, progress=progress)
    assert (stats.total, stats.skipped, stats.ran, stats.errors) == (20, 0, 20, 0)
    assert 1 < gen.max_in_flight <= 4  # bounded concurrency, actually concurrent
    assert "20/20 pairs (100%)" in stream.getvalue()

    records = read_results(tmp_path / "results.jsonl")
    assert len(records) == 20 and {(r["item_id"], r["label"]) for r in records} == {
        (i.id, s.label) for i in items for s in SETTINGS}
    greedy = [r for r in records if r["label"] == "greedy"]
    assert sum(r["correct"] for r in greedy) == 10 - WRONG
    first = next(r for r in greedy if r["item_id"] == items[0].id)
    assert first["question"] == items[0].question and first["gold"] == items[0].gold
    assert first["correct"] is False and first["extracted"] == str(int(items[0].gold) + 1)
    # ScriptedGenerator usage: prompt = 5 words (4 shots + the question), completion = 1 word per sample.
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"], first["calls"]) == (5, 1, 6, 1)
    assert first["params"] == {"temperature": 0} and first["trace_id"].startswith("eval-")
    assert first["latency_s"] > 0 and first["budget_limited"] is False and "error" not in first
    sc = next(r for r in records if r["label"] == "sc-k3" and r["item_id"] == items[5].id)
    assert sc["params"] == {"k": 3, "answer_format": "first_number"} and sc["correct"] is True
    assert (sc["prompt_tokens"], sc["completion_tokens"], sc["calls"], sc["samples"]) == (5, 3, 1, 3)
    # The generator saw the item's completion-mode sampling defaults.
    assert all(r.prompt is not None and r.stop == ("\n",) and r.max_tokens == 8 for r in gen.requests)
    traces = read_results(tmp_path / "traces.jsonl")
    assert len(traces) == 20 and traces[0]["trace"]

    summary = summarize(records, settings=[s.as_dict() for s in SETTINGS], meta={"dataset": "arith:10:2"})
    row = summary["rows"][0]
    assert row["label"] == "greedy" and (row["n"], row["scored"], row["correct"]) == (10, 10, 7)
    # Wilson 95% for 7/10, by hand: centre (0.7 + z²/20) / (1 + z²/10) = 0.64449,
    # half-width z·sqrt(0.021 + z²/400) / (1 + z²/10) = 0.24772  ->  (0.39677, 0.89221).
    assert row["accuracy"] == pytest.approx(0.7)
    assert row["ci_low"] == pytest.approx(0.39677, abs=1e-4) and row["ci_high"] == pytest.approx(0.89221, abs=1e-4)
    assert (row["mean_prompt_tokens"], row["mean_completion_tokens"], row["mean_total_tokens"]) == (5, 1, 6)
    assert row["mean_calls"] == 1 and row["latency_p50_s"] > 0 and row["unscored"] == row["errors"] == 0
    assert summary["rows"][1]["label"] == "sc-k3" and summary["rows"][1]["mean_completion_tokens"] == 3
    assert summary["items"] == 10
    md, js = write_summary(summary, tmp_path)
    assert "| greedy | none | 10 | 70.0% | 39.7–89.2% |" in md.read_text()
    assert json.loads(js.read_text())["rows"][0]["ci_low"] == pytest.approx(0.39677, abs=1e-4)


async def test_self_consistency_records_oracle_at_k(tmp_path: Path) -> None:
    """oracle@k for self-consistency: one of its k samples is right even where the vote is wrong."""
    items = arithmetic_items(2, difficulty=2, seed=0)
    right = _value(items[0].question)

    def respond(request: GenerationRequest, index: int) -> str:
        value = _value(request_text(request).rsplit("\n", 1)[-1].rstrip("="))
        if value == right:  # item 0: votes 2 x wrong, 1 x right -> the vote is wrong, the oracle right
            return str(value + 1 if index < 2 else value)
        return str(value + 1)  # item 1: never right
    await run_eval(items, [EvalSetting("sc-k3", "self-consistency", {"k": 3})], InProcessSolver(ScriptedGenerator(respond)),
                   tmp_path)
    records = {r["item_id"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert records[items[0].id]["correct"] is False and records[items[0].id]["oracle_pass"] is True
    assert records[items[1].id]["correct"] is False and records[items[1].id]["oracle_pass"] is False
    (row,) = summarize(read_results(tmp_path / "results.jsonl"))["rows"]
    assert row["accuracy"] == 0 and row["oracle"] == 0.5


def test_numeric_scoring_compares_answers_by_meaning() -> None:
    item = EvalItem(id="x", kind="gsm8k", question="q", gold="0.5", messages=({"role": "user", "content": "q"},),
                    answer_format="numeric")
    for answer in ("#### 1/2", "The answer is \\boxed{\\frac12}.", "#### .5", "The answer is $\\dfrac{2}{4}$"):
        assert score_answer(item, answer).correct is True, answer
    assert score_answer(item, "#### 0.51").correct is False


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.27753, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.72247, abs=1e-4) and high == 1


async def test_runner_resumes_skipping_completed_pairs(tmp_path: Path) -> None:
    items = arithmetic_items(4, difficulty=1, seed=2)
    await run_eval(items, SETTINGS, InProcessSolver(ScriptedGenerator(arithmetic_model(items))), tmp_path)
    path = tmp_path / "results.jsonl"
    assert len(read_results(path)) == 8

    again = ScriptedGenerator(arithmetic_model(items))
    stats = await run_eval(items, SETTINGS, InProcessSolver(again), tmp_path)
    assert (stats.skipped, stats.ran) == (8, 0) and again.calls == []

    # Interrupted: two pairs missing, the last line cut off mid-write.
    lines = path.read_text().splitlines(keepends=True)
    dropped = [json.loads(line) for line in lines[2:4]]
    path.write_text("".join(lines[:2] + lines[4:]) + lines[2][: len(lines[2]) // 2])
    third = ScriptedGenerator(arithmetic_model(items))
    stats = await run_eval(items, SETTINGS, InProcessSolver(third), tmp_path)
    assert (stats.skipped, stats.ran) == (6, 2)
    records = read_results(path)  # the torn line is skipped, the new lines are whole
    assert len(records) == 8
    assert {(r["item_id"], r["label"]) for r in records[-2:]} == {(d["item_id"], d["label"]) for d in dropped}

    # More items later: only the new ones run.
    more = arithmetic_items(6, difficulty=1, seed=2)
    stats = await run_eval(more, SETTINGS, InProcessSolver(ScriptedGenerator(arithmetic_model(more))), tmp_path)
    assert (stats.skipped, stats.ran) == (8, 4)


class FlakySolver:
    mode = "test"

    def __init__(self, inner, fail: set[tuple[str, str]]):
        self.inner, self.fail = inner, fail

    async def solve(self, item, setting, params):
        if (item.id, setting.label) in self.fail:
            raise RuntimeError("backend went away")
        return await self.inner.solve(item, setting, params)


async def test_failed_pairs_are_recorded_then_retried_on_resume(tmp_path: Path) -> None:
    items = arithmetic_items(3, difficulty=1)
    inner = InProcessSolver(ScriptedGenerator(arithmetic_model(items)))
    stats = await run_eval(items, SETTINGS, FlakySolver(inner, {(items[1].id, "sc-k3")}), tmp_path)
    assert stats.errors == 1 and "backend went away" in stats.first_error
    declared = [s.as_dict() for s in SETTINGS]
    summary = summarize(read_results(tmp_path / "results.jsonl"), settings=declared)
    assert [(r["label"], r["n"], r["errors"], r["scored"]) for r in summary["rows"]] == [
        ("greedy", 3, 0, 3), ("sc-k3", 3, 1, 2)]
    stats = await run_eval(items, SETTINGS, inner, tmp_path)
    assert (stats.ran, stats.errors) == (1, 0)
    summary = summarize(read_results(tmp_path / "results.jsonl"), settings=declared)
    assert summary["rows"][1]["errors"] == 0 and summary["rows"][1]["scored"] == 3


async def test_match_budget_applies_to_every_setting(tmp_path: Path) -> None:
    items = arithmetic_items(WRONG + 1, difficulty=1)
    settings = [EvalSetting("greedy", "none", {"temperature": 0}), EvalSetting("sc-k8", "self-consistency", {"k": 8})]
    solver = InProcessSolver(ScriptedGenerator(arithmetic_model(items)), budget=Budget(max_tokens=48))
    await run_eval(items, settings, solver, tmp_path, match_budget=48)
    records = read_results(tmp_path / "results.jsonl")
    assert all(r["budget_max_tokens"] == 48 for r in records)
    by_label = {r["label"]: r for r in records if r["item_id"] == items[WRONG].id}
    assert by_label["greedy"]["budget_limited"] is False and by_label["greedy"]["correct"] is True
    # 48 tokens cannot pay for the prompt and 8 samples of 8 tokens: the run stops within its budget.
    assert by_label["sc-k8"]["budget_limited"] is True and by_label["sc-k8"]["total_tokens"] <= 48


def test_out_dir_refuses_a_different_experiment(tmp_path: Path) -> None:
    config = {"dataset": {"kind": "arith", "difficulty": 2}, "seed": 0, "match_budget": None}
    merged = prepare_out_dir(tmp_path, config, SETTINGS)
    assert [s["label"] for s in merged] == ["greedy", "sc-k3"]
    merged = prepare_out_dir(tmp_path, config, [EvalSetting("sc-k5", "self-consistency", {"k": 5})])
    assert [s["label"] for s in merged] == ["greedy", "sc-k3", "sc-k5"]
    with pytest.raises(ValueError, match="match_budget"):
        prepare_out_dir(tmp_path, {**config, "match_budget": 500}, SETTINGS)
    with pytest.raises(ValueError, match="sc-k3"):
        prepare_out_dir(tmp_path, config, [EvalSetting("sc-k3", "self-consistency", {"k": 4})])


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = []
    for label, strategy, tokens, right in (("greedy", "none", 6, 6), ("sc-k8", "self-consistency", 40, 8)):
        for i in range(10):
            records.append({"item_id": f"x{i}", "label": label, "strategy": strategy, "params": {},
                            "correct": i < right, "prompt_tokens": tokens - 1, "completion_tokens": 1,
                            "total_tokens": tokens, "calls": 1, "latency_s": 0.1})
    summary = summarize(records, meta={"dataset": "arith:10", "match_budget": 100})
    path = write_plot(summary, tmp_path / "accuracy_vs_tokens.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# -- URL mode: a real ponder app over a fake OpenAI backend ---------------------------


@pytest.fixture(scope="module")
def served_ponder():
    from service.app import create_app
    from service.config import Settings
    from tests.fake_openai import FakeOpenAI
    from tests.servers import ServedApp

    with FakeOpenAI(name="eval") as fake:
        settings = Settings(backend_urls=fake.url, model=fake.model, redis_url=None, api_keys="")
        with ServedApp(create_app(settings), name="ponder-eval") as served:
            yield served, fake


def _completion(text: str) -> dict:
    return {"id": "cmpl-x", "object": "text_completion", "model": "fake-model",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}


async def test_url_mode_against_served_ponder(served_ponder, tmp_path: Path) -> None:
    served, fake = served_ponder
    fake.reset()
    items = arithmetic_items(2, difficulty=1, seed=3)
    settings = [EvalSetting("greedy", "none", {"temperature": 0}), EvalSetting("sc-k2", "self-consistency", {"k": 2})]
    fake.plan(json=_completion(f" {items[0].gold}"))  # the first pair (item 0, greedy) answers right
    solver = HTTPSolver(served.url, max_tokens=200)
    try:
        await solver.check()
        body = solver.body(items[0], settings[1], effective_params(settings[1], items[0]))
        assert body["budget"] == {"max_tokens": 200} and body["task"] == {"prompt": items[0].prompt}
        assert body["sampling"] == {"max_tokens": 8, "stop": ["\n"]}
        stats = await run_eval(items, settings, solver, tmp_path, concurrency=1, match_budget=200)
    finally:
        await solver.aclose()
    assert (stats.ran, stats.errors) == (4, 0)
    records = read_results(tmp_path / "results.jsonl")
    first = records[0]
    assert (first["item_id"], first["label"], first["correct"]) == (items[0].id, "greedy", True)
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"], first["calls"]) == (11, 2, 13, 1)
    assert first["trace_id"].startswith("solve") and first["model"] == "fake-model"
    # The fake's default text ("eval text 0") holds no number: wrong, but scored.
    assert [r["correct"] for r in records[1:]] == [False, False, False]
    sc = records[1]
    assert sc["calls"] == 1 and sc["samples"] == 2 and sc["params"]["answer_format"] == "first_number"
    sent = fake.generation_requests
    assert sent[0].path == "/v1/completions" and sent[0].body["prompt"] == items[0].prompt
    assert sent[1].body["n"] == 2 and sent[1].body["stop"] == ["\n"]


async def test_url_mode_records_http_errors(served_ponder, tmp_path: Path) -> None:
    served, _ = served_ponder
    items = arithmetic_items(1, difficulty=1)
    solver = HTTPSolver(served.url)
    try:
        # Valid locally, refused by the server's cap (PONDER_MAX_SAMPLES=64).
        stats = await run_eval(items, [EvalSetting("huge", "self-consistency", {"k": 100})], solver, tmp_path)
    finally:
        await solver.aclose()
    assert stats.errors == 1 and "HTTP 400" in stats.first_error and "k=100" in stats.first_error
    assert read_results(tmp_path / "results.jsonl")[0]["error"].startswith("HTTP 400")


def test_cli_eval_url_mode_and_summary_only(served_ponder, tmp_path: Path, capsys) -> None:
    from service.cli import main

    served, fake = served_ponder
    fake.reset()
    out = tmp_path / "run"
    argv = ["eval", "--dataset", "arith:3:2", "--settings", "greedy,sc-k4", "--out", str(out), "--url", served.url,
            "--concurrency", "2", "--match-budget", "400"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| greedy | none | 3 | 0.0% |" in table and "| sc-k4 | self-consistency | 3 |" in table
    assert len(read_results(out / "results.jsonl")) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["match_budget"] == 400 and [r["label"] for r in summary["rows"]] == ["greedy", "sc-k4"]
    assert (out / "summary.md").exists() and json.loads((out / "run.json").read_text())["mode"] == "url"
    try:
        import matplotlib  # noqa: F401
        assert (out / "accuracy_vs_tokens.png").stat().st_size > 0
    except ImportError:
        pass
    sent = len(fake.generation_requests)
    assert main(argv) == 0  # resumed: nothing left to run
    assert len(fake.generation_requests) == sent
    assert main(["eval", "--out", str(out), "--summary-only", "--no-plot"]) == 0
    assert "| sc-k4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="match_budget"):
        main(argv[:-1] + ["500"])


# -- --verify: verified-bon and auto settings ------------------------------------------


async def test_verify_item_gives_ifeval_settings_their_own_instructions_and_oracle(tmp_path: Path) -> None:
    pytest.importorskip("if_verifiable")
    from service.evaluation.runner import load_verify
    from service.verifiers import VerifierRegistry

    items = ifeval_items(_ifeval_file(tmp_path))[:1]  # lowercase, no commas
    texts = ["Rain, Falls", "RAIN FALLS", "rain falls softly"]

    def respond(request: GenerationRequest, i: int) -> str:
        return texts[i % len(texts)] if "Improve a response" not in request_text(request) else "rain, again"

    registry = VerifierRegistry(workers=1)
    try:
        solver = InProcessSolver(ScriptedGenerator(respond), verifiers=registry)
        chosen = load_settings("greedy,verified-bon-n4")
        assert [s.verify for s in chosen] == [False, True]
        with pytest.raises(ValueError, match="need --verify"):
            await run_eval(items, chosen, solver, tmp_path / "none")
        await run_eval(items, chosen, solver, tmp_path / "out", verify_for=load_verify("item"))
    finally:
        await registry.aclose()
    records = {r["label"]: r for r in read_results(tmp_path / "out" / "results.jsonl")}
    assert records["greedy"]["correct"] is False and records["greedy"]["verify"] is False
    assert "oracle_pass" not in records["greedy"]
    bon = records["verified-bon-n4"]
    assert bon["verify"] is True and bon["answer"] == "rain falls softly" and bon["correct"] is True
    assert bon["oracle_pass"] is True and bon["calls"] == 1
    summary = summarize(read_results(tmp_path / "out" / "results.jsonl"))
    rows = {r["label"]: r for r in summary["rows"]}
    assert rows["verified-bon-n4"]["oracle"] == 1.0 and "oracle" not in rows["greedy"]


def test_verify_sources(tmp_path: Path) -> None:
    from service.evaluation.runner import item_checks, load_verify

    arith = arithmetic_items(1, difficulty=1)[0]
    with pytest.raises(ValueError, match="carry no checks"):
        item_checks(arith)
    spec = [{"type": "regex", "pattern": r"\d"}]
    assert load_verify(json.dumps(spec))(arith) == spec
    path = tmp_path / "verify.json"
    path.write_text(json.dumps(spec))
    assert load_verify(str(path))(arith) == spec
    with pytest.raises(StrategyError) as caught:
        load_verify('[{"type": "regex"}]')
    assert caught.value.field == "verify[0].pattern"
    first = ifeval_items(_ifeval_file(tmp_path))[1]
    (check,) = item_checks(first)
    assert check["instructions"][0] == {"id": "length_constraints:number_sentences",
                                        "kwargs": {"relation": "less than", "num_sentences": 3}}
    assert check["prompt"] == first.question
    assert load_settings('[{"strategy": "auto", "verify": true}]')[0].verify is True
