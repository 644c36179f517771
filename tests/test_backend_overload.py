"""Overload at the backend layer: the retry budget, the queue deadline on the concurrency
slots, pass-through's reserved share, the response size cap and the forwarded-field allowlist."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

from service.app import create_app
from service.backends import BackendConfig, BackendError, HTTPBackend, UpstreamError
from service.config import Settings
from strategies.protocol import GenerationRequest
from tests.faulty_backend import FaultyBackend
from tests.servers import ServedApp

MODEL = "mock-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 6 times 7?"}], "max_tokens": 16}


@pytest.fixture
def upstream() -> Iterator[FaultyBackend]:
    with FaultyBackend(seed=5, stall_s=10) as faulty:
        yield faulty


def retries(outcome: str) -> float:
    return REGISTRY.get_sample_value("ponder_backend_retries_total", {"outcome": outcome}) or 0.0


def question(i: int = 0) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": f"What is 6 times {i}?"},), max_tokens=8)


async def test_the_retry_budget_bounds_a_503_storm(upstream):
    """Every call fails with 503: without a budget each costs 1 + max_retries upstream calls."""
    upstream.set_faults(**{"503": 1.0})
    backend = HTTPBackend(BackendConfig(urls=[upstream.url], default_model=MODEL, max_retries=3,
                                        retry_budget_ratio=0.2, retry_budget_min=5, retry_budget_window_s=60))
    spent_before, retried_before = retries("budget_spent"), retries("retried")
    try:
        for i in range(50):
            with pytest.raises(UpstreamError) as info:
                await backend.generate([question(i)])
            assert info.value.status_code == 503
    finally:
        await backend.aclose()
    assert upstream.calls <= 50 + 5 + 0.2 * 50  # instead of 200
    assert backend.retry_budget.refused > 0
    # what /metrics shows: every retry, and every one the budget refused
    assert retries("retried") - retried_before == upstream.calls - 50
    assert retries("budget_spent") - spent_before == backend.retry_budget.refused
    # 503 is back-pressure from a live server: never ejected for it
    assert backend.endpoints[0].healthy


async def test_the_retry_budget_still_lets_a_quiet_server_retry(upstream):
    upstream.script("503", "500", "ok")
    backend = HTTPBackend(BackendConfig(urls=[upstream.url], default_model=MODEL, backoff_base=0.01))
    try:
        [generation] = await backend.generate([question()])
    finally:
        await backend.aclose()
    assert generation.choices and upstream.calls == 3


async def test_pass_through_is_not_starved_by_strategy_fan_out(upstream):
    """8 slots, a strategy fans out 40 slow calls: a pass-through request still finds one of
    the reserved slots instead of queueing behind all 40."""
    upstream.delay_s = 0.3
    backend = HTTPBackend(BackendConfig(urls=[upstream.url], default_model=MODEL, max_concurrency=8,
                                        passthrough_reserve=0.25))
    try:
        started = time.monotonic()
        await backend.request("POST", "/v1/chat/completions", CHAT, decode=False)
        unloaded = time.monotonic() - started
        fan_out = asyncio.create_task(backend.generate([question(i) for i in range(40)]))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await backend.request("POST", "/v1/chat/completions", CHAT, decode=False)
        loaded = time.monotonic() - started
        assert not fan_out.done()
        await fan_out
    finally:
        await backend.aclose()
    assert loaded < 2 * unloaded + 0.1  # queued behind the fan-out it would take >= 5 rounds of 0.3 s
    assert upstream.calls == 42


def served(upstream: FaultyBackend, **settings: Any) -> ServedApp:
    app = create_app(Settings(backend_urls=upstream.url, model=MODEL, **settings))
    return ServedApp(app, name="ponder")


async def test_a_full_queue_answers_503_with_retry_after_in_the_schema(upstream):
    upstream.set_faults(stall=1.0)
    with served(upstream, backend_max_concurrency=2, backend_queue_timeout_s=0.3) as ponder:
        async with httpx.AsyncClient(base_url=ponder.url, timeout=10) as client:
            holders = [asyncio.create_task(client.post("/v1/chat/completions",
                                                       json={**CHAT, "budget": {"deadline_s": 2}}))
                       for _ in range(2)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            response = await client.post("/v1/chat/completions", json=CHAT)
            waited = time.monotonic() - started
            assert [r.status_code for r in await asyncio.gather(*holders)] == [504, 504]
    assert response.status_code == 503, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "slot" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "1"
    assert 0.25 < waited < 3  # the queue deadline (0.3 s), not the holders' 2 s deadline
    assert upstream.calls == 2


async def test_a_response_over_the_size_cap_is_a_clear_502(upstream):
    with served(upstream, backend_max_response_bytes=4096) as ponder:
        async with httpx.AsyncClient(base_url=ponder.url, timeout=10) as client:
            small = await client.post("/v1/chat/completions", json=CHAT)
            huge = await client.post("/v1/chat/completions",
                                     json={**CHAT, "n": 4, "logprobs": True, "top_logprobs": 20, "max_tokens": 64})
    assert small.status_code == 200
    assert huge.status_code == 502, huge.text
    assert "PONDER_BACKEND_MAX_RESPONSE_BYTES" in huge.json()["error"]["message"]
    assert upstream.calls == 2  # not retried: it would be as large again


async def test_only_known_fields_are_forwarded(upstream):
    with served(upstream) as ponder:
        async with httpx.AsyncClient(base_url=ponder.url, timeout=10) as client:
            known = await client.post("/v1/chat/completions", json={**CHAT, "top_k": 5, "min_tokens": 2,
                                                                    "response_format": {"type": "text"}})
            unknown = await client.post("/v1/chat/completions", json={**CHAT, "ponder_debug_dump": True})
            strategy = await client.post("/v1/chat/completions", json={**CHAT, "strategy": "self-consistency",
                                                                       "x_internal": 1})
    assert known.status_code == 200
    forwarded = upstream.requests[0].body
    assert (forwarded["top_k"], forwarded["min_tokens"], forwarded["response_format"]) == (5, 2, {"type": "text"})
    for response, name in ((unknown, "ponder_debug_dump"), (strategy, "x_internal")):
        assert response.status_code == 400
        assert response.json()["error"]["param"] == name and name in response.json()["error"]["message"]
    assert upstream.calls == 1


async def test_ponder_fields_win_over_the_callers_extras():
    backend = HTTPBackend(BackendConfig(urls=["http://127.0.0.1:9"], default_model=MODEL))
    request = GenerationRequest(
        messages=({"role": "user", "content": "judge this"},), n=2, max_tokens=4, temperature=0.0,
        extra=(("n", 64), ("max_tokens", 100_000), ("temperature", 1.5), ("model", "other"),
               ("prompt", "injected"), ("messages", []), ("top_k", 5), ("tools", [{"type": "function"}])))
    body = await backend.request_body(request)
    assert (body["n"], body["max_tokens"], body["temperature"], body["model"]) == (2, 4, 0.0, MODEL)
    assert body["messages"] == [{"role": "user", "content": "judge this"}] and "prompt" not in body
    assert body["top_k"] == 5 and body["tools"] == [{"type": "function"}]
    await backend.aclose()


async def test_queue_deadline_on_the_backend_directly(upstream):
    upstream.set_faults(stall=1.0)
    backend = HTTPBackend(BackendConfig(urls=[upstream.url], default_model=MODEL, max_concurrency=1,
                                        queue_timeout=0.2, read_timeout=2))
    try:
        holder = asyncio.create_task(backend.generate([question()]))
        await asyncio.sleep(0.1)
        timeouts_before = REGISTRY.get_sample_value("ponder_backend_queue_timeouts_total") or 0
        with pytest.raises(BackendError) as info:
            await backend.generate([question(1)])
        assert info.value.status_code == 503 and info.value.retry_after == 1.0
        assert REGISTRY.get_sample_value("ponder_backend_queue_timeouts_total") == timeouts_before + 1
        holder.cancel()
    finally:
        await backend.aclose()
