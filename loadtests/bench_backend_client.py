"""What one backend call costs ponder's process, by HTTP client, on the fan-out pattern
strategies use (checklist-bon sends N×K = 32 judgments at once): ponder's ``HTTPBackend`` as
``ponder serve`` builds it (on aiohttp again since issue #15; its own HTTP/1.1 client
``service/http1.py`` from ``2f01474`` until then) against a bare aiohttp session and the httpx
set-ups it replaced.

Starts the mock backend (ttft 20 ms, tpot 2 ms) in a subprocess on a free loopback port, then
in this process, for each client: ``--rounds`` fan-outs of ``--width`` concurrent 1-token
requests (the judge prompt), one after the other. Reports CPU ms per call (this process's
``time.process_time``), the wall time of one fan-out, and how long dispatching the fan-out took
as the mock saw it (first to last request start, from ``loadtests.recording_mock``'s log).

    .venv/bin/python -m loadtests.bench_backend_client [--width 32] [--rounds 40]

Clients:

* ``ponder``: ``service.backends.HTTPBackend`` as ``ponder serve`` builds it: one aiohttp
  session, with its routing, retries, retry budget, concurrency limit and body checks.
* ``aiohttp``: one bare ``aiohttp.ClientSession`` (``TCPConnector(limit=256)``): ponder's backend
  from ``342cd71`` to ``bb972d1``, and the floor for ponder's own bookkeeping on it.
* ``httpx-pool256``: one ``httpx.AsyncClient`` with 256 connections (ponder's backend up to
  ``b3cf86f``), whose pool scans every pooled connection each time a request takes or returns one.
* ``httpx-sharded``: 8 ``httpx.AsyncClient`` of 32 connections each, a call on the least busy
  (ponder's backend from ``722ef72`` to ``5dab907``).
* ``httpx2``: one pool of 256 on pydantic's ``httpx2`` fork (same API), whose pool no longer
  rescans per request (pydantic/httpx2 #974, #1075, #1076; upstream encode/httpcore #1035 is
  still open). ``openai`` pulls it into the venv; without it the client is skipped with a note.

The other clients build the same request bodies (``HTTPBackend.request_body``) and parse the
replies the same way (``parse_generation``), without ponder's routing or retries.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from types import ModuleType
from typing import Any, Callable

import httpx

from loadtests import harness
from service.backends import BackendConfig, HTTPBackend, parse_generation
from strategies.protocol import Generation, GenerationRequest

JUDGE = ("Instruction:\nWhat is 6 times 7?\n\nResponse:\nThe answer is 42.\n\nQuestion about the response: "
         "Does the response state a single final answer?\nAnswer YES or NO.\n\nAnswer:")


def judge_requests(width: int) -> list[GenerationRequest]:
    return [GenerationRequest(messages=({"role": "user", "content": JUDGE + f" #{i}"},), model=harness.MODEL,
                              temperature=0.0, max_tokens=3) for i in range(width)]


def ponder_backend(url: str) -> HTTPBackend:
    return HTTPBackend(BackendConfig(urls=[url], default_model=harness.MODEL))


class HTTPXPools:
    """``pools`` clients of ``module`` (``httpx`` or a fork with its API), ``per_pool`` connections
    each; every call goes through the least busy one."""

    def __init__(self, module: ModuleType, url: str, *, pools: int = 1, per_pool: int = 256) -> None:
        limits = module.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self.clients = [module.AsyncClient(limits=limits, timeout=30) for _ in range(pools)]
        self.busy = [0] * pools
        self.url = url + "/v1/chat/completions"
        self.bodies = ponder_backend(url)  # only its request_body: it never opens a connection

    async def one(self, request: GenerationRequest) -> Generation:
        i = min(range(len(self.clients)), key=self.busy.__getitem__)
        self.busy[i] += 1
        try:
            response = await self.clients[i].post(self.url, json=await self.bodies.request_body(request))
            return parse_generation(response.json(), chat=True)
        finally:
            self.busy[i] -= 1

    async def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        return await asyncio.gather(*(self.one(r) for r in requests))

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


async def bench(make: Callable[[], Any], mock_url: str, width: int, rounds: int) -> dict[str, float]:
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
    return {"cpu_ms_per_call": cpu * 1000 / (rounds * width), "fanout_wall_ms_p50": statistics.median(walls) * 1000,
            "dispatch_spread_ms_p50": statistics.median(spreads) * 1000}


class AiohttpSession(HTTPXPools):
    """One ``aiohttp.ClientSession`` of 256 connections (same bodies and parsing)."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, limit_per_host=0))
        self.url = url + "/v1/chat/completions"
        self.bodies = ponder_backend(url)

    async def one(self, request: GenerationRequest) -> Generation:
        async with self.session.post(self.url, json=await self.bodies.request_body(request)) as response:
            return parse_generation(await response.json(), chat=True)

    async def aclose(self) -> None:
        await self.session.close()


def clients(mock_url: str) -> dict[str, Callable[[], Any]]:
    makers: dict[str, Callable[[], Any]] = {
        "ponder": lambda: ponder_backend(mock_url),
        "httpx-pool256": lambda: HTTPXPools(httpx, mock_url),
        "httpx-sharded": lambda: HTTPXPools(httpx, mock_url, pools=8, per_pool=32),
    }
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        print(f"aiohttp skipped: {exc}", flush=True)
    else:
        makers["aiohttp"] = lambda: AiohttpSession(mock_url)
    try:
        import httpx2
    except ImportError as exc:
        print(f"httpx2 skipped: {exc}", flush=True)
    else:
        makers["httpx2"] = lambda: HTTPXPools(httpx2, mock_url)
    return makers


async def run(mock_url: str, width: int, rounds: int) -> None:
    for name, make in clients(mock_url).items():
        r = await bench(make, mock_url, width, rounds)
        print(f"{name:14s} CPU {r['cpu_ms_per_call']:.3f} ms/call, fan-out of {width}: "
              f"wall {r['fanout_wall_ms_p50']:.1f} ms, dispatch spread {r['dispatch_spread_ms_p50']:.1f} ms", flush=True)


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
