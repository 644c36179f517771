"""Scale-out through vLLM's own router (PyPI ``vllm-router``, Rust), on loopback: ponder ->
vllm-router (cache-aware policy) -> two mock backends (tests/faulty_backend.py, which also
answer the router's ``/tokenize`` and ``/render`` calls). Requests of one strategy run that
share a prefix land on one backend (its prefix cache stays warm); with one backend killed
mid-run no request fails."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from tests.conftest import free_port
from tests.faulty_backend import GENERATION_PATHS, FaultyBackend
from tests.servers import ServedApp

ROUTER = Path(sys.executable).parent / "vllm-router"
MODEL = "mock-model"

pytestmark = pytest.mark.skipif(not ROUTER.exists(), reason=f"vllm-router is not installed ({ROUTER} missing)")


@pytest.fixture
def workers() -> Iterator[tuple[FaultyBackend, FaultyBackend]]:
    with FaultyBackend(seed=1, delay_s=0.02) as a, FaultyBackend(seed=2, delay_s=0.02) as b:
        yield a, b


@pytest.fixture
def router(workers, tmp_path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "router.log").open("w")
    proc = subprocess.Popen([str(ROUTER), "--host", "127.0.0.1", "--port", str(port),
                             "--worker-urls", *(w.url for w in workers), "--policy", "cache_aware",
                             "--health-check-interval-secs", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vllm-router did not start: {(tmp_path / 'router.log').read_text()[-2000:]}")
        time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def ponder(router) -> Iterator[ServedApp]:
    with ServedApp(create_app(Settings(backend_urls=router, model=MODEL)), name="ponder") as served:
        yield served


def generations_with(worker: FaultyBackend, text: str) -> int:
    return sum(1 for r in worker.requests if r.path in GENERATION_PATHS and text in json.dumps(r.body))


async def test_same_prefix_requests_of_a_strategy_run_land_on_one_backend(workers, ponder):
    a, b = workers
    spread = []
    async with httpx.AsyncClient(base_url=ponder.url, timeout=30) as client:
        for i in range(4):
            task = f"Task {i}: explain, step by step, why the number {i * 7919} is or is not prime. " * 4
            response = await client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": task}], "max_tokens": 32,
                "strategy": "best-of-n", "strategy_params": {"n": 4}, "cache": False})
            assert response.status_code == 200, response.text
            spread.append((generations_with(a, task[:40]), generations_with(b, task[:40])))
    print("\n[router] generation requests per run on backend a / b:", spread)
    for on_a, on_b in spread:
        assert on_a + on_b >= 2  # the samples and the ratings
        assert on_a == 0 or on_b == 0  # every request of the run on one backend


async def test_a_backend_killed_mid_run_fails_no_request(workers, ponder):
    a, b = workers
    limit = asyncio.Semaphore(4)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 16,
                                "messages": [{"role": "user", "content": f"Question {i}: what is {i} times 7?"}]}
        if i % 5 == 0:
            body |= {"strategy": "best-of-n", "strategy_params": {"n": 2}, "cache": False}
        async with limit:
            return (await client.post("/v1/chat/completions", json=body)).status_code

    async with httpx.AsyncClient(base_url=ponder.url, timeout=60) as client:
        requests = [asyncio.create_task(one(client, i)) for i in range(60)]
        while a.calls + b.calls < 20:
            await asyncio.sleep(0.01)
        killed_after = a.calls
        a.stop()  # its listening socket and every open connection go at once
        statuses = await asyncio.gather(*requests)
    print(f"\n[router] backend a killed after {killed_after} calls; calls a {a.calls}, b {b.calls}; "
          f"statuses {dict((s, statuses.count(s)) for s in set(statuses))}")
    assert statuses == [200] * 60
    assert b.calls > 0 and killed_after > 0
