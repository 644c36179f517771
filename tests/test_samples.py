"""Samples are distinct and the caller's fields cannot corrupt them (issue 12 §2): seeds
derived per request and per proxy run, fields that change a sample's meaning refused, and
adaptive stopping measured like the decision."""

from __future__ import annotations

import itertools

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from strategies import Choice, GenerationRequest, StrategyError, Task, run_strategy
from strategies.base import REFUSED_EXTRAS, RUN_SEED_STRIDE
from tests.fake_openai import FakeOpenAI
from tests.scripted import ScriptedGenerator
from tests.servers import ServedApp

MATH = Task(messages=({"role": "user", "content": "What is 6 times 7?"},), seed=1234)


def seed_ranges(requests: list[GenerationRequest]) -> list[range]:
    """The vLLM seeds each request's samples get: sample i of a request is seeded seed + i."""
    return [range(r.seed, r.seed + r.n) for r in requests]


def assert_disjoint(ranges: list[range]) -> None:
    seeds = [s for r in ranges for s in r]
    assert len(seeds) == len(set(seeds)), ranges


async def test_sc_waves_and_splits_never_repeat_a_seed() -> None:
    """Adaptive waves × n_per_request splits: before, every request carried seed 1234, so
    the engine returned the same samples again and again."""
    gen = ScriptedGenerator(lambda request, i: f"The answer is {request.seed + i}.")
    params = {"k": 12, "adaptive": True, "wave_size": 6, "n_per_request": 4}
    result = await run_strategy("self-consistency", MATH, gen, params=params)
    assert [r.n for r in gen.requests] == [4, 2, 4, 2]
    assert gen.requests[0].seed == 1234  # the caller's seed starts the run
    assert_disjoint(seed_ranges(gen.requests))
    assert len({s["text"] for s in result.trace["samples"]}) == 12  # distinct samples, not 3 repeats

    again = ScriptedGenerator(lambda request, i: f"The answer is {request.seed + i}.")
    await run_strategy("self-consistency", MATH, again, params=params)
    assert [r.seed for r in again.requests] == [r.seed for r in gen.requests]  # reproducible


async def test_seeds_count_per_prompt_and_unseeded_requests_stay_unseeded() -> None:
    """Two prompts each start at the caller's seed (different prompts are different pairs);
    a request without a seed (a strategy's own greedy prompt) gets none."""
    from strategies.base import RunContext

    gen = ScriptedGenerator(lambda request, i: "x")
    ctx = RunContext(gen, MATH)
    other = GenerationRequest(prompt="other", n=3, seed=1234)
    await ctx.generate([MATH.sample_request(n=2), other, GenerationRequest(prompt="greedy", temperature=0.0)])
    await ctx.generate([MATH.sample_request(n=2), other])
    seeds = [(r.prompt or "chat", r.seed) for r in gen.requests]
    assert seeds == [("chat", 1234), ("other", 1234), ("greedy", None), ("chat", 1236), ("other", 1237)]


def test_proxy_runs_move_the_seed_by_a_stride() -> None:
    assert MATH.for_run(0) is MATH
    assert MATH.for_run(3).seed == 1234 + 3 * RUN_SEED_STRIDE
    assert Task(prompt="x").for_run(2).seed is None
    assert Task(prompt="x", seed=2**63 - 1).for_run(1).seed < 2**63  # stays a valid int64 seed


@pytest.fixture(scope="module")
def proxy():
    with FakeOpenAI(name="seeds") as fake:
        settings = Settings(backend_urls=fake.url, model="fake-model", max_n=4, max_total_tokens=50_000)
        with ServedApp(create_app(settings), name="ponder-seeds") as served:
            with httpx.Client(base_url=served.url, timeout=30) as client:
                yield fake, client


def test_proxy_n_runs_draw_distinct_seeds(proxy) -> None:
    fake, client = proxy
    fake.reset()
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Pick a number."}], "n": 3, "seed": 7,
            "strategy": "self-consistency", "strategy_params": {"k": 4, "n_per_request": 2}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    bodies = [r.body for r in fake.generation_requests]
    assert len(bodies) == 3 * 2
    assert_disjoint([range(b["seed"], b["seed"] + b["n"]) for b in bodies])
    assert sorted(b["seed"] for b in bodies)[:2] == [7, 9]  # run 0 starts at the caller's seed


