"""Overload: a flood of async runs next to one pass-through client (issue 13's scenario).

Starts the mock backend (``harness.MOCK_TIMING``: one simulated GPU whose per-token time grows
with the sequences it serves) and ``ponder serve``, each a subprocess on a free loopback port.
Per setting of ``PONDER_MAX_CONCURRENT_RUNS`` (``--max-runs``; no API keys, so the per-key
bound does not apply):

1. unloaded: the victim, one client sending ``--victim`` sequential pass-through chat requests;
2. flood: 300 ``POST /v1/runs`` (MCTS, ponder's defaults: each run lasts seconds) at once, then
   ``--flood-workers``
   clients keep posting runs (a 429 is retried after 50 ms, ignoring ``Retry-After``: a client
   that does not back off) while the victim sends the same requests again.

It prints and writes, per setting: the burst's accepted / refused counts, the sustained flood's
accepted / refused counts, the victim's p50 / p99 unloaded and under the flood, and the ratio
loaded / unloaded (p50 and p99), all measured in this one run.

    .venv/bin/python -m loadtests.overload [--max-runs 8,32,100000] [--victim 30] [--out DIR]

``100000`` stands for "no bound" (the behaviour before admission control). Writes
``overload.json`` and ``overload.md`` into ``--out`` (default ``loadtests/reports/<timestamp>-overload``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import httpx

from loadtests import harness

RUN_BODY = harness.rest_body("mcts")  # ponder's defaults: about 14 sequential rounds, seconds per run
BURST = 300


async def victim(url: str, count: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = await client.post(url + "/v1/chat/completions", json=harness.direct_body())
            if response.status_code != 200:
                raise RuntimeError(f"victim request failed: {response.status_code} {response.text[:300]}")
            latencies.append(time.perf_counter() - started)
    return latencies


async def burst(client: httpx.AsyncClient, url: str) -> dict[str, int]:
    replies = await asyncio.gather(*(client.post(url + "/v1/runs", json=RUN_BODY) for _ in range(BURST)))
    codes = [r.status_code for r in replies]
    return {"accepted": codes.count(202), "refused": codes.count(429), "other": len(codes) - codes.count(202)
            - codes.count(429)}


async def flood_and_victim(url: str, workers: int, victim_requests: int) -> dict[str, Any]:
    counts = {"accepted": 0, "refused": 0, "other": 0}
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=BURST + workers, max_keepalive_connections=BURST + workers)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        first = await burst(client, url)
        burst_s = time.perf_counter() - started

        async def flood() -> None:
            while not done.is_set():
                status = (await client.post(url + "/v1/runs", json=RUN_BODY)).status_code
                key = {202: "accepted", 429: "refused"}.get(status, "other")
                counts[key] += 1
                if status != 202:
                    await asyncio.sleep(0.05)

        flooders = [asyncio.create_task(flood()) for _ in range(workers)]
        try:
            latencies = await victim(url, victim_requests)
        finally:
            done.set()
            await asyncio.gather(*flooders, return_exceptions=True)
    return {"burst": first, "burst_s": round(burst_s, 3), "sustained": counts, "latencies": latencies}


def measure(max_runs: int, args: argparse.Namespace, mock: harness.Server, out_dir) -> dict[str, Any]:
    env = {"PONDER_MAX_CONCURRENT_RUNS": str(max_runs)}
    with harness.ponder_server(mock.url, env=env, log_dir=out_dir) as ponder:
        asyncio.run(victim(ponder.url, 3))  # warm up connections and code paths
        unloaded = asyncio.run(victim(ponder.url, args.victim))
        loaded = asyncio.run(flood_and_victim(ponder.url, args.flood_workers, args.victim))
    harness.wait_idle(mock.url)
    base, under = harness.summarize(unloaded), harness.summarize(loaded.pop("latencies"))
    return {"max_runs": max_runs, **loaded, "victim_unloaded": base, "victim_loaded": under,
            "ratio_p50": round(under["p50_ms"] / base["p50_ms"], 2),
            "ratio_p99": round(under["p99_ms"] / base["p99_ms"], 2)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| max runs | burst accepted / refused | sustained accepted / refused | victim p50 unloaded → loaded "
             "(×) | victim p99 unloaded → loaded (×) |", "|---|---|---|---|---|"]
    for r in rows:
        b, s, u, l = r["burst"], r["sustained"], r["victim_unloaded"], r["victim_loaded"]
        lines.append(f"| {r['max_runs']} | {b['accepted']} / {b['refused']} | {s['accepted']} / {s['refused']} | "
                     f"{u['p50_ms']} → {l['p50_ms']} ms ({r['ratio_p50']}×) | "
                     f"{u['p99_ms']} → {l['p99_ms']} ms ({r['ratio_p99']}×) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-runs", default="8,16,32,64,100000", help="comma-separated PONDER_MAX_CONCURRENT_RUNS")
    parser.add_argument("--victim", type=int, default=30, help="sequential pass-through requests per phase")
    parser.add_argument("--flood-workers", type=int, default=16)
    harness.add_run_args(parser)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    out_dir = harness.report_dir(args.out, "overload")
    harness.wait_quiet(timeout_s=args.wait_quiet)
    rows = []
    with harness.mock_server(recording=False) as mock:
        for max_runs in (int(x) for x in args.max_runs.split(",")):
            rows.append(measure(max_runs, args, mock, out_dir))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    report = {"source": harness.source_version(), "mock_timing": harness.MOCK_TIMING, "run_body": RUN_BODY,
              "rows": rows}
    text = markdown(rows)
    harness.write_report(out_dir, "overload", report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
