"""Service cost: CPU time of the ponder process per strategy request at steady load, and its
memory at 64 concurrent requests.

Starts the mock backend (``loadtests.mock_backend``: ttft 20 ms, tpot 2 ms, 32-token answers, so
requests overlap as they would in production) and ``ponder serve``, each a subprocess on a free
loopback port. Per strategy (OpenAI proxy surface, cache off):

1. CPU: ``--concurrency`` (default 8) closed-loop clients send a fixed number of requests;
   ponder's utime+stime from ``/proc/<pid>/stat`` before and after, ÷ requests = CPU ms per
   request, and ÷ backend calls (the mock's request counter) = CPU ms per backend call.
2. Memory: 64 closed-loop clients for ``--rss-seconds``; peak VmRSS of the ponder process,
   sampled every 0.1 s (and its RSS when idle, before any load).

With ``--py-spy`` every CPU measurement also runs ``py-spy record`` on ponder (non-blocking
sampling) and writes ``pyspy_<strategy>.txt`` (collapsed stacks) plus the top functions by own
and inclusive time into the report.

    .venv/bin/python -m loadtests.service_cost [--concurrency 8] [--py-spy] [--out DIR]

Writes ``service_cost.json`` and ``service_cost.md`` into ``--out`` (default
``loadtests/reports/<timestamp>-cost``), with the source version measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from loadtests import harness
from loadtests.harness import VENV_BIN

REQUESTS = {"none": 400, "self-consistency": 400, "best-of-n": 200, "checklist-bon": 120, "self-refine": 150,
            "mcts": 48}


def mock_calls(mock_url: str) -> int:
    text = httpx.get(mock_url + "/metrics", timeout=10).text
    match = re.search(r"^mock_requests_total (\d+)", text, re.M)
    return int(match.group(1)) if match else 0


def run_loop(url: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(harness.closed_loop(url, body, **kwargs))
    except ImportError:  # pragma: no cover
        return asyncio.run(harness.closed_loop(url, body, **kwargs))


def top_functions(collapsed: Path, limit: int = 15) -> dict[str, list[tuple[str, float]]]:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames and ("Condition.wait" in frames[-1] or "Queue.get" in frames[-1]):
            continue  # idle worker threads
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return {"own": [], "inclusive": []}
    return {"own": [(f, round(n / total, 4)) for f, n in own.most_common(limit)],
            "inclusive": [(f, round(n / total, 4)) for f, n in incl.most_common(limit * 3)]}


def measure_cpu(ponder: harness.Server, mock_url: str, strategy: str, requests: int, concurrency: int,
                out_dir: Path, py_spy: bool) -> dict[str, Any]:
    url = ponder.url + "/v1/chat/completions"
    body = harness.proxy_body(strategy)
    run_loop(url, body, concurrency=concurrency, requests=2 * concurrency)  # warm-up
    spy = None
    spy_path = out_dir / f"pyspy_{strategy}.txt"
    if py_spy:
        spy = subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--nonblocking", "-p", str(ponder.pid), "-r", "250",
                                "-f", "raw", "-o", str(spy_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    calls0, cpu0, t0 = mock_calls(mock_url), harness.cpu_seconds(ponder.pid), time.perf_counter()
    result = run_loop(url, body, concurrency=concurrency, requests=requests, timeout=120)
    cpu1, t1, calls1 = harness.cpu_seconds(ponder.pid), time.perf_counter(), mock_calls(mock_url)
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(30)
    done = len(result["latencies"])
    cpu, calls = cpu1 - cpu0, calls1 - calls0
    out = {
        "strategy": strategy, "params": harness.DEFAULT_PARAMS[strategy], "concurrency": concurrency,
        "requests": done, "errors": len(result["errors"]), "elapsed_s": round(t1 - t0, 2),
        "cpu_s": round(cpu, 3), "cpu_ms_per_request": round(cpu * 1000 / max(done, 1), 3),
        "backend_calls_per_request": round(calls / max(done, 1), 2),
        "cpu_ms_per_backend_call": round(cpu * 1000 / max(calls, 1), 3),
        "cpu_cores_busy": round(cpu / (t1 - t0), 3),
        **{k: v for k, v in harness.summarize(result["latencies"], result["elapsed"]).items() if k != "requests"},
    }
    if py_spy and spy_path.exists():
        out["py_spy"] = top_functions(spy_path)
    return out


def measure_rss(ponder: harness.Server, strategy: str, seconds: float) -> dict[str, Any]:
    peak = [harness.rss_mb(ponder.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(harness.rss_mb(ponder.pid))
            stop.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = run_loop(ponder.url + "/v1/chat/completions", harness.proxy_body(strategy), concurrency=64,
                          duration_s=seconds, timeout=120)
    finally:
        stop.set()
        thread.join()
    return {"strategy": strategy, "rss_peak_mb": round(max(peak), 1), "requests": len(result["latencies"]),
            "errors": len(result["errors"]), "rps": round(len(result["latencies"]) / result["elapsed"], 1)}


def markdown(report: dict[str, Any]) -> str:
    t = harness.MOCK_TIMING
    lines = [
        f"# ponder service cost — {report['started']} (source {report.get('source', 'unknown')})", "",
        f"Mock: ttft {t['ttft_ms']:g} ms, tpot {t['tpot_ms']:g} ms, {t['tokens']}-token answers. OpenAI proxy "
        f"surface, cache off, {report['concurrency']} concurrent clients for CPU, 64 for memory. Background CPU "
        f"load before the run: {report['background_cores']:.2f} cores. ponder RSS idle: {report['rss_idle_mb']:.0f} MB.",
        "",
        "| strategy | params | requests | backend calls/req | **ponder CPU ms/req** | CPU ms/backend call "
        "| cores busy | p50 ms | RSS peak @64 MB | req/s @64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rss = {r["strategy"]: r for r in report["rss"]}
    for r in report["cpu"]:
        m = rss.get(r["strategy"], {})
        lines.append(
            f"| {r['strategy']} | `{json.dumps(r['params'])}` | {r['requests']} | {r['backend_calls_per_request']:g} "
            f"| **{r['cpu_ms_per_request']:.2f}** | {r['cpu_ms_per_backend_call']:.3f} | {r['cpu_cores_busy']:.2f} "
            f"| {r['p50_ms']:.1f} | {m.get('rss_peak_mb', float('nan')):.0f} | {m.get('rps', float('nan')):.1f} |")
    spied = [r for r in report["cpu"] if r.get("py_spy")]
    for r in spied:
        lines += ["", f"### py-spy, {r['strategy']}: top functions by own time", ""]
        lines += [f"- {share:.1%} `{name}`" for name, share in r["py_spy"]["own"][:10]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--strategies", default=",".join(REQUESTS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the request counts")
    parser.add_argument("--rss-seconds", type=float, default=5.0)
    parser.add_argument("--py-spy", action="store_true")
    harness.add_run_args(parser)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    out_dir = harness.report_dir(args.out, "cost")
    strategies = args.strategies.split(",")
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "source": harness.source_version(),
                              "concurrency": args.concurrency, "mock": harness.MOCK_TIMING,
                              "background_cores": harness.wait_quiet(0.3, args.wait_quiet), "cpu": [], "rss": []}
    with harness.mock_server(recording=False, log_dir=out_dir) as mock, \
            harness.ponder_server(mock.url, log_dir=out_dir) as ponder:
        report["rss_idle_mb"] = harness.rss_mb(ponder.pid)
        for strategy in strategies:
            r = measure_cpu(ponder, mock.url, strategy, max(8, int(REQUESTS[strategy] * args.scale)),
                            args.concurrency, out_dir, args.py_spy)
            report["cpu"].append(r)
            print(f"{strategy:17s} {r['cpu_ms_per_request']:8.2f} ms CPU/request  {r['backend_calls_per_request']:5.1f} "
                  f"calls/request  {r['cpu_ms_per_backend_call']:.3f} ms/call  p50 {r['p50_ms']:.0f} ms  "
                  f"errors {r['errors']}", flush=True)
        for strategy in strategies:
            r = measure_rss(ponder, strategy, args.rss_seconds)
            report["rss"].append(r)
            print(f"{strategy:17s} RSS peak at 64 concurrent {r['rss_peak_mb']:.0f} MB ({r['rps']:.1f} req/s)", flush=True)
    harness.write_report(out_dir, "service_cost", report, markdown(report))
    print(f"wrote {out_dir}/service_cost.json, service_cost.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
