"""The public API, served by uvicorn on loopback in front of the real vLLM CPU engine
and a real Redis, driven by the official ``openai`` SDK (unmodified) and plain HTTP."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from service.app import create_app
from service.config import Settings
from tests.servers import ServedApp

pytestmark = pytest.mark.engine

API_KEY = "test-key-123"
FEW_SHOT = "2+3=5\n4+4=8\n7+1=8\n6+3=9\n5+2="
QUESTION = [{"role": "user", "content": "Tom has 3 apples and buys 2 more. How many apples does he have?"}]
# Generous: on a loaded 2-core machine one strategy run can take minutes; no test asserts on time.
CLIENT_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def ponder(engine, redis_url):
    settings = Settings(backend_urls=engine.url, backend_supports_seed=False, redis_url=redis_url,
                        api_keys=API_KEY, model=engine.model_name)
    with ServedApp(create_app(settings), name="ponder") as served:
        yield served


@pytest.fixture(scope="module")
def client(ponder):
    return openai.OpenAI(base_url=ponder.url + "/v1", api_key=API_KEY, max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def http(ponder):
    with httpx.Client(base_url=ponder.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=CLIENT_TIMEOUT_S) as c:
        yield c


def test_sdk_chat_passthrough(client, engine):
    reply = client.chat.completions.create(model=engine.model_name, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert 0 < reply.usage.completion_tokens <= 8


def test_sdk_completion_stream_passthrough(client, engine):
    stream = client.completions.create(model=engine.model_name, prompt=FEW_SHOT, max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_sdk_async_with_strategy_in_extra_body(ponder, engine):
    async with openai.AsyncOpenAI(base_url=ponder.url + "/v1", api_key=API_KEY, max_retries=0,
                                  timeout=CLIENT_TIMEOUT_S) as aclient:
        reply = await aclient.completions.create(
            model=engine.model_name, prompt=FEW_SHOT, max_tokens=4, stop=["\n"],
            extra_body={"strategy": "self-consistency", "strategy_params": {"k": 4, "answer_format": "first_number"}},
        )
    extension = reply.model_extra["ponder"]
    (run,) = extension["runs"]
    assert extension["strategy"] == "self-consistency"
    assert run["usage"]["backend_calls"] == 1 and run["usage"]["samples"] == 4
    votes = run["trace"]["votes"]
    assert sum(row["votes"] for row in votes) <= 4
    assert reply.choices[0].text.strip() in {s["text"].strip() for s in run["trace"]["samples"]}
    assert reply.usage.total_tokens == run["usage"]["prompt_tokens"] + run["usage"]["completion_tokens"]


def test_sdk_model_prefix_strategy_n2_stream(client, engine):
    stream = client.chat.completions.create(
        model=f"self-consistency:{engine.model_name}", messages=[{"role": "user", "content": "2+2="}],
        max_tokens=4, n=2, stream=True, stream_options={"include_usage": True},
        extra_body={"strategy_params": {"k": 2}},
    )
    chunks = list(stream)
    indices = {c.choices[0].index for c in chunks if c.choices}
    assert indices == {0, 1}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 2
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_models_lists_strategy_ids(client, engine):
    ids = {m.id for m in client.models.list()}
    assert engine.model_name in ids and f"mcts:{engine.model_name}" in ids


def test_sdk_invalid_param_is_a_typed_400(client, engine):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.model_name, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"strategy": "self-consistency", "strategy_params": {"k": 10_000}})
    assert info.value.status_code == 400
    assert info.value.body["param"] == "k"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.model_name, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"strategy": "no-such-strategy"})
    assert "unknown strategy" in info.value.body["message"]


def test_sdk_upstream_4xx_passes_through(client, engine):
    with pytest.raises(openai.BadRequestError) as info:  # vLLM itself refuses: longer than max_model_len
        client.completions.create(model=engine.model_name, prompt="hi", max_tokens=10**6)
    assert info.value.status_code == 400
    assert "max" in info.value.body["message"].lower()


def test_sdk_bad_api_key_is_401(ponder, engine):
    bad = openai.OpenAI(base_url=ponder.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_solve_every_strategy_end_to_end(http, engine):
    """Each strategy completes a chat task on the real engine; its usage matches what the engine
    itself counted; the trace has its documented shape."""
    cases = {
        "none": ({}, {"samples"}),
        "self-consistency": ({"k": 3, "answer_format": "first_number"}, {"votes", "samples", "samples_used"}),
        "self-refine": ({"max_rounds": 1, "feedback_max_tokens": 24}, {"chains", "best"}),
        "mcts": ({"simulations": 2, "branching": 2, "value_samples": 1}, {"tree", "chosen"}),
        "checklist-bon": ({"n": 2, "max_items": 2, "checklist_max_tokens": 48}, {"checklist", "candidates", "chosen"}),
        "best-of-n": ({"n": 2}, {"candidates", "chosen"}),
    }
    for strategy, (params, trace_keys) in cases.items():
        prompt_before = engine_metric(engine, "vllm:prompt_tokens_total")
        generated_before = engine_metric(engine, "vllm:generation_tokens_total")
        response = http.post("/v1/solve", json={
            "task": {"messages": QUESTION}, "strategy": strategy, "params": params,
            "sampling": {"max_tokens": 8},
        })
        assert response.status_code == 200, (strategy, response.text)
        body = response.json()
        assert trace_keys <= set(body["trace"]), (strategy, body["trace"].keys())
        usage = body["usage"]
        assert usage["backend_calls"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["completion_tokens"] == engine_metric(engine, "vllm:generation_tokens_total") - generated_before
        # vLLM's counter counts a shared prompt once per sequence (n times); the API usage once per request.
        engine_prompt = engine_metric(engine, "vllm:prompt_tokens_total") - prompt_before
        assert usage["prompt_tokens"] <= engine_prompt <= usage["prompt_tokens"] * max(params.get("k", 1), params.get("n", 1), 2)


def test_steps_mode_mcts_on_engine(http):
    response = http.post("/v1/solve", json={
        "task": {"prompt": "Q: Tom has 3 apples and buys 2 more. How many apples does he have?\nA: Let's think step by step.\n"},
        "strategy": "mcts",
        "params": {"mode": "steps", "simulations": 2, "branching": 2, "max_depth": 2, "value_samples": 1,
                   "step_max_tokens": 24},
        "sampling": {"max_tokens": 48},
    })
    assert response.status_code == 200, response.text
    tree = response.json()["trace"]["tree"]
    assert tree["children"], tree
    assert response.json()["usage"]["backend_calls"] >= 3


def test_run_events_in_order_and_done(http):
    created = http.post("/v1/runs", json={"task": {"prompt": FEW_SHOT}, "strategy": "self-consistency",
                                          "params": {"k": 4, "adaptive": True, "wave_size": 2},
                                          "sampling": {"max_tokens": 4, "stop": ["\n"]}})
    assert created.status_code == 202
    run_id = created.json()["id"]
    events = []
    with http.stream("GET", f"/v1/runs/{run_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[0]["event"] == "started" and events[-1]["event"] == "done"
    assert any(e["event"] == "votes" for e in events)
    final = http.get(f"/v1/runs/{run_id}").json()
    assert final["status"] == "succeeded" and final["result"]["usage"]["backend_calls"] >= 1


def engine_metric(engine, name: str) -> float:
    """A counter or gauge from vLLM's own Prometheus metrics, summed over its labels."""
    text = httpx.get(engine.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def engine_running(engine) -> float:
    """Requests the engine is working on."""
    return engine_metric(engine, "vllm:num_requests_running")


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_delete_run_cancels_backend_work(http, engine):
    # A chat task: SmolLM2-Instruct writes the story (measured: 3 of 3 runs, every sample to 1500 tokens). As a bare
    # completion prompt the instruct model ends at once (8 of 8 runs: 4 empty samples in 0.1-0.3 s), so the engine's
    # running gauge was up for less than a poll and CI failed "engine never started the run".
    created = http.post("/v1/runs", json={"task": {"messages": [{"role": "user",
                                                                 "content": "Write a long story about a dragon."}]},
                                          "strategy": "self-consistency", "params": {"k": 4},
                                          "sampling": {"max_tokens": 1500}})
    run_id = created.json()["id"]
    assert wait_until(lambda: engine_running(engine) > 0, 30), \
        f"engine never started the run: {http.get(f'/v1/runs/{run_id}').json()}"
    cancelled = http.delete(f"/v1/runs/{run_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert wait_until(lambda: engine_running(engine) == 0, 10), "engine kept generating after DELETE"


def test_client_disconnect_stops_backend_work(ponder, engine):
    # ignore_eos (vLLM): an instruction-tuned model may end its story within the client's 3 s.
    body = {"model": engine.model_name, "prompt": "Write a long story about a dragon.", "max_tokens": 1500,
            "ignore_eos": True, "strategy": "self-consistency", "strategy_params": {"k": 4}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(ponder.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(3.0, connect=5.0))
    assert wait_until(lambda: engine_running(engine) == 0, 10), "engine kept generating after the client left"


def test_metrics_move(http, engine):
    def sample(name: str, **labels: str) -> float:
        text = http.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))

    before_calls = sample("ponder_backend_calls_total", strategy="self-consistency")
    before_requests = sample("ponder_http_requests_total", route="/v1/solve", status="200")
    response = http.post("/v1/solve", json={"task": {"prompt": FEW_SHOT}, "strategy": "self-consistency",
                                            "params": {"k": 2}, "sampling": {"max_tokens": 4, "stop": ["\n"]}})
    assert response.status_code == 200
    assert sample("ponder_backend_calls_total", strategy="self-consistency") == before_calls + 1
    assert sample("ponder_http_requests_total", route="/v1/solve", status="200") == before_requests + 1


def test_readyz(http):
    body = http.get("/readyz").json()
    assert body["status"] == "ready" and all(body["backends"])


def test_budget_holds_against_the_real_tokenizer(http):
    """The token budget is booked with a prompt estimate made without a tokenizer (bytes / 3,
    calibrated on the engine's counts): against the real engine's counts, a concurrent fan-out
    spends no more than its budget and says it was limited."""
    task = ("Write a short, friendly note to a neighbour who has helped you carry groceries, "
            "thanking them and offering to return the favour. ") * 4
    body = {"task": {"messages": [{"role": "user", "content": task}]}, "strategy": "checklist-bon",
            "params": {"n": 4, "max_items": 3, "checklist_max_tokens": 64}, "sampling": {"max_tokens": 48},
            "budget": {"max_tokens": 700}, "cache": False}
    reply = http.post("/v1/solve", json=body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["usage"]["total_tokens"] <= 700 and result["budget_limited"] is True
    assert result["answer"]
    too_small = http.post("/v1/solve", json={**body, "budget": {"max_tokens": 40}})
    assert too_small.status_code == 400 and too_small.json()["error"]["param"] == "budget.max_tokens"
