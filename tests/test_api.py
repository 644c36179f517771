"""The HTTP surface over the vLLM-like mock backend: validation, error schema, streaming
shape, runs, strategies listing. (The same surfaces against the real engine are in
test_api_engine.py.)"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from loadtests.mock_backend import MockConfig, create_app as create_mock
from service.app import create_app
from service.config import Settings
from tests.servers import ServedApp, assert_openai_error

MODEL = "mock-model"


@pytest.fixture(scope="module")
def mock():
    with ServedApp(create_mock(MockConfig(ttft_ms=1, tpot_ms=0.2, tokens=8, answer_p=0.9)), name="mock",
                   lifespan="off") as served:
        yield served


@pytest.fixture(scope="module")
def ponder(mock):
    settings = Settings(backend_urls=mock.url, model=MODEL, max_n=4, max_total_tokens=50_000)
    with ServedApp(create_app(settings), name="ponder") as served:
        yield served


@pytest.fixture(scope="module")
def http(ponder):
    with httpx.Client(base_url=ponder.url, timeout=30) as client:
        yield client



def test_malformed_json_is_400(http):
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_missing_messages_names_the_field(http):
    assert_openai_error(http.post("/v1/chat/completions", json={"model": MODEL}), 400, "messages")


def test_n_over_cap_names_the_field(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 5, "strategy": "self-consistency"}
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "n")


def test_budget_over_cap_names_the_field(http):
    body = {"task": {"prompt": "x"}, "strategy": "none", "budget": {"max_tokens": 10**9}}
    assert_openai_error(http.post("/v1/solve", json=body), 400, "budget.max_tokens")


def test_unknown_strategy_param_is_rejected(http):
    body = {"task": {"prompt": "x"}, "strategy": "self-refine", "params": {"max_round": 3}}
    error = assert_openai_error(http.post("/v1/solve", json=body), 400, "max_round")
    assert "self-refine" in error["message"]


def test_model_prefix_conflicting_with_strategy_field(http):
    body = {"model": f"mcts:{MODEL}", "prompt": "x", "strategy": "self-refine"}
    assert_openai_error(http.post("/v1/completions", json=body), 400, "strategy")


def test_unknown_run_is_404(http):
    assert_openai_error(http.get("/v1/runs/run-nope"), 404, "run_id")


def test_strategies_listing_has_schemas(http):
    listing = http.get("/v1/strategies").json()["data"]
    names = {s["name"] for s in listing}
    assert names == {"none", "self-consistency", "self-refine", "mcts", "checklist-bon", "best-of-n", "verified-bon", "auto"}
    sc = next(s for s in listing if s["name"] == "self-consistency")
    assert sc["params_schema"]["properties"]["k"]["default"] == 8


def test_strategy_stream_sends_progress_before_the_answer(ponder):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "what?"}], "stream": True,
            "stream_options": {"include_usage": True}, "strategy": "self-consistency", "strategy_params": {"k": 4}}
    lines = []
    with httpx.stream("POST", ponder.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    comments = [i for i, line in enumerate(lines) if line.startswith(": ponder")]
    data = [i for i, line in enumerate(lines) if line.startswith("data: ")]
    assert comments and data and max(comments) < min(data)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(lines[i][6:]) for i in data[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "answer is" in content
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["ponder"]["strategy"] == "self-consistency"


def test_sdk_n_runs_concurrently_with_totals(ponder):
    client = openai.OpenAI(base_url=ponder.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=f"self-consistency:{MODEL}", n=3,
                                           messages=[{"role": "user", "content": "what?"}],
                                           extra_body={"strategy_params": {"k": 4}})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    runs = reply.model_extra["ponder"]["runs"]
    assert len(runs) == 3
    assert reply.usage.completion_tokens == sum(r["usage"]["completion_tokens"] for r in runs)


def test_passthrough_stream_relays_backend_chunks(ponder):
    client = openai.OpenAI(base_url=ponder.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, n=2))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_run_lifecycle(http):
    created = http.post("/v1/runs", json={"task": {"prompt": "q"}, "strategy": "self-consistency",
                                          "params": {"k": 2}})
    assert created.status_code == 202 and created.headers["location"].endswith(created.json()["id"])
    run_id = created.json()["id"]
    with http.stream("GET", f"/v1/runs/{run_id}/events") as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["event"] == "done"
    record = http.get(f"/v1/runs/{run_id}").json()
    assert record["status"] == "succeeded" and record["result"]["answer"]
    # resuming after the last seen event yields nothing new
    with http.stream("GET", f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": str(events[-1]["seq"])}) as s:
        assert not [line for line in s.iter_lines() if line.startswith("data: ")]


def test_invalid_run_params_fail_before_202(http):
    response = http.post("/v1/runs", json={"task": {"prompt": "q"}, "strategy": "mcts", "params": {"simulations": 0}})
    assert_openai_error(response, 400, "simulations")


def test_token_id_prompts_pass_through_but_strategies_need_text(http):
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}).status_code == 200
    body = {"model": MODEL, "prompt": [[1, 2], [3]], "strategy": "self-consistency"}
    assert_openai_error(http.post("/v1/completions", json=body), 400, "prompt")


def metric_value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_client_disconnect_cancels_the_run_at_once():
    """A slow strategy run whose client hangs up is cancelled within a moment, not when
    the backend finishes (here: 3 s per answer)."""
    slow = create_mock(MockConfig(ttft_ms=0, tpot_ms=30, tokens=100))
    with ServedApp(slow, name="slow-mock", lifespan="off") as mock_server, \
            ServedApp(create_app(Settings(backend_urls=mock_server.url, model=MODEL)), name="ponder-slow") as served:
        before = httpx.get(served.url + "/metrics").text
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "strategy": "self-consistency",
                "strategy_params": {"k": 2}}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/chat/completions", json=body, timeout=0.5)
        for _ in range(40):
            after = httpx.get(served.url + "/metrics").text
            if metric_value(after, "ponder_strategy_runs_in_flight") == 0:
                break
            time.sleep(0.05)
        assert metric_value(after, "ponder_strategy_runs_in_flight") == 0
        assert metric_value(after, "ponder_client_disconnects_total") == metric_value(before, "ponder_client_disconnects_total") + 1