@pytest.mark.parametrize("field, value", [("echo", True), ("logit_bias", {"50256": -100}), ("suffix", "!"),
                                          ("best_of", 4)])
def test_fields_that_change_a_samples_meaning_are_refused_for_strategies(proxy, field, value) -> None:
    fake, client = proxy
    fake.reset()
    body = {"model": "fake-model", "prompt": "2+2=", "strategy": "self-consistency", field: value}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert fake.generation_requests == []  # refused before any sample was drawn


def test_pass_through_keeps_the_callers_fields(proxy) -> None:
    fake, client = proxy
    fake.reset()
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "2+2=", "echo": True})
    assert response.status_code == 200, response.text
    assert fake.generation_requests[0].body["echo"] is True


def test_every_refused_field_is_refused_by_the_task() -> None:
    for name in REFUSED_EXTRAS:
        with pytest.raises(StrategyError) as info:
            Task(prompt="x", extra=((name, True),))
        assert info.value.field == name
    Task(prompt="x", extra=(("response_format", {"type": "json_object"}), ("tools", [])))  # kept


def weighted_script(answers: list[tuple[str, float]]):
    """Sample j (over the whole run) answers answers[j][0] with mean token logprob answers[j][1]."""
    counter = itertools.count()

    def respond(request: GenerationRequest, i: int) -> Choice:
        answer, logprob = answers[next(counter)]
        return Choice(f"The answer is {answer}.", finish_reason="stop", token_logprobs=(logprob,) * 3)

    return respond


async def test_adaptive_logprob_stops_on_weight_not_on_votes() -> None:
    """Wave 1: three unsure votes for 42 (weight e^-3 each), one sure vote for 17. By count
    42 leads 3-1 with one sample left and "cannot be overtaken", but the weighted decision
    picks 17: stopping on counts stopped on the wrong leader. In weight, 17 leads by 0.8 < 1,
    so the last sample is drawn, and it decides."""
    answers = [("42", -3.0)] * 3 + [("17", -0.05), ("42", -0.01)]
    gen = ScriptedGenerator(weighted_script(answers))
    result = await run_strategy("self-consistency", MATH, gen,
                                params={"k": 5, "adaptive": True, "wave_size": 4, "weighting": "logprob"})
    assert result.trace["samples_used"] == 5
    assert result.trace["votes"][0]["answer"] == "42"  # 3 × 0.05 + 0.99 beats 0.95


async def test_adaptive_logprob_stops_when_no_weight_left_can_overtake() -> None:
    gen = ScriptedGenerator(weighted_script([("42", -0.01)] * 4 + [("17", -0.01)] * 4))
    result = await run_strategy("self-consistency", MATH, gen,
                                params={"k": 6, "adaptive": True, "wave_size": 4, "weighting": "logprob"})
    assert result.trace["samples_used"] == 4 and result.trace["stop"] == "leader cannot be overtaken"


@pytest.mark.engine
async def test_sc_with_a_caller_seed_draws_distinct_samples_on_the_engine(engine) -> None:
    """On the real vLLM CPU engine, with seeds honoured: k=6 as three n=2 requests. Before,
    all three carried the caller's seed, so the engine returned the same two samples three
    times (at most 2 distinct texts); now each request continues the seed sequence."""
    from service.backends import BackendConfig, HTTPBackend

    backend = HTTPBackend(BackendConfig(urls=[engine.url], supports_seed=True, default_model=engine.model_name))
    task = Task(prompt="Write a random word:", seed=11, temperature=1.0, max_tokens=8)
    try:
        result = await run_strategy("self-consistency", task, backend,
                                    params={"k": 6, "n_per_request": 2, "answer_format": "text"})
        assert all((await backend.ready()).values())  # seeded batches do not crash this engine
    finally:
        await backend.aclose()
    texts = [sample["text"] for sample in result.trace["samples"]]
    assert len(texts) == 6 and len(set(texts)) > 2, texts
