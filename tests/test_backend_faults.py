"""Pass-through requests through ponder in front of the fault-injecting backend
(tests/faulty_backend.py), over real HTTP: upstream faults are retried within the retry
budget, no broken body passes as 200, every request ends by its deadline, the upstream
connection goes when the client does, and no concurrency slot leaks."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest
from starlette.requests import ClientDisconnect

from service.app import create_app
from service.config import Settings
from tests.faulty_backend import FaultyBackend
from tests.servers import ServedApp, assert_openai_error

MODEL = "mock-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is 6 times 7?"}], "max_tokens": 16}


@pytest.fixture
def upstream() -> Iterator[FaultyBackend]:
    with FaultyBackend(seed=7, stall_s=20) as faulty:
        yield faulty


@contextmanager
def ponder(upstream: FaultyBackend, **settings: Any) -> Iterator[ServedApp]:
    app = create_app(Settings(backend_urls=upstream.url, model=MODEL, **settings))
    with ServedApp(app, name="ponder") as served:
        served.backend = app.state.runtime.backend
        yield served



async def fire(url: str, body: dict[str, Any], *, requests: int = 20, concurrency: int = 4,
               path: str = "/v1/chat/completions") -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one() -> httpx.Response:
            async with limit:
                return await client.post(path, json=body)

        return await asyncio.gather(*(one() for _ in range(requests)))


@pytest.mark.parametrize("fault", ["500", "429", "503", "reset", "truncated", "cut"])
async def test_30_percent_upstream_faults_every_pass_through_request_200(upstream, fault):
    # exactly 3 calls in every 10 fail, never two in a row (drawn at random, 20 requests stray
    # too far from 30%); one request at a time, so its retries take the next outcomes in turn
    upstream.script(*[fault if i % 10 in (0, 3, 7) else "ok" for i in range(60)])
    with ponder(upstream) as served:
        responses = await fire(served.url, CHAT, concurrency=1)
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200][:2]
    for r in responses:
        assert r.json()["choices"][0]["message"]["content"]
    assert upstream.outcomes[fault] > 0
    assert upstream.calls / 20 <= 1.5


async def test_30_percent_500_on_streams_every_request_completes(upstream):
    upstream.script(*["500" if i % 10 in (0, 3, 7) else "ok" for i in range(60)])
    with ponder(upstream) as served:
        responses = await fire(served.url, {**CHAT, "stream": True}, concurrency=1)
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text


async def test_all_429_answers_429_with_retry_after_in_the_schema(upstream):
    upstream.set_faults(**{"429": 1.0})
    upstream.retry_after = 1
    with ponder(upstream, backend_retry_budget_min=100) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            started = time.monotonic()
            response = await client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(response, 429)
    assert response.headers["retry-after"] == "1"
    assert upstream.calls == 4  # 1 + PONDER_BACKEND_MAX_RETRIES, each after the upstream's Retry-After
    assert time.monotonic() - started >= 3 * 1 - 0.2


async def test_a_truncated_body_is_never_relayed_as_200(upstream):
    upstream.set_faults(truncated=1.0)
    with ponder(upstream) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 502)
    assert "not complete JSON" in error["message"]
    assert upstream.calls == 4  # retried first


async def test_a_stalled_upstream_ends_by_the_request_deadline_with_504(upstream):
    upstream.set_faults(stall=1.0)
    with ponder(upstream) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            started = time.monotonic()
            response = await client.post("/v1/chat/completions", json={**CHAT, "budget": {"deadline_s": 1}})
            elapsed = time.monotonic() - started
    error = assert_openai_error(response, 504)
    assert "deadline" in error["message"]
    assert 0.9 < elapsed < 2.5
    assert upstream.calls == 1  # a stall may still be generating: not asked twice


async def test_the_default_deadline_applies_without_a_caller_budget(upstream):
    upstream.set_faults(stall=1.0)
    with ponder(upstream, default_deadline_s=1) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert_openai_error(response, 504)


async def stream_with_deadline(upstream: FaultyBackend, deadline_s: float, *,
                               timeout: float) -> tuple[httpx.Response, float]:
    """A streamed chat request through ponder with a ``deadline_s`` budget: the response and
    its wall time in seconds."""
    with ponder(upstream) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=timeout) as client:
            started = time.monotonic()
            response = await client.post("/v1/chat/completions",
                                         json={**CHAT, "stream": True, "budget": {"deadline_s": deadline_s}})
            return response, time.monotonic() - started


async def test_a_stalled_stream_ends_with_an_error_event_and_done_by_the_deadline(upstream):
    upstream.set_faults(stall=1.0)
    response, elapsed = await stream_with_deadline(upstream, 1.5, timeout=5)
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert json.loads(events[0])["choices"][0]["delta"]["content"]  # the upstream's first event, relayed
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "deadline" in error["message"]
    assert events[-1] == "[DONE]"
    assert elapsed < 2.5


async def test_a_stream_that_never_starts_ends_by_the_deadline_with_504(upstream):
    upstream.delay_s = 5  # nothing, not even the status line, for 5 s
    response, elapsed = await stream_with_deadline(upstream, 1, timeout=10)
    error = assert_openai_error(response, 504)
    assert "deadline" in error["message"] and elapsed < 2.5
    assert upstream.calls == 1


async def test_an_upstream_error_before_the_stream_starts_keeps_its_status(upstream):
    upstream.script("500", "500", "500", "500")
    with ponder(upstream) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert_openai_error(response, 502)
    assert upstream.calls == 4


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_upstream_connection_closes_within_2s_of_the_client_leaving(upstream, stream):
    upstream.set_faults(stall=1.0)
    with ponder(upstream) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        left = time.monotonic()
        while upstream.stalls[0].closed is None and time.monotonic() - left < 5:
            await asyncio.sleep(0.02)
        assert upstream.stalls[0].closed is not None and upstream.stalls[0].closed - left < 2
        await asyncio.sleep(0.1)
        backend = served.backend
        assert backend.endpoints[0].in_flight == 0
        assert backend._slots._value == backend.config.max_concurrency


async def test_no_slot_leaks_when_the_asgi_server_raises_from_send(monkeypatch):
    """An ASGI 2.4 server raises OSError from ``send`` once the client is gone; Starlette then
    abandons the response body unstarted. The upstream stream, opened before the response,
    must still be closed and its slot released."""
    # pytest keeps logged tracebacks (and so the abandoned generators) alive; a server does not
    monkeypatch.setattr(logging.getLogger("ponder.api"), "disabled", True)
    with FaultyBackend(seed=1) as upstream:
        app = create_app(Settings(backend_urls=upstream.url, model=MODEL, backend_max_concurrency=4))
        async with app.router.lifespan_context(app):
            backend = app.state.runtime.backend
            body = json.dumps({**CHAT, "stream": True}).encode()
            for _ in range(6):  # more than the 4 slots: a leak would block the 5th
                received = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive() -> dict[str, Any]:
                    if received:
                        return received.pop()
                    await asyncio.sleep(3600)

                async def send(message: dict[str, Any]) -> None:
                    raise OSError("client disconnected")

                scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                         "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
                         "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
                try:
                    await asyncio.wait_for(app(scope, receive, send), 5)
                except (OSError, ClientDisconnect):
                    pass  # the app re-raises the disconnect once it has failed to send its 500
                gc.collect()
                await asyncio.sleep(0.05)
            assert backend._slots._value == 4
            assert backend.endpoints[0].in_flight == 0
            deadline = time.monotonic() + 2
            while upstream.open_connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert upstream.calls == 6
