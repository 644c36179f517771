"""The real embedded engine: its settings compared, and ponder in front of it vs the engine directly.

Two modes (wrap either in ``flock /tmp/ponder-engine.lock``: one engine per machine):

``--configs A,B,...`` starts the embedded engine once per named setting (:data:`CONFIGS`),
one after the other in this one run, and for each prints

1. start time (the first configuration pays any compile, later ones may hit the cache);
2. generated tokens/s for 8 chat prompts x n=4 x 64 tokens sent concurrently (``ignore_eos``);
3. one n=1 chat request's latency for 64 tokens, and its ms per token;
4. the engine's memory: PSS summed over its process tree (RSS counts shared pages once per
   process), after the load;

and, once, this machine's memory bandwidth (numpy: a sum reads, a copy reads and writes) and
one thread's matmul GFLOP/s, and the bounds they set: a decode step of B sequences reads every
weight once and does 2 x parameters x B FLOPs, so it produces at most
min(B x bandwidth / weight-bytes, GFLOP/s / (2 x parameters)) tokens/s.

Without ``--configs`` it starts the engine with the defaults (or uses ``--engine-url``) and
``ponder serve`` in front of it, interleaving direct and proxied calls so drift hits both:
generation tokens/s for the same 8 x n=4 load, and p50/p95 of small sequential requests.

    .venv/bin/python -m loadtests.bench_engine --configs vllm-defaults,tuned,compiled
    .venv/bin/python -m loadtests.bench_engine [--engine-url URL] [--requests 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtests.harness import background_cores, tree_pids
from service.config import Settings
from service.engine import EmbeddedEngine, compute_dtype, free_port
from service.model_prep import prepared_model_dir

PROMPTS = [
    "Tell me a story about a dragon.", "What is the best way to learn a language?",
    "Describe the year 2050.", "Give me a recipe for pancakes.", "Describe a mountain.",
    "Explain what 7+6 is.", "Write a diary entry about today.", "List three laws of physics.",
]
N, MAX_TOKENS = 4, 64

# Engine settings compared by --configs: environment and extra vLLM arguments, each on
# top of ponder's defaults (service.engine: float32 without native bf16, --enforce-eager,
# ENGINE_ENV_DEFAULTS). "" unsets a default.
_VLLM_PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "", "VLLM_CPU_OMP_THREADS_BIND": "",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": ""}  # unset: vLLM's worker process, one thread per spare core
CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    # What ponder ran before tuning = vLLM's own choices: bf16, torch.compile (inductor) with
    # vLLM's and torch's default cache places, KV cache = --gpu-memory-utilization of RAM,
    # one OMP thread with the other core reserved.
    "vllm-defaults": ({"VLLM_CPU_KVCACHE_SPACE": "", "VLLM_CACHE_ROOT": str(Path.home() / ".cache" / "vllm"),
                       "TORCHINDUCTOR_CACHE_DIR": f"/tmp/torchinductor_{getpass.getuser()}", **_VLLM_PROCESSES},
                      ["--dtype", "bfloat16", "--no-enforce-eager"]),
    "tuned": ({}, []),
    "bf16": ({}, ["--dtype", "bfloat16"]),
    "compiled": ({}, ["--no-enforce-eager"]),
    # ponder's defaults before the model runner moved into the engine-core process: a worker
    # process fed through busy-polled shared memory, one OMP thread, the other core reserved.
    "1-thread-mp": (dict(_VLLM_PROCESSES), []),
    "2-threads-mp": ({"VLLM_ENABLE_V1_MULTIPROCESSING": ""}, []),
    "seqs-32": ({}, ["--max-num-seqs", "32"]),
}


def chat(prompt: str, model: str, n: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "n": n, "max_tokens": MAX_TOKENS,
            "temperature": 0.8, "ignore_eos": True}


async def throughput(client: httpx.AsyncClient, base: str, model: str) -> tuple[float, int, float]:
    """8 chat prompts x n=4 x 64 tokens at once: (tokens/s, tokens, wall s)."""
    async def one(prompt: str) -> int:
        response = await client.post(base + "/v1/chat/completions", json=chat(prompt, model, N))
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in PROMPTS)))
    wall = time.perf_counter() - started
    return tokens / wall, tokens, wall


async def single_latency(client: httpx.AsyncClient, base: str, model: str) -> tuple[float, int]:
    """One n=1 chat request of 64 tokens alone: (seconds, tokens)."""
    started = time.perf_counter()
    response = await client.post(base + "/v1/chat/completions", json=chat(PROMPTS[0], model, 1))
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]


async def latency(client: httpx.AsyncClient, base: str, model: str) -> float:
    started = time.perf_counter()
    response = await client.post(base + "/v1/completions", json={
        "model": model, "prompt": "2+3=5\n4+4=", "max_tokens": 1, "temperature": 0})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its descendants, MiB (shared pages split)."""
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    return total


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s, copy GB/s counting read + write), best of ``repeats``, one thread."""
    import numpy as np

    a = np.ones(megabytes * 2**20 // 8)
    b = np.empty_like(a)
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return max(read), max(copy)


def matmul_gflops(dtype_name: str, size: int = 1024, repeats: int = 5) -> float:
    """Best GFLOP/s of a square torch matmul on one thread (the engine's worker uses one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dtype = getattr(torch, dtype_name)
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(threads)


async def compare_configs(names: list[str], rounds: int) -> None:
    settings = Settings()
    weights = prepared_model_dir(settings.embedded_recipe, settings.model_cache_dir) / "model.safetensors"
    bf16_gb = weights.stat().st_size / 1e9  # the prepared weights are bf16 on disk
    read_gbs, copy_gbs = memory_bandwidth_gbs()
    print(f"model {settings.engine_model_name}: {bf16_gb * 1000:.0f} MB of bf16 weights ({2 * bf16_gb * 1000:.0f} MB "
          "in float32), all read once per decode step")
    print(f"memory bandwidth (numpy, 1 thread): read {read_gbs:.1f} GB/s, copy {copy_gbs:.1f} GB/s (read+write)")
    params = bf16_gb * 1e9 / 2
    batch = len(PROMPTS) * N
    bounds = {}
    for dtype, gb in (("bfloat16", bf16_gb), ("float32", 2 * bf16_gb)):
        gflops = matmul_gflops(dtype)
        # a decode step of B sequences reads every weight once and does 2 x params x B FLOPs
        bounds[dtype] = min(read_gbs / gb * batch, gflops * 1e9 / (2 * params))
        print(f"bound ({dtype}): memory {read_gbs / gb:.0f} decode steps/s -> n=1 >= {1000 * gb / read_gbs:.1f} "
              f"ms/token; matmul {gflops:.0f} GFLOP/s (1 thread) -> <= {gflops * 1e9 / (2 * params):.0f} tokens/s; "
              f"{batch} sequences <= {bounds[dtype]:.0f} tokens/s")
    rows = []
    for name in names:
        env, args = CONFIGS[name]
        dtype = args[args.index("--dtype") + 1] if "--dtype" in args else compute_dtype()
        config = settings.model_copy(update={"engine_extra_args": " ".join([settings.engine_extra_args, *args])})
        engine = EmbeddedEngine(config, log_path=Path(f"/tmp/ponder-bench-engine-{name}.log"), env=env)
        started = time.monotonic()
        await engine.start()
        start_s = time.monotonic() - started
        try:
            async with httpx.AsyncClient(timeout=900) as client:
                await single_latency(client, engine.url, engine.model_name)  # warm-up
                load = background_cores()
                runs = [await throughput(client, engine.url, engine.model_name) for _ in range(rounds)]
                single = [await single_latency(client, engine.url, engine.model_name) for _ in range(rounds)]
            pss = tree_pss_mb(engine._process.pid)
        finally:
            await engine.stop()
        tps = statistics.median(r[0] for r in runs)
        lat_s, lat_tokens = min(single)
        rows.append((name, start_s, tps, tps / bounds[dtype], lat_s, lat_tokens, pss, load))
        print(f"\n[{name}] env={env} args={args} dtype={dtype}")
        print(f"  start {start_s:.0f}s; other load before measuring: {load:.2f} cores")
        for t, tokens, wall in runs:
            print(f"  8 chats x n=4 x 64: {t:6.1f} tok/s ({tokens} tokens in {wall:.1f}s)")
        for s, tokens in single:
            print(f"  n=1 x 64: {s * 1000:6.0f} ms ({s * 1000 / tokens:.1f} ms/token)")
        print(f"  engine PSS {pss:.0f} MiB")
    print("\n| config | start s | tok/s (8x4x64) | share of bound | n=1 64 tok ms | ms/token | PSS MiB | other load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, start_s, tps, share, lat_s, lat_tokens, pss, load in rows:
        print(f"| {name} | {start_s:.0f} | {tps:.1f} | {share:.3f} | "
              f"{lat_s * 1000:.0f} | {lat_s * 1000 / lat_tokens:.1f} | {pss:.0f} | {load:.2f} |")
    base = rows[0]
    for row in rows[1:]:
        print(f"{row[0]} / {base[0]}: tokens/s x{row[2] / base[2]:.2f}, n=1 latency x{row[4] / base[4]:.2f}, "
              f"PSS x{row[6] / base[6]:.2f}")


async def ponder_vs_direct(args: argparse.Namespace) -> None:
    settings = Settings()
    engine = None
    if args.engine_url:
        engine_url, model = args.engine_url.rstrip("/"), settings.engine_model_name
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
            print("\n8 chat prompts x n=4, 64 tokens each, concurrent:")
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", help=f"compare engine settings, comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--engine-url")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
        asyncio.run(compare_configs(names, args.rounds))
    else:
        asyncio.run(ponder_vs_direct(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    main()
