"""The whole performance benchmark in one run, and every target figure in one table.

Runs, one after the other, into one folder (``loadtests/reports/<timestamp>-benchmark``):

1. ``loadtests.run_load``          locust step load per strategy and surface  -> ``load/``
2. ``loadtests.distance_to_limit`` wall time vs the backend rounds, 1 user    -> ``distance/``
3. ``loadtests.compare_optillm``   side by side with optillm 0.4.0            -> ``optillm/``
4. ``loadtests.service_cost``      ponder CPU per request, RSS at 64 users    -> ``cost/``

then writes ``summary.md`` and ``summary.json``: each target, the measured figure, met or not,
under the source version measured (the commit, and whether ``service/`` or ``strategies/``
differ from it). About 17 minutes on a 2-core machine.

    .venv/bin/python -m loadtests.benchmark [--quick] [--wait-quiet 600] [--out DIR]

``--quick`` shortens every step (for a smoke test; the figures are then rough).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadtests import compare_optillm, distance_to_limit, harness, run_load, service_cost


def targets(out: Path) -> list[dict[str, Any]]:
    load = json.loads((out / "load" / "report.json").read_text())
    dist = json.loads((out / "distance" / "distance.json").read_text())
    comp = json.loads((out / "optillm" / "compare.json").read_text())
    cost = json.loads((out / "cost" / "service_cost.json").read_text())
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: float | None, op: str, bound: float, detail: str = "") -> None:
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        rows.append({"figure": figure, "value": value, "target": f"{op} {bound:g}", "met": met, "detail": detail})

    def step(name: str, users: int) -> dict[str, Any] | None:
        return next((s for s in load["scenarios"].get(name, {}).get("steps", []) if s["users"] == users), None)

    d1, p1 = step("DirectMock", 1), step("ProxyPassthrough", 1)
    if d1 and p1:
        add("pass-through p50 ÷ mock direct p50, 1 user (locust)", p1["p50_ms"] / d1["p50_ms"], "<=", 1.05,
            f"{p1['p50_ms']:.1f} vs {d1['p50_ms']:.1f} ms")
    top = max(load["config"]["steps"])
    dt, pt = step("DirectMock", top), step("ProxyPassthrough", top)
    if dt and pt:
        add(f"pass-through throughput ÷ mock direct, {top} users (locust)", pt["rps"] / max(dt["rps"], 1e-9), ">=", 0.9,
            f"{pt['rps']:.0f} vs {dt['rps']:.0f} req/s")
    for r in dist["results"]:
        add(f"{r['surface']} {r['strategy']}: wall ÷ floor, 1 user", r["wall_over_floor_p50"], "<=", 1.15,
            f"{r['wall_ms_p50']:.1f} ms vs {r['floor_ms_p50']:.1f} ms ({'/'.join(map(str, r['rounds_algorithmic']))} "
            f"rounds); wall ÷ exact floor {r['wall_over_exact_p50']:.3f}")
    for pair in comp["pairs"]:
        for key, e in pair["metrics"].items():
            if "target" in e:
                op, bound = e["target"].split()
                add(f"{pair['pair']}: {key} ponder ÷ optillm", e["ratio"], op, float(bound),
                    f"{e['ponder']:.1f} vs {e['optillm']:.1f}" if e["ponder"] is not None and e["optillm"] is not None
                    else "no data")
    for r in cost["cpu"]:
        if r["strategy"] != "none":
            add(f"ponder CPU ms per {r['strategy']} request", r["cpu_ms_per_request"], "<=", 5.0,
                f"{r['backend_calls_per_request']:g} backend calls, {r['cpu_ms_per_backend_call']:.3f} ms each")
    for r in cost["rss"]:
        add(f"ponder RSS MB at 64 concurrent, {r['strategy']}", r["rss_peak_mb"], "<=", 300.0)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# ponder benchmark — {meta['started']} (source {meta.get('source', 'unknown')})", "",
             f"Mock timing {json.dumps(harness.MOCK_TIMING)}; other load on the machine before each part: "
             + ", ".join(f"{k} {v:.2f} cores" for k, v in meta["background"].items()) + ".", "",
             "| figure | measured | target | met | detail |", "|---|---:|---|---|---|"]
    for r in rows:
        value = "–" if r["value"] is None else f"{r['value']:.3f}"
        met = "–" if r["met"] is None else ("✅" if r["met"] else "❌")
        lines.append(f"| {r['figure']} | {value} | {r['target']} | {met} | {r['detail']} |")
    met = sum(1 for r in rows if r["met"])
    lines += ["", f"{met} of {len(rows)} targets met."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--summarize-only", action="store_true",
                        help="only (re)write summary.md/json from the parts already in --out")
    harness.add_run_args(parser)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    out = harness.report_dir(args.out, "benchmark")
    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "background": {},
                            "source": harness.source_version()}
    if args.summarize_only:
        return summarize(out, meta)
    quiet = ["--wait-quiet", str(args.wait_quiet)]
    step = "3" if args.quick else "6"
    drain = ["--drain", "0.5"] if args.quick else []
    run_load.main(["--out", str(out / "load"), "--step-seconds", step, *drain, *quiet])
    distance_to_limit.main(["--out", str(out / "distance"), "--runs", "4" if args.quick else "12", *quiet])
    compare_optillm.main(["--out", str(out / "optillm"), "--step-seconds", "3" if args.quick else "7", *drain, *quiet])
    service_cost.main(["--out", str(out / "cost"), "--scale", "0.3" if args.quick else "1", *quiet])
    return summarize(out, meta)


def summarize(out: Path, meta: dict[str, Any]) -> int:
    for part, name in (("load", "report.json"), ("distance", "distance.json"), ("optillm", "compare.json"),
                       ("cost", "service_cost.json")):
        meta["background"][part] = json.loads((out / part / name).read_text()).get("background_cores", float("nan"))
    rows = targets(out)
    harness.write_report(out, "summary", {"meta": meta, "targets": rows}, markdown(rows, meta))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
