"""Benchmark the mock vLLM backend itself.

1. Throughput: start the mock with zero ttft/tpot in a subprocess on a free loopback port and
   hammer it from ``--procs`` client processes × ``--concurrency`` in-flight requests each
   (httpx.AsyncClient) for ``--duration`` seconds; print requests/s and p50/p99 latency.
2. Fidelity: start it with the default timing model and compare the latency of single
   sequential requests (and one batch of concurrent ones) with what the model predicts.

    python -m loadtests.bench_mock [--duration 10] [--procs 2] [--concurrency 64] [--stream] [--n 1]
        [--client httpx|raw|both] [--skip-fidelity]

The httpx client costs far more CPU per request than the mock, so on a small machine the httpx
figure measures httpx; the "raw" pass (a minimal asyncio HTTP/1.1 client) shows the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from loadtests.mock_backend import MockConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "What is 6 times 7? Think step by step."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def mock_process(*flags: str) -> Iterator[tuple[str, int]]:
    """Run ``python -m loadtests.mock_backend`` on a free port; yields (base URL, pid)."""
    port = free_port()
    cmd = [sys.executable, "-m", "loadtests.mock_backend", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mock exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mock did not become healthy")
            time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mock-model", "messages": PROMPT, "n": args.n, "max_tokens": 256}
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def _client_main(url: str, concurrency: int, duration: float, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    # One AsyncClient (one keep-alive connection) per worker: a single httpx pool shared by
    # 64 workers spends most of its time in pool bookkeeping (~200 req/s instead of ~1,900).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    latencies: list[float] = []
    errors = 0
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=30))
            for _ in range(concurrency)
        ]
        # Open the connections before the clock starts.
        await asyncio.gather(*(client.get("/health") for client in clients))
        started = time.perf_counter()
        stop_at = started + duration

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    if stream:
                        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                            async for _ in response.aiter_raw():
                                pass
                    else:
                        response = await client.post("/v1/chat/completions", json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker(client) for client in clients))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def _raw_request(url: str, body: dict[str, Any]) -> bytes:
    host = url.removeprefix("http://")
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _raw_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection, read the whole response; returns the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length is not None:
        await reader.readexactly(length)
    else:  # chunked (streaming)
        await reader.readuntil(b"\r\n0\r\n\r\n")
    return int(head[9:12])


async def _raw_client_main(url: str, concurrency: int, duration: float, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, to measure the server, not httpx."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = _raw_request(url, body)
    latencies: list[float] = []
    errors = 0
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    started = time.perf_counter()
    stop_at = started + duration

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        while (t0 := time.perf_counter()) < stop_at:
            if await _raw_exchange(reader, writer, request) == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        writer.close()

    await asyncio.gather(*(worker(r, w) for r, w in conns))
    return {"latencies": latencies, "errors": errors, "elapsed": time.perf_counter() - started}


def _client_process(
    client: str, url: str, concurrency: int, duration: float, body: dict[str, Any], stream: bool, out: Any
) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    main = _raw_client_main if client == "raw" else _client_main
    out.put(runner(main(url, concurrency, duration, body, stream)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def throughput(args: argparse.Namespace, client: str) -> None:
    with mock_process("--ttft-ms", "0", "--tpot-ms", "0", "--prefill-ms-per-1k-tokens", "0") as (url, pid):
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_client_process, args=(client, url, args.concurrency, args.duration, _body(args), args.stream, queue))
            for _ in range(args.procs)
        ]
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        for p in procs:
            p.start()
        results = [queue.get(timeout=args.duration + 60) for _ in procs]
        cpu1, wall1 = cpu_seconds(pid), time.perf_counter()
        for p in procs:
            p.join()
    latencies = [lat for r in results for lat in r["latencies"]]
    errors = sum(r["errors"] for r in results)
    rps = sum(len(r["latencies"]) / r["elapsed"] for r in results)
    mode = "stream" if args.stream else "non-stream"
    print(
        f"throughput [{client} client] ({mode}, n={args.n}, ttft=0, tpot=0, {args.procs} procs x {args.concurrency} conc, "
        f"{args.duration:.0f} s): {rps:,.0f} req/s, {len(latencies):,} ok, {errors} errors, "
        f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, p99 {percentile(latencies, 0.99) * 1000:.2f} ms"
    )
    if cpu0 is not None and cpu1 is not None:
        # The run includes client start-up (the server idles then), so this underestimates the load.
        busy = (cpu1 - cpu0) / (wall1 - wall0)
        served = len(latencies) / (wall1 - wall0)
        print(
            f"mock server CPU: {busy:.0%} of one core over the run -> ~{served / max(busy, 1e-9):,.0f} req/s "
            f"per core if the server were the bottleneck ({os.cpu_count()} cores shared with the clients)"
        )


async def _fidelity(url: str, config: MockConfig) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await client.get("/health")
        usage = (await client.post("/v1/chat/completions", json={"messages": PROMPT}))  # warm-up
        prompt_tokens = usage.json()["usage"]["prompt_tokens"]
        ttft = config.ttft_ms + config.prefill_ms_per_1k_tokens * prompt_tokens / 1000
        samples = []
        for _ in range(10):
            t0 = time.perf_counter()
            await client.post("/v1/chat/completions", json={"messages": PROMPT})
            samples.append((time.perf_counter() - t0) * 1000)
        expected = ttft + (config.tokens - 1) * config.tpot_ms
        print(
            f"single request (defaults: ttft={config.ttft_ms:g} ms, tpot={config.tpot_ms:g} ms, tokens={config.tokens}): "
            f"median {statistics.median(samples):.1f} ms (min {min(samples):.1f}, max {max(samples):.1f}); "
            f"model ttft + (tokens-1)*tpot = {expected:.1f} ms; ttft + tokens*tpot = {ttft + config.tokens * config.tpot_ms:.1f} ms"
        )

        firsts, totals = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/chat/completions", json={"messages": PROMPT, "stream": True}) as r:
                async for _ in r.aiter_raw():
                    if first is None:
                        first = time.perf_counter() - t0
            firsts.append(first * 1000)
            totals.append((time.perf_counter() - t0) * 1000)
        print(
            f"single streamed request: first chunk median {statistics.median(firsts):.1f} ms (model {ttft:.1f}), "
            f"total median {statistics.median(totals):.1f} ms (model {expected:.1f})"
        )

    # A batch of concurrent requests, sent with the raw client so that httpx's own CPU time
    # (~0.5 ms a request here) does not pile up into the measurement.
    batch = 64
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(batch)]
    request = _raw_request(url, {"messages": PROMPT})

    async def timed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        t0 = time.perf_counter()
        await _raw_exchange(reader, writer, request)
        return (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    latencies = await asyncio.gather(*(timed(r, w) for r, w in conns))
    elapsed = (time.perf_counter() - t0) * 1000
    for _, writer in conns:
        writer.close()
    worst_tpot = config.tpot_ms * (1 + config.batch_slope * (batch - 1))
    print(
        f"{batch} concurrent requests: fastest {min(latencies):.1f} ms, slowest {max(latencies):.1f} ms, "
        f"all done in {elapsed:.1f} ms (model: first admitted {ttft + (config.tokens - 1) * config.tpot_ms:.1f} ms, "
        f"last admitted, {batch} active: {ttft + (config.tokens - 1) * worst_tpot:.1f} ms)"
    )


def fidelity() -> None:
    config = MockConfig.from_env()  # what the subprocess will use too
    with mock_process() as (url, _):
        asyncio.run(_fidelity(url, config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--client", choices=["httpx", "raw", "both"], default="both", help="raw: minimal asyncio HTTP/1.1 client")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}", flush=True)
    for client in ("httpx", "raw") if args.client == "both" else (args.client,):
        throughput(args, client)
    if not args.skip_fidelity:
        fidelity()


if __name__ == "__main__":
    main()
