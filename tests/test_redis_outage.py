"""Redis killed under load: ponder with a private redis-server as its cache, 8 concurrent
checklist-bon requests in flight when the server is killed; none fails (the cache turns every
Redis error into a miss). After a restart at the same address the breaker closes again and
the checklist is served from Redis again."""

from __future__ import annotations

import asyncio
import time

import httpx

from service.app import create_app
from service.config import Settings
from tests.conftest import free_port, start_redis_server, stop_redis_server
from tests.faulty_backend import FaultyBackend
from tests.servers import ServedApp

MODEL = "mock-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Write a haiku about rain."}], "max_tokens": 16,
        "strategy": "checklist-bon", "strategy_params": {"n": 2}}


async def solve(client: httpx.AsyncClient) -> dict:
    response = await client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    (run,) = response.json()["ponder"]["runs"]
    return run["usage"]


async def test_redis_killed_under_load_fails_no_request_and_hits_resume_after_a_restart() -> None:
    port = free_port()
    redis = start_redis_server(port)
    try:
        with FaultyBackend(seed=3, delay_s=0.15) as upstream:
            settings = Settings(backend_urls=upstream.url, model=MODEL, redis_url=f"redis://127.0.0.1:{port}/0",
                                redis_breaker_failures=2, redis_breaker_reset_s=0.3)
            with ServedApp(create_app(settings), name="ponder-redis") as served:
                async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
                    await solve(client)  # the checklist is now in Redis
                    assert (await solve(client))["cache_hits"] >= 1

                    in_flight = [asyncio.ensure_future(solve(client)) for _ in range(8)]
                    await asyncio.sleep(0.2)  # every request is past its first Redis read
                    stop_redis_server(redis)
                    usages = await asyncio.gather(*in_flight)  # none raised: all 200
                    assert len(usages) == 8
                    down = await solve(client)  # while Redis is down: a miss, no error
                    assert down["cache_hits"] == 0

                    redis = start_redis_server(port)  # empty (not persistent)
                    deadline = time.monotonic() + 10
                    while (usage := await solve(client))["cache_hits"] == 0:
                        assert time.monotonic() < deadline, "no cache hit within 10 s of the restart"
                        await asyncio.sleep(0.1)
                    assert usage["cache_hits"] >= 1
    finally:
        if redis.poll() is None:
            stop_redis_server(redis)
