"""Strategies through ponder in front of the fault-injecting backend (tests/faulty_backend.py),
over real HTTP: under 30% upstream faults every best-of-n and checklist-bon request answers 200
with a well-formed body; a rating or judgment whose call fails for good (the backend's retries
spent) is left out and the request still answers, saying so in its trace; with nothing usable
left, the error surfaces in the OpenAI schema. (Pass-through scenarios, stalls and deadlines:
tests/test_backend_faults.py.)"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from tests.faulty_backend import FaultyBackend
from tests.servers import ServedApp, assert_openai_error

MODEL = "mock-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about cats."}],
        "max_tokens": 24, "cache": False}
STRATEGIES = {"best-of-n": {"n": 3}, "checklist-bon": {"n": 3}}


@pytest.fixture
def upstream() -> Iterator[FaultyBackend]:
    with FaultyBackend(seed=11, stall_s=20) as faulty:
        yield faulty


@contextmanager
def ponder(upstream: FaultyBackend, **settings: Any) -> Iterator[ServedApp]:
    with ServedApp(create_app(Settings(backend_urls=upstream.url, model=MODEL, **settings)), name="ponder") as served:
        yield served


async def fire(url: str, body: dict[str, Any], *, requests: int, concurrency: int = 1) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one() -> httpx.Response:
            async with limit:
                return await client.post("/v1/chat/completions", json=body)

        return await asyncio.gather(*(one() for _ in range(requests)))


def assert_answer(response: httpx.Response, strategy: str) -> dict[str, Any]:
    """A 200 with a complete chat completion: one choice with text, usage, the run's trace."""
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] > 0 and body["ponder"]["strategy"] == strategy
    (run,) = body["ponder"]["runs"]
    return run



@pytest.mark.parametrize("fault", ["500", "429", "503", "reset", "truncated"])
async def test_30_percent_upstream_faults_every_strategy_request_200(upstream, fault):
    # 3 calls in every 10 fail (drawn in arrival order, never two in a row); one request at a
    # time, each fanning out its ratings / judgments concurrently.
    upstream.script(*[fault if i % 10 in (0, 3, 7) else "ok" for i in range(400)])
    with ponder(upstream) as served:
        for strategy, params in STRATEGIES.items():
            responses = await fire(served.url, {**CHAT, "strategy": strategy, "strategy_params": params}, requests=3)
            for response in responses:
                assert_answer(response, strategy)
    assert upstream.outcomes[fault] > 0


async def test_a_rating_that_fails_for_good_drops_its_candidate_and_the_request_answers(upstream):
    # The n=3 sample; the three ratings' first attempts (one fails); that one's 3 retries fail too.
    upstream.script("ok", "500", "ok", "ok", "500", "500", "500")
    with ponder(upstream) as served:
        (response,) = await fire(served.url, {**CHAT, "strategy": "best-of-n", "strategy_params": {"n": 3}},
                                 requests=1)
    run = assert_answer(response, "best-of-n")
    trace = run["trace"]
    assert trace["failed_calls"] == [{"error": "UpstreamError", "status": 500}]
    assert trace["unrated"] == 1 and [c["score"] is None for c in trace["candidates"]].count(True) == 1
    assert trace["candidates"][trace["chosen"]]["score"] is not None
    assert "failed backend call" in run["stop_reason"]
    assert upstream.calls == 7


async def test_a_judgment_that_fails_for_good_is_a_missing_verdict_not_a_no(upstream):
    # checklist and candidates, then the first judgment fails with its 3 retries.
    upstream.script("ok", "ok", "500", *["ok"] * 11, "500", "500", "500")
    with ponder(upstream) as served:
        (response,) = await fire(served.url, {**CHAT, "strategy": "checklist-bon", "strategy_params": {"n": 3}},
                                 requests=1)
    trace = assert_answer(response, "checklist-bon")["trace"]
    assert len(trace["checklist"]) == 4  # the mock writes four items: 3 x 4 judgments
    assert trace["missing_verdicts"] == 1 and trace["failed_calls"] == [{"error": "UpstreamError", "status": 500}]
    assert sum(c["missing"] for c in trace["candidates"]) == 1


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
async def test_with_nothing_usable_left_the_error_surfaces_in_the_schema(upstream, strategy):
    upstream.set_faults(**{"500": 1.0})
    with ponder(upstream, backend_retry_budget_min=100) as served:
        (response,) = await fire(served.url, {**CHAT, "strategy": strategy, "strategy_params": STRATEGIES[strategy]},
                                 requests=1)
    assert_openai_error(response, 502)


async def test_all_429_a_strategy_request_answers_429_with_retry_after(upstream):
    upstream.retry_after = 0
    upstream.set_faults(**{"429": 1.0})
    with ponder(upstream) as served:
        (response,) = await fire(served.url, {**CHAT, "strategy": "best-of-n", "strategy_params": {"n": 2}},
                                 requests=1)
    assert_openai_error(response, 429)
    assert float(response.headers["retry-after"]) >= 0
