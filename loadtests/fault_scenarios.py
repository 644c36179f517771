"""Fault scenarios, measured: ponder in front of the fault-injecting backend (tests/faulty_backend.py).

    .venv/bin/python -m loadtests.fault_scenarios [--requests 20] [--concurrency 4] [--seed 1] [--out DIR]

Per scenario a fresh ``FaultyBackend`` (faults drawn at random with a seeded RNG, healthy answers
with the load-test mock's content) and a fresh ponder app (default settings, in this process,
over real HTTP on loopback), then ``--requests`` requests at ``--concurrency`` with a 30 s client
timeout (the set-up of issue 14's measurements). Printed and written (``fault_scenarios.json``
and ``.md``): the status histogram, the share of >= 400 bodies in the OpenAI error schema, the
share of 200 bodies that are complete chat completions, p50/p99 latency, backend calls per
request (generation requests the backend saw / client requests) and, for strategies, the failed
calls the runs carried on without (``trace["failed_calls"]``); and the retries the backend
client's retry budget refused.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from loadtests import harness
from service.app import create_app
from service.config import Settings
from tests.faulty_backend import FaultyBackend
from tests.servers import ServedApp

MODEL = "mock-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about cats."}], "max_tokens": 32}

SCENARIOS: list[tuple[str, dict[str, float], dict[str, Any]]] = [
    ("pass-through, 30% 500", {"500": 0.3}, {}),
    ("pass-through, 30% 429", {"429": 0.3}, {}),
    ("pass-through, 30% 503", {"503": 0.3}, {}),
    ("pass-through, 30% reset", {"reset": 0.3}, {}),
    ("pass-through, 20% truncated JSON", {"truncated": 0.2}, {}),
    ("pass-through, 100% 429", {"429": 1.0}, {}),
    ("pass-through, 30% stall (deadline 3 s)", {"stall": 0.3}, {"budget": {"deadline_s": 3}}),
    ("best-of-n n=4, 30% 500", {"500": 0.3}, {"strategy": "best-of-n", "strategy_params": {"n": 4}, "cache": False}),
    ("checklist-bon n=4, 30% 500", {"500": 0.3},
     {"strategy": "checklist-bon", "strategy_params": {"n": 4}, "cache": False}),
    ("best-of-n n=4, 30% mixed", {"500": 0.1, "503": 0.05, "429": 0.05, "reset": 0.05, "truncated": 0.05},
     {"strategy": "best-of-n", "strategy_params": {"n": 4}, "cache": False}),
]


def openai_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)
            and isinstance(error["message"], str) and bool(error["message"]))


def chat_completion(body: Any) -> bool:
    try:
        return bool(body["choices"][0]["message"]["content"]) and body["usage"]["total_tokens"] >= 0
    except (KeyError, IndexError, TypeError):
        return False


async def run_scenario(faults: dict[str, float], extra: dict[str, Any], *, requests: int, concurrency: int,
                       seed: int) -> dict[str, Any]:
    with FaultyBackend(faults=faults, seed=seed, stall_s=30) as upstream:
        app = create_app(Settings(backend_urls=upstream.url, model=MODEL))
        with ServedApp(app, name="ponder") as served:
            limit = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
                async def one() -> tuple[int | str, float, Any, dict[str, str]]:
                    async with limit:
                        started = time.perf_counter()
                        try:
                            response = await client.post("/v1/chat/completions", json={**CHAT, **extra})
                        except httpx.HTTPError as exc:
                            return type(exc).__name__, time.perf_counter() - started, None, {}
                        try:
                            body = response.json()
                        except ValueError:
                            body = None
                        return response.status_code, time.perf_counter() - started, body, dict(response.headers)

                results = await asyncio.gather(*(one() for _ in range(requests)))
            calls = upstream.calls
            refused = app.state.runtime.backend.retry_budget.refused
    statuses = Counter(str(status) for status, _, _, _ in results)
    errors = [(body, headers) for status, _, body, headers in results if isinstance(status, int) and status >= 400]
    oks = [body for status, _, body, _ in results if status == 200]
    failed_calls = sum(len(run["trace"].get("failed_calls", [])) for body in oks if isinstance(body, dict)
                       for run in body.get("ponder", {}).get("runs", []))
    latencies = [elapsed for _, elapsed, _, _ in results]
    return {
        "statuses": dict(sorted(statuses.items())),
        "errors_in_schema": f"{sum(openai_error(b) for b, _ in errors)}/{len(errors)}",
        "retry_after_on_429": f"{sum('retry-after' in h for s, _, _, h in results if s == 429)}/"
                              f"{sum(1 for s, _, _, _ in results if s == 429)}",
        "complete_200": f"{sum(chat_completion(b) for b in oks)}/{len(oks)}",
        "p50_s": round(harness.percentile(latencies, 0.5), 3),
        "p99_s": round(harness.percentile(latencies, 0.99), 3),
        "backend_calls_per_request": round(calls / requests, 2),
        "failed_calls_carried_on": failed_calls,
        "retries_refused_by_budget": refused,
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Fault scenarios ({meta['source']}, {meta['requests']} requests per scenario, concurrency "
             f"{meta['concurrency']}, seed {meta['seed']})", "",
             "| scenario | statuses | >=400 in schema | 429 with Retry-After | complete 200 | p50 s | p99 s "
             "| backend calls / request | failed calls carried on | retries refused by the budget |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        lines.append(f"| {row['scenario']} | {statuses} | {row['errors_in_schema']} | {row['retry_after_on_429']} "
                     f"| {row['complete_200']} | {row['p50_s']} | {row['p99_s']} "
                     f"| {row['backend_calls_per_request']} | {row['failed_calls_carried_on']} "
                     f"| {row['retries_refused_by_budget']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default=None, help="run the scenarios whose name contains this")
    harness.add_run_args(parser)
    args = parser.parse_args(argv)
    rows = []
    for name, faults, extra in SCENARIOS:
        if args.only and args.only not in name:
            continue
        row = asyncio.run(run_scenario(faults, extra, requests=args.requests, concurrency=args.concurrency,
                                       seed=args.seed))
        rows.append({"scenario": name, **row})
        print(f"{name}: {row}", flush=True)
    meta = {"source": harness.source_version(), "requests": args.requests, "concurrency": args.concurrency,
            "seed": args.seed}
    text = markdown(rows, meta)
    print("\n" + text)
    out = harness.report_dir(args.out, "faults")
    harness.write_report(out, "fault_scenarios", {"meta": meta, "rows": rows}, text)
    print(f"wrote {out / 'fault_scenarios.md'}")


if __name__ == "__main__":
    main()
