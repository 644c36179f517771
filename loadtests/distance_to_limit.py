"""Distance to the limit: how close each strategy's wall time at concurrency 1 comes to the
time its algorithm needs on the backend.

Starts the recording mock backend (``loadtests.recording_mock``: the mock plus a request log at
``/stats``; ttft 20 ms, tpot 2 ms, 32-token answers) and ``ponder serve`` in front of it, then
sends each strategy's request ``--runs`` times, one at a time (cache off, so every run pays for
its whole algorithm), and for every run reads the mock's log to find the **sequential backend
rounds** (the longest chain of backend requests each of which started after the previous one
ended) and the mock's own time along that chain.

Two floors, two ratios (medians over the runs):

* ``wall / floor`` — the brief's definition: floor = algorithmic rounds × one mock round trip,
  where one round trip is the median latency of calling the mock directly with the task's own
  request (a full 32-token answer) from this script. Rounds: none 1, self-consistency 1,
  best-of-n 2 (the n samples in one request, then all ratings), checklist-bon 2 (checklist ∥
  samples, then all judgments), self-refine and MCTS as counted from the mock's log (checked
  against the trace: self-refine 1 draft + 1 feedback per version + 1 refine per round; MCTS
  2 + 3 per simulation in refine mode).
* ``wall / exact`` — exact floor = the mock's own service time along the critical path + one
  direct HTTP round-trip overhead (direct latency − the mock's service time) per round. This is
  what a zero-overhead client issuing the same requests in the same order would take: the
  difference is ponder's own time (HTTP in and out, parsing, scheduling, strategy code).
  Short judge/score replies (1–2 tokens) make a round shorter than a full answer, which is why
  ``wall / floor`` can be below 1 while ``wall / exact`` cannot.

    .venv/bin/python -m loadtests.distance_to_limit [--runs 12] [--surfaces proxy,rest]
        [--strategies best-of-n,mcts] [--out DIR]

Writes ``distance.json`` and ``distance.md`` into ``--out`` (default
``loadtests/reports/<timestamp>-distance``), with the source version measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import httpx

from loadtests import harness
from loadtests.recording_mock import critical_path

STRATEGIES = ["none", "self-consistency", "best-of-n", "checklist-bon", "self-refine", "mcts"]
# The reply kind of the judgments that strategies with a judging round fan out all at once.
JUDGE_KIND = {"best-of-n": "score", "checklist-bon": "yesno"}


def algorithmic_rounds(strategy: str, params: dict[str, Any], trace: dict[str, Any]) -> int | None:
    """The sequential rounds the algorithm needs, from its parameters and trace."""
    if strategy in ("none", "self-consistency"):
        return 1
    if strategy == "best-of-n":
        return 2  # the n samples in one request, then every distinct candidate's rating at once
    if strategy == "checklist-bon":
        return 2 + (2 if params.get("refine") else 0)
    if strategy == "self-refine":
        chains = trace.get("chains") or [[]]
        # Each chain: draft (shared round) + one feedback per version + one refine per later version;
        # a refine that changed nothing ends the chain after its (uncounted) feedback-free check.
        longest = 0
        for history in chains:
            versions = len(history)
            rounds = 1 + versions + (versions - 1)
            if history and history[-1].get("stop") == "no change":
                rounds += 1  # the refine that produced no change still ran
            longest = max(longest, rounds)
        return longest
    if strategy == "mcts":
        sims = params.get("simulations", 4)
        return 2 + 3 * sims  # draft, root value, then critique -> rewrites -> values per simulation
    return None


def phases(strategy: str, params: dict[str, Any], log: list[dict[str, Any]]) -> list[list[dict[str, Any]]] | None:
    """The backend requests of one run grouped into the algorithm's rounds, where the mock's log
    alone cannot tell (a wide fan-out); None: the critical path of the log is the answer."""
    if strategy in JUDGE_KIND and not params.get("refine"):
        # best-of-n: the n samples, then one rating per candidate; checklist-bon: the samples and
        # the checklist concurrently, then all N x K judgments.
        first = [e for e in log if e["kind"] != JUDGE_KIND[strategy]]
        judges = [e for e in log if e["kind"] == JUDGE_KIND[strategy]]
        return [g for g in (first, judges) if g]
    return None


def direct_round_trip(mock_url: str, runs: int) -> dict[str, float]:
    latencies, service = [], []
    with httpx.Client(timeout=30) as client:
        for i in range(runs + 3):
            harness.mock_reset(mock_url)
            t0 = time.perf_counter()
            client.post(mock_url + "/v1/chat/completions", json=harness.direct_body()).raise_for_status()
            wall = time.perf_counter() - t0
            log = harness.mock_stats(mock_url)["log"]
            if i >= 3:  # warm-up
                latencies.append(wall)
                service.append(log[0]["service_s"])
    rtt, svc = statistics.median(latencies), statistics.median(service)
    return {"rtt_ms": rtt * 1000, "service_ms": svc * 1000, "http_overhead_ms": (rtt - svc) * 1000}


def measure(ponder_url: str, mock_url: str, surface: str, strategy: str, runs: int,
            direct: dict[str, float]) -> dict[str, Any]:
    params = harness.DEFAULT_PARAMS[strategy]
    if surface == "proxy":
        path, body = "/v1/chat/completions", harness.proxy_body(strategy, params)
    else:
        path, body = "/v1/solve", harness.rest_body(strategy, params)
    rows = []
    with httpx.Client(timeout=120) as client:
        for i in range(runs + 2):
            harness.mock_reset(mock_url)
            t0 = time.perf_counter()
            response = client.post(ponder_url + path, json=body)
            wall = time.perf_counter() - t0
            response.raise_for_status()
            data = response.json()
            if i < 2:  # warm-up
                continue
            if surface == "proxy":
                run = (data.get("ponder") or {"runs": [{"usage": {}, "trace": {}}]})["runs"][0]
            else:
                run = data
            trace, usage = run.get("trace") or {}, run.get("usage") or {}
            log = harness.mock_stats(mock_url)["log"]
            rounds, chain_s, chain = critical_path(log)
            algo = algorithmic_rounds(strategy, params, trace)
            floor_ms = (algo or rounds) * direct["rtt_ms"]
            groups = phases(strategy, params, log)
            spread_ms = None
            if groups is not None:
                # A wide fan-out whose requests do not all start before the first ones end shows
                # up as a chain in the log: count the algorithm's rounds, not the chain.
                exact_ms = sum(max(e["service_s"] for e in g) * 1000 for g in groups) \
                    + len(groups) * direct["http_overhead_ms"]
                widest = max(groups, key=len)
                spread_ms = (max(e["start"] for e in widest) - min(e["start"] for e in widest)) * 1000
                exact_rounds = len(groups)
            else:
                exact_ms = chain_s * 1000 + rounds * direct["http_overhead_ms"]
                exact_rounds = rounds
            rows.append({
                "exact_rounds": exact_rounds,
                "fanout_dispatch_spread_ms": spread_ms,
                "wall_ms": wall * 1000,
                "ponder_wall_ms": usage.get("wall_ms"),
                "backend_calls": len(log),
                "rounds_observed": rounds,
                "rounds_algorithmic": algo,
                "critical_path_mock_ms": chain_s * 1000,
                "floor_ms": floor_ms,
                "exact_floor_ms": exact_ms,
                "wall_over_floor": wall * 1000 / floor_ms,
                "wall_over_exact": wall * 1000 / exact_ms,
                "overhead_ms": wall * 1000 - exact_ms,
                "overhead_per_round_ms": (wall * 1000 - exact_ms) / max(exact_rounds, 1),
                "chain_kinds": [f"{e['kind']}x{e['n']}" for e in chain],
            })

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {
        "surface": surface, "strategy": strategy, "params": params, "runs": len(rows),
        "wall_ms_p50": med("wall_ms"),
        "backend_calls_p50": med("backend_calls"),
        "rounds_observed": sorted({r["rounds_observed"] for r in rows}),
        "rounds_algorithmic": sorted({r["rounds_algorithmic"] for r in rows if r["rounds_algorithmic"] is not None}),
        "rounds_match": all(r["exact_rounds"] == r["rounds_algorithmic"] for r in rows),
        "floor_ms_p50": med("floor_ms"),
        "exact_floor_ms_p50": med("exact_floor_ms"),
        "wall_over_floor_p50": med("wall_over_floor"),
        "wall_over_exact_p50": med("wall_over_exact"),
        "overhead_ms_p50": med("overhead_ms"),
        "overhead_per_round_ms_p50": med("overhead_per_round_ms"),
        "fanout_dispatch_spread_ms_p50": (statistics.median(r["fanout_dispatch_spread_ms"] for r in rows)
                                          if rows and rows[0]["fanout_dispatch_spread_ms"] is not None else None),
        "example_chain": rows[0]["chain_kinds"] if rows else [],
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    d = result["direct"]
    lines = [
        f"# Distance to the limit — {result['started']} (source {result.get('source', 'unknown')})", "",
        f"Mock: ttft {harness.MOCK_TIMING['ttft_ms']:g} ms, tpot {harness.MOCK_TIMING['tpot_ms']:g} ms, "
        f"{harness.MOCK_TIMING['tokens']}-token answers. One direct mock round trip (full answer): "
        f"{d['rtt_ms']:.1f} ms, of which the mock's own time {d['service_ms']:.1f} ms and HTTP "
        f"{d['http_overhead_ms']:.2f} ms. Concurrency 1, cache off, {result['runs']} runs per row (medians). "
        f"Background CPU load while measuring: {result.get('background_cores', float('nan')):.2f} cores.", "",
        "| surface | strategy | params | backend calls | rounds (observed / algorithmic) | wall ms | floor ms "
        "| **wall/floor** | exact floor ms | **wall/exact** | ponder overhead ms (per round) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['surface']} | {r['strategy']} | `{json.dumps(r['params'])}` | {r['backend_calls_p50']:.0f} "
            f"| {'/'.join(map(str, r['rounds_observed']))} / {'/'.join(map(str, r['rounds_algorithmic']))} "
            f"| {r['wall_ms_p50']:.1f} | {r['floor_ms_p50']:.1f} | **{r['wall_over_floor_p50']:.3f}** "
            f"| {r['exact_floor_ms_p50']:.1f} | **{r['wall_over_exact_p50']:.3f}** "
            f"| {r['overhead_ms_p50']:.1f} ({r['overhead_per_round_ms_p50']:.2f}) |")
    for r in result["results"]:
        if r.get("fanout_dispatch_spread_ms_p50") is None:
            continue
        note = (f"{r['surface']} {r['strategy']}: the widest fan-out (the judgments) reached the mock over "
                f"{r['fanout_dispatch_spread_ms_p50']:.1f} ms from first to last request (median)")
        if max(r["rounds_observed"]) > max(r["rounds_algorithmic"]):
            note += (f"; the log's longest chain of non-overlapping requests has "
                     f"{'/'.join(map(str, r['rounds_observed']))} links because late judgments start after early "
                     f"ones have finished — the algorithm's rounds are {'/'.join(map(str, r['rounds_algorithmic']))}")
        lines += ["", note + "."]
    lines += ["", "Critical paths (reply kind × n, in order):", ""]
    for r in result["results"]:
        lines.append(f"- {r['surface']} {r['strategy']}: {' → '.join(r['example_chain'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--surfaces", default="proxy,rest")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    harness.add_run_args(parser)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    out_dir = harness.report_dir(args.out, "distance")
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "source": harness.source_version(),
                              "runs": args.runs, "mock": harness.MOCK_TIMING, "results": []}
    result["background_cores"] = harness.wait_quiet(0.3, args.wait_quiet)
    with harness.mock_server(recording=True, log_dir=out_dir) as mock, \
            harness.ponder_server(mock.url, log_dir=out_dir) as ponder:
        result["direct"] = direct_round_trip(mock.url, max(args.runs, 20))
        print(f"direct round trip {result['direct']['rtt_ms']:.1f} ms", flush=True)
        for surface in args.surfaces.split(","):
            for strategy in args.strategies.split(","):
                r = measure(ponder.url, mock.url, surface, strategy, args.runs, result["direct"])
                result["results"].append(r)
                print(f"{surface:5s} {strategy:17s} calls {r['backend_calls_p50']:4.0f} rounds {r['rounds_observed']} "
                      f"wall {r['wall_ms_p50']:7.1f} ms  wall/floor {r['wall_over_floor_p50']:.3f}  "
                      f"wall/exact {r['wall_over_exact_p50']:.3f}  overhead/round {r['overhead_per_round_ms_p50']:.2f} ms",
                      flush=True)
    result["background_cores_after"] = harness.background_cores()
    harness.write_report(out_dir, "distance", result, markdown(result))
    print(f"wrote {out_dir}/distance.json, distance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
