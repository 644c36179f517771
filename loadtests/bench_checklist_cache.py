"""Benchmark: what the Redis result cache saves on a repeated checklist-bon /v1/solve.

Starts the mock vLLM backend (``loadtests.mock_backend``, timing model: ttft 20 ms, tpot 2 ms
by default) and a ponder app whose cache is a ``RedisCache`` on ``--url`` (a private key
namespace, deleted afterwards), both on loopback in this process, then sends the same
checklist-bon request twice and prints, per request, the backend calls the mock saw, ponder's
usage (backend calls, cache hits/misses) and the wall time.

Two scenarios:

* ``sampled`` (candidate temperature 0.8, the default): the repeat gets new candidates, so
  only the checklist is reused; its judgments are new work.
* ``greedy`` (candidate temperature 0): the mock answers greedily, the repeat draws the same
  candidates, and the checklist and every judgment come from Redis.

Run from the repository root: ``python -m loadtests.bench_checklist_cache [--url URL] [--n 8] [--repeat 5]``.
Each scenario is repeated with ``--repeat`` fresh instructions; medians are printed. The mock's
sampled answers have little entropy, so even "sampled" repeats can share a few candidates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import redis.asyncio as aioredis
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.mock_backend import MockBackend, MockConfig, create_app as create_mock  # noqa: E402
from service.app import create_app  # noqa: E402
from service.cache import RedisCache  # noqa: E402
from service.config import Settings  # noqa: E402
from service.runtime import Runtime  # noqa: E402


@contextlib.asynccontextmanager
async def serve(app: Any, *, lifespan: str = "on") -> AsyncIterator[str]:
    """Serve an ASGI app in this loop on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, loop="asyncio", lifespan=lifespan, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server did not start")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


async def solve_twice(client: httpx.AsyncClient, ponder: str, mock: MockBackend, *, n: int,
                      temperature: float) -> list[dict[str, Any]]:
    instruction = (f"Explain in two sentences why the sky is blue, for a ten-year-old. "
                   f"(bench {uuid.uuid4().hex[:8]})")
    body = {"task": {"messages": [{"role": "user", "content": instruction}]}, "strategy": "checklist-bon",
            "params": {"n": n, "temperature": temperature}}
    rows = []
    for attempt in ("first", "second"):
        before = mock.requests_total
        started = time.perf_counter()
        response = await client.post(ponder + "/v1/solve", json=body)
        wall_ms = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        usage = response.json()["usage"]
        rows.append({"run": attempt, "mock_calls": mock.requests_total - before, "wall_ms": wall_ms,
                     "items": len(response.json()["trace"]["checklist"]), **usage})
    return rows


async def main(args: argparse.Namespace) -> None:
    namespace = f"bench-{uuid.uuid4().hex}"
    mock = create_mock(MockConfig(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms, tokens=args.tokens))
    async with serve(mock) as mock_url:
        settings = Settings(backend_urls=mock_url, redis_url=args.url, model=mock.config.model)
        runtime = await Runtime.start(settings)
        await runtime.cache.aclose()  # the same store build_cache makes, under a namespace of our own
        runtime.cache = RedisCache(
            args.url, settings.cache_ttls(), socket_timeout=settings.redis_socket_timeout_s,
            lock_ms=settings.redis_lock_ms, lock_wait_s=settings.redis_lock_wait_s,
            breaker_failures=settings.redis_breaker_failures, breaker_reset_s=settings.redis_breaker_reset_s,
            namespace=namespace,
        )
        try:
            async with serve(create_app(runtime=runtime)) as ponder, httpx.AsyncClient(timeout=60) as client:
                # Warm the connections (ponder -> mock, ponder -> Redis, client -> ponder) off the clock.
                await client.post(ponder + "/v1/solve", json={"task": {"prompt": "warm up"}, "strategy": "none"})
                await runtime.cache.get("checklist", "warmup")
                print(f"mock backend: ttft {args.ttft_ms} ms, tpot {args.tpot_ms} ms, {args.tokens} tokens/answer; "
                      f"Redis {args.url}; checklist-bon n={args.n}")
                header = f"{'scenario':9s} {'run':6s} {'mock calls':>10s} {'backend_calls':>13s} " \
                         f"{'hits':>5s} {'misses':>6s} {'items':>5s} {'wall ms':>8s}"
                print(header)
                print("-" * len(header))
                for scenario, temperature in (("sampled", 0.8), ("greedy", 0.0)):
                    pairs = [await solve_twice(client, ponder, mock, n=args.n, temperature=temperature)
                             for _ in range(args.repeat)]
                    for index, run in enumerate(("first", "second")):
                        rows = [pair[index] for pair in pairs]
                        med = {key: statistics.median(row[key] for row in rows)
                               for key in ("mock_calls", "backend_calls", "cache_hits", "cache_misses", "items",
                                           "wall_ms")}
                        print(f"{scenario:9s} {run:6s} {med['mock_calls']:10g} {med['backend_calls']:13g} "
                              f"{med['cache_hits']:5g} {med['cache_misses']:6g} {med['items']:5g} "
                              f"{med['wall_ms']:8.1f}")
                print(f"(medians over {args.repeat} fresh instructions per scenario; 'hits' include judgments of "
                      "identical candidates within one run, collapsed by single-flight)")
        finally:
            await runtime.stop()
            async with aioredis.Redis.from_url(args.url) as client:
                names = [key async for key in client.scan_iter(f"{namespace}:*")]
                if names:
                    await client.delete(*names)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=8, help="candidates per request")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--tpot-ms", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=32, help="words per normal answer")
    parser.add_argument("--repeat", type=int, default=5, help="fresh instructions per scenario (medians printed)")
    asyncio.run(main(parser.parse_args()))
