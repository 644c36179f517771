"""What one backend call costs ponder's process, by HTTP client: ponder's ``HTTPBackend`` as it
is (up to ``b3cf86f`` one ``httpx.AsyncClient`` pool of ``PONDER_BACKEND_MAX_CONCURRENCY`` = 256;
since ``722ef72`` several small pools, the least busy first) against alternatives, on the fan-out pattern strategies use (checklist-bon sends N×K = 32 judgments
at once).

Starts the mock backend (ttft 20 ms, tpot 2 ms) in a subprocess on a free loopback port, then
in this process, for each client: ``--rounds`` fan-outs of ``--width`` concurrent 1-token
requests (the judge prompt), one after the other. Reports CPU ms per call (this process's
``time.process_time``), the wall time of one fan-out, and how long dispatching the fan-out took
as the mock saw it (first to last request start, from ``loadtests.recording_mock``'s log).

    .venv/bin/python -m loadtests.bench_backend_client [--width 32] [--rounds 40]

Clients:

* ``ponder``: ``service.backends.HTTPBackend`` as ``ponder serve`` builds it.
* ``httpx-pool32``: the same class with ``max_concurrency=32``.
* ``httpx-sharded``: 8 ``httpx.AsyncClient`` of 32 connections each, a call picks the least busy.
* ``httpx2``: ``HTTPBackend`` with its clients replaced by one pydantic ``httpx2`` pool of 256
  (``httpx2`` is in the venv already, pulled in by ``openai``), whose pool fixes the per-request rescans (pydantic/httpx2 #974,
  #1075, #1076; upstream encode/httpcore #1035 is still open).
* ``aiohttp``: one ``aiohttp.ClientSession`` (``TCPConnector(limit=256)``), same request bodies
  (``HTTPBackend.request_body``) and the same response parsing (``parse_generation``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any, Callable

import httpx

from loadtests import harness
from service.backends import BackendConfig, HTTPBackend, parse_generation
from strategies.protocol import GenerationRequest

JUDGE = ("Instruction:\nWhat is 6 times 7?\n\nResponse:\nThe answer is 42.\n\nQuestion about the response: "
         "Does the response state a single final answer?\nAnswer YES or NO.\n\nAnswer:")


def judge_requests(width: int) -> list[GenerationRequest]:
    return [GenerationRequest(messages=({"role": "user", "content": JUDGE + f" #{i}"},), model=harness.MODEL,
                              temperature=0.0, max_tokens=3) for i in range(width)]


class ShardedHTTPX:
    def __init__(self, url: str, shards: int = 8, per_shard: int = 32) -> None:
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self.clients = [httpx.AsyncClient(limits=limits, timeout=30) for _ in range(shards)]
        self.busy = [0] * shards
        self.url = url
        self.helper = HTTPBackend(BackendConfig(urls=[url], default_model=harness.MODEL))

    async def one(self, request: GenerationRequest):
        i = min(range(len(self.clients)), key=self.busy.__getitem__)
        self.busy[i] += 1
        try:
            body = await self.helper.request_body(request)
            response = await self.clients[i].post(self.url + "/v1/chat/completions", json=body)
            return parse_generation(response.json(), chat=True)
        finally:
            self.busy[i] -= 1

    async def generate(self, requests):
        return await asyncio.gather(*(self.one(r) for r in requests))

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()
        await self.helper.aclose()


def with_httpx2(backend: HTTPBackend) -> HTTPBackend:
    """ponder's HTTPBackend with its client swapped for pydantic's ``httpx2`` fork (same API; its
    connection pool no longer rescans every connection per request)."""
    import httpx2

    limits = httpx2.Limits(max_connections=backend.config.max_concurrency,
                           max_keepalive_connections=backend.config.max_concurrency)
    old = backend.clients
    backend.clients = [httpx2.AsyncClient(timeout=backend.config.read_timeout, limits=limits)]
    backend._client_load = [0]
    for client in old:
        asyncio.get_event_loop().create_task(client.aclose())
    return backend


class AiohttpGenerator:
    def __init__(self, url: str) -> None:
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                             timeout=aiohttp.ClientTimeout(total=30))
        self.helper = HTTPBackend(BackendConfig(urls=[url], default_model=harness.MODEL))

    async def one(self, request: GenerationRequest):
        body = await self.helper.request_body(request)
        async with self.session.post(self.url + "/v1/chat/completions", data=json.dumps(body),
                                     headers={"content-type": "application/json"}) as response:
            data = json.loads(await response.read())
        return parse_generation(data, chat=True)

    async def generate(self, requests):
        return await asyncio.gather(*(self.one(r) for r in requests))

    async def aclose(self) -> None:
        await self.session.close()
        await self.helper.aclose()


async def bench(name: str, make: Callable[[], Any], mock_url: str, width: int, rounds: int) -> dict[str, Any]:
    client = make()
    requests = judge_requests(width)
    try:
        for _ in range(3):  # warm-up: open the connections
            await client.generate(requests)
        walls, spreads = [], []
        cpu = 0.0
        for _ in range(rounds):
            await asyncio.to_thread(harness.mock_reset, mock_url)
            c0, t0 = time.process_time(), time.perf_counter()
            generations = await client.generate(requests)
            walls.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
            assert len(generations) == width
            log = (await asyncio.to_thread(harness.mock_stats, mock_url))["log"]
            starts = [e["start"] for e in log]
            spreads.append(max(starts) - min(starts))
    finally:
        await client.aclose()
    return {"client": name, "cpu_ms_per_call": cpu * 1000 / (rounds * width),
            "fanout_wall_ms_p50": statistics.median(walls) * 1000,
            "dispatch_spread_ms_p50": statistics.median(spreads) * 1000}


async def run(mock_url: str, width: int, rounds: int) -> list[dict[str, Any]]:
    makers: dict[str, Callable[[], Any]] = {
        "ponder": lambda: HTTPBackend(BackendConfig(urls=[mock_url], default_model=harness.MODEL)),
        "httpx-pool32": lambda: HTTPBackend(BackendConfig(urls=[mock_url], default_model=harness.MODEL,
                                                          max_concurrency=32)),
        "httpx-sharded": lambda: ShardedHTTPX(mock_url),
        "httpx2": lambda: with_httpx2(HTTPBackend(BackendConfig(urls=[mock_url], default_model=harness.MODEL))),
        "aiohttp": lambda: AiohttpGenerator(mock_url),
    }
    results = []
    for name, make in makers.items():
        r = await bench(name, make, mock_url, width, rounds)
        print(f"{name:14s} CPU {r['cpu_ms_per_call']:.3f} ms/call, fan-out of {width}: wall {r['fanout_wall_ms_p50']:.1f} ms, "
              f"dispatch spread {r['dispatch_spread_ms_p50']:.1f} ms", flush=True)
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    print(f"background load {harness.background_cores():.2f} cores", flush=True)
    with harness.mock_server(recording=True) as mock:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        runner(run(mock.url, args.width, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
