"""ponder in front of the real engine vs the engine directly: throughput and added latency.

Starts the embedded vLLM CPU engine (or uses --engine-url) and `ponder serve` in front
of it, then measures, interleaving direct and proxied calls so drift hits both alike:

1. generation tokens/s for 8 prompts x n=4 sent concurrently (pass-through and `n` kept);
2. p50/p95 latency of small sequential requests (max_tokens=1), direct vs through ponder.

    .venv/bin/python -m loadtests.bench_engine [--engine-url URL] [--requests 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.config import Settings
from service.engine import EmbeddedEngine, free_port

PROMPTS = [
    "Once upon a time", "The best way to learn", "In the year 2050,", "My favourite recipe is",
    "The mountain was", "2+3=5\n4+4=8\n7+6=", "Dear diary, today", "The three laws of",
]


async def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{url} not ready")


async def throughput(client: httpx.AsyncClient, base: str, model: str) -> tuple[float, int, float]:
    async def one(prompt: str) -> int:
        response = await client.post(base + "/v1/completions", json={
            "model": model, "prompt": prompt, "n": 4, "max_tokens": 64, "temperature": 0.8, "ignore_eos": True})
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in PROMPTS)))
    wall = time.perf_counter() - started
    return tokens / wall, tokens, wall


async def latency(client: httpx.AsyncClient, base: str, model: str) -> float:
    started = time.perf_counter()
    response = await client.post(base + "/v1/completions", json={
        "model": model, "prompt": "2+3=5\n4+4=", "max_tokens": 1, "temperature": 0})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine-url")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    settings = Settings()
    engine = None
    if args.engine_url:
        engine_url, model = args.engine_url.rstrip("/"), settings.served_model_name
    else:
        engine = EmbeddedEngine(settings, log_path=Path("/tmp/ponder-bench-engine.log"))
        started = time.monotonic()
        await engine.start()
        print(f"engine start: {time.monotonic() - started:.0f}s")
        engine_url, model = engine.url, engine.model_name

    port = free_port()
    env = dict(os.environ, PONDER_BACKEND_URLS=engine_url, PONDER_BACKEND_SUPPORTS_SEED="false",
               PONDER_PORT=str(port), PONDER_LOG_LEVEL="warning", PONDER_MODEL=model)
    ponder = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env)
    ponder_url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(ponder_url)
        async with httpx.AsyncClient(timeout=300) as client:
            await latency(client, engine_url, model)  # warm both paths
            await latency(client, ponder_url, model)
            direct_tps, proxied_tps = [], []
            for _ in range(args.rounds):
                direct_tps.append(await throughput(client, engine_url, model))
                proxied_tps.append(await throughput(client, ponder_url, model))
            print("\n8 prompts x n=4, 64 tokens each, concurrent:")
            for name, runs in (("direct ", direct_tps), ("ponder ", proxied_tps)):
                for tps, tokens, wall in runs:
                    print(f"  {name} {tps:7.1f} tok/s  ({tokens} tokens in {wall:.2f}s)")
            ratio = statistics.median(t for t, _, _ in proxied_tps) / statistics.median(t for t, _, _ in direct_tps)
            print(f"  ponder/direct tokens/s (median): {ratio:.3f}")

            direct_ms, proxied_ms = [], []
            for _ in range(args.requests):
                direct_ms.append(await latency(client, engine_url, model))
                proxied_ms.append(await latency(client, ponder_url, model))
            d50, p50 = statistics.median(direct_ms), statistics.median(proxied_ms)
            print(f"\n{args.requests} sequential requests, max_tokens=1 (interleaved):")
            print(f"  direct  p50 {d50:.1f} ms  p95 {pct(direct_ms, .95):.1f} ms")
            print(f"  ponder  p50 {p50:.1f} ms  p95 {pct(proxied_ms, .95):.1f} ms")
            print(f"  added latency p50: {p50 - d50:.1f} ms  (ratio {p50 / d50:.3f})")
    finally:
        ponder.terminate()
        ponder.wait(10)
        if engine is not None:
            await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
