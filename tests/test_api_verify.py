"""``verify`` over HTTP (vLLM-like mock backend): REST body and proxy ``extra_body``, 400s that
name the field, verdicts in the trace and in the progress events."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from loadtests.mock_backend import MockConfig, create_app as create_mock
from service.app import create_app
from service.config import Settings
from tests.servers import ServedApp, assert_openai_error

MODEL = "mock-model"
ANYTHING = {"type": "regex", "pattern": r"\S", "name": "non-empty"}
NOTHING = {"type": "regex", "pattern": r"^\Z", "name": "empty"}


@pytest.fixture(scope="module")
def ponder():
    with ServedApp(create_mock(MockConfig(ttft_ms=1, tpot_ms=0.2, tokens=8, answer_p=0.9)), name="mock",
                   lifespan="off") as mock:
        settings = Settings(backend_urls=mock.url, model=MODEL, max_n=4, max_total_tokens=50_000)
        with ServedApp(create_app(settings), name="ponder") as served:
            yield served


@pytest.fixture(scope="module")
def http(ponder):
    with httpx.Client(base_url=ponder.url, timeout=30) as client:
        yield client


def solve(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/solve", json={"task": {"messages": [{"role": "user", "content": "2+2?"}]}, **body})


def test_rest_verify_puts_verdicts_in_the_trace(http) -> None:
    response = solve(http, strategy="verified-bon", params={"n": 3, "rounds": 1}, verify=[ANYTHING])
    assert response.status_code == 200, response.text
    trace = response.json()["trace"]
    assert trace["passed"] and len(trace["candidates"]) == 3
    assert trace["candidates"][0]["verdicts"]["non-empty"] == {"passed": True, "score": 1.0, "feedback": ""}


def test_rest_failing_verify_rewrites_and_reports_the_failure(http) -> None:
    body = solve(http, strategy="verified-bon", params={"n": 2, "rounds": 1, "rewrites": 1}, verify=[NOTHING]).json()
    assert not body["trace"]["passed"] and len(body["trace"]["rounds"]) == 1
    assert body["usage"]["backend_calls"] == 2


@pytest.mark.parametrize("verify, param", [
    ([{"type": "regex"}], "verify[0].pattern"),
    ([{"type": "shell", "cmd": "rm"}], "verify[0].type"),
    ([{"type": "python_tests", "tests": ["assert True"]}], "verify[0].type"),
    ([{"type": "webhook", "url": "http://169.254.169.254/"}], "verify[0].url"),
    ("regex", "verify"),
])
def test_bad_verify_is_400_naming_the_field(http, verify, param) -> None:
    assert_openai_error(solve(http, strategy="best-of-n", verify=verify), 400, param)
    assert_openai_error(http.post("/v1/runs", json={"task": {"prompt": "x"}, "strategy": "none", "verify": verify}),
                        400, param)


def test_verified_bon_without_verify_is_400(http) -> None:
    assert_openai_error(solve(http, strategy="verified-bon"), 400, "verify")


def test_proxy_takes_verify_in_extra_body_and_streams_verified_events(ponder) -> None:
    client = openai.OpenAI(base_url=f"{ponder.url}/v1", api_key="x")
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "2+2?"}],
        extra_body={"strategy": "verified-bon", "strategy_params": {"n": 2}, "verify": [ANYTHING]})
    assert reply.model_extra["ponder"]["runs"][0]["trace"]["passed"]
    with httpx.stream("POST", f"{ponder.url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "2+2?"}], "stream": True,
            "strategy": "verified-bon", "strategy_params": {"n": 2}, "verify": [ANYTHING]}) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith(": ponder ")]
    events = [json.loads(line[len(": ponder "):]) for line in lines]
    verified = [e for e in events if e["event"] == "verified"]
    assert verified and verified[0]["passed"] == [True, True]


def test_proxy_verify_without_a_strategy_is_400(http) -> None:
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "verify": [ANYTHING]})
    assert_openai_error(response, 400, "verify")


def test_strategies_listing_has_verified_bon(http) -> None:
    listing = http.get("/v1/strategies").json()
    names = {s["name"] for s in listing["data"]}
    assert "verified-bon" in names
