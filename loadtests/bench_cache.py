"""Micro-benchmark: RedisCache get/put latency on loopback (p50/p99 over sequential ops).

Run from the repository root: ``python loadtests/bench_cache.py [--url URL] [--ops N]``.
Each op is awaited alone, so the numbers are per-call round trips including JSON
encoding, the breaker check and metrics, not throughput. Its keys are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.cache import RedisCache  # noqa: E402

VALUE = {"items": [f"check item {i}: the answer states its assumptions" for i in range(8)], "score": 0.83}


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p50 = ms[len(ms) // 2]
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{name:4s} n={len(ms)}  p50={p50:.3f} ms  p99={p99:.3f} ms  mean={statistics.fmean(ms):.3f} ms  max={ms[-1]:.3f} ms"


async def main(url: str, ops: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex}"
    cache = RedisCache(url, {"checklist": 300.0}, namespace=namespace)
    try:
        await cache.put("checklist", "warmup", VALUE)  # open the pooled connection
        puts, gets = [], []
        for i in range(ops):
            started = time.perf_counter()
            await cache.put("checklist", str(i), VALUE)
            puts.append(time.perf_counter() - started)
        for i in range(ops):
            started = time.perf_counter()
            value = await cache.get("checklist", str(i))
            gets.append(time.perf_counter() - started)
            assert value == VALUE, "benchmark read a miss: is Redis up?"
        print(f"RedisCache on {url}, value {len(str(VALUE))} chars, breaker {cache.breaker_state}")
        print(summary("put", puts))
        print(summary("get", gets))
    finally:
        await cache.aclose()
        async with aioredis.Redis.from_url(url) as client:
            names = [key async for key in client.scan_iter(f"{namespace}:*")]
            if names:
                await client.delete(*names)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.ops))
