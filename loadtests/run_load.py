"""One command for the locust scenarios: step load per strategy and surface, with a report.

Starts the mock vLLM backend (``loadtests.mock_backend``: ttft 20 ms, tpot 2 ms, 32-token
answers, batch slope 0.01) and ``ponder serve`` in front of it, each a subprocess on a free
loopback port, then runs locust headless once per scenario (user class in
``loadtests/locustfile.py``) with a step load: ``--steps`` users (default 1, 4, 16, 64),
``--step-seconds`` each. Writes::

    loadtests/reports/<timestamp>/report.json          every figure below, machine-readable
    loadtests/reports/<timestamp>/report.md            the tables
    loadtests/reports/<timestamp>/latency_throughput.png
    loadtests/reports/<timestamp>/locust/<scenario>_*.csv   locust's own CSV stats

Per step it reports requests, throughput (completions/s), latency p50/p95/p99 of the requests
that started in the step after its first ``--warmup`` seconds and before its last ``--drain``
seconds (so they run under that step's load), how many of those had not finished when the step
ended (``unfinished``: the server is saturated), errors,
ponder's CPU (cores busy and CPU ms per request), ponder's peak RSS, and backend calls per
request (from the mock's request counter). The report records the source version measured
(commit, and whether ``service/`` or ``strategies/`` differ from it).

    .venv/bin/python -m loadtests.run_load                       # everything, ~6 min
    .venv/bin/python -m loadtests.run_load --scenarios DirectMock ProxyPassthrough --step-seconds 10
    .venv/bin/python -m loadtests.run_load --surfaces proxy --steps 1,16,64

Every server binds 127.0.0.1; every request goes there; every locust run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import harness
from loadtests.harness import ROOT, VENV_BIN, percentile

STRATEGIES = ["none", "self-consistency", "best-of-n", "checklist-bon", "self-refine", "mcts"]
SCENARIOS: dict[str, tuple[str, str]] = {  # user class -> (surface, strategy)
    "DirectMock": ("direct", "none"),
    "ProxyPassthrough": ("proxy", "none"),
    "RestNone": ("rest", "none"),
    "ProxySelfConsistency": ("proxy", "self-consistency"),
    "RestSelfConsistency": ("rest", "self-consistency"),
    "ProxyBestOfN": ("proxy", "best-of-n"),
    "RestBestOfN": ("rest", "best-of-n"),
    "ProxyChecklistBoN": ("proxy", "checklist-bon"),
    "RestChecklistBoN": ("rest", "checklist-bon"),
    "ProxySelfRefine": ("proxy", "self-refine"),
    "RestSelfRefine": ("rest", "self-refine"),
    "ProxyMCTS": ("proxy", "mcts"),
    "RestMCTS": ("rest", "mcts"),
}


class Sampler:
    """Samples CPU seconds and RSS of a few processes every ``interval`` seconds, in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        self.pids, self.interval = pids, interval
        self.rows: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        row: dict[str, float] = {"t": time.time()}
        # Everything else on the machine: all busy CPU minus this process and its children
        # (servers, locust), so each step can say how noisy the machine was while it ran.
        busy, _ = harness._busy_jiffies()
        row["other_cpu"] = busy / os.sysconf("SC_CLK_TCK") - harness.tree_cpu_seconds(os.getpid())
        for name, pid in self.pids.items():
            try:
                row[name + "_cpu"] = harness.tree_cpu_seconds(pid)
                row[name + "_rss"] = harness.tree_rss_mb(pid)
            except OSError:
                pass
        self.rows.append(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def window(self, name: str, t0: float, t1: float) -> dict[str, float]:
        rows = [r for r in self.rows if t0 <= r["t"] <= t1 and name + "_cpu" in r]
        if len(rows) < 2:
            return {}
        if name == "other":
            return {"cpu_cores": max(0.0, (rows[-1]["other_cpu"] - rows[0]["other_cpu"]) / (rows[-1]["t"] - rows[0]["t"]))}
        busy = (rows[-1][name + "_cpu"] - rows[0][name + "_cpu"]) / (rows[-1]["t"] - rows[0]["t"])
        return {"cpu_cores": busy, "cpu_s": rows[-1][name + "_cpu"] - rows[0][name + "_cpu"],
                "cpu_window_s": rows[-1]["t"] - rows[0]["t"], "rss_max_mb": max(r[name + "_rss"] for r in rows)}


def mock_requests_total(mock_url: str) -> int:
    text = httpx.get(mock_url + "/metrics", timeout=10).text
    match = re.search(r"^mock_requests_total (\d+)", text, re.M)
    return int(match.group(1)) if match else 0


def step_stats(record: dict[str, Any], step_seconds: float, warmup: float, drain: float) -> list[dict[str, Any]]:
    """Per step: latency of the requests that *started* in [start + warmup, end - drain) — each
    ran under that step's load as long as it ended by the step's end (later ones are counted as
    ``unfinished``: their latency is at least what is left of the step); throughput = requests
    completed in [start + warmup, end) per second."""
    out = []
    for t_start, users in record["transitions"]:
        lo, hi, t_end = t_start + warmup, t_start + step_seconds - drain, t_start + step_seconds
        started = [s for s in record["samples"] if lo <= s[0] < hi]
        within = [s for s in started if s[0] + s[1] / 1000 <= t_end]
        ok = [s[1] for s in within if s[2]]
        errors = sum(1 for s in started if not s[2])
        finished = [s for s in record["samples"] if s[2] and lo <= s[0] + s[1] / 1000 < t_end]
        out.append({
            "users": users,
            "window": [lo, t_end],
            "requests": len(ok),
            "unfinished": len(started) - len(within),
            "errors": errors,
            "rps": round(len(finished) / max(t_end - lo, 1e-9), 2),
            "p50_ms": round(percentile(ok, 0.50), 1),
            "p95_ms": round(percentile(ok, 0.95), 1),
            "p99_ms": round(percentile(ok, 0.99), 1),
            "completed_in_window": len(finished),
        })
    return out


def attach_resources(stats: list[dict[str, Any]], sampler: Sampler, names: list[str]) -> None:
    """Add each process's CPU (cores busy, CPU ms per completed request) and peak RSS over
    every step's window to that step's stats (and drop the window)."""
    for s in stats:
        lo, hi = s.pop("window")
        other = sampler.window("other", lo, hi)
        if other:
            s["other_load_cores"] = round(other["cpu_cores"], 2)
        for proc in names:
            w = sampler.window(proc, lo, hi)
            if not w:
                continue
            s[f"{proc}_cpu_cores"] = round(w["cpu_cores"], 3)
            s[f"{proc}_rss_max_mb"] = round(w["rss_max_mb"], 1)
            if s["completed_in_window"]:
                s[f"{proc}_cpu_ms_per_req"] = round(w["cpu_cores"] * 1000 / max(s["rps"], 1e-9), 3)


def run_scenario(cls: str, *, ponder_url: str, mock_url: str, steps: list[int], step_seconds: float,
                 out_dir: Path, extra_env: dict[str, str] | None = None, host: str | None = None,
                 label: str | None = None, tail_seconds: float = 2.0) -> dict[str, Any]:
    """Run locust headless for one user class with the step load; returns its request record."""
    label = label or cls
    record_path = out_dir / f"record_{label}.json"
    csv_prefix = out_dir / "locust" / label
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LOAD_MOCK_URL": mock_url,
        "LOAD_STEPS": ",".join(map(str, steps)),
        "LOAD_STEP_SECONDS": str(step_seconds),
        "LOAD_TAIL_SECONDS": str(tail_seconds),
        "LOAD_RECORD": str(record_path),
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
    }
    cmd = [str(VENV_BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "--host", host or ponder_url, "--only-summary", "--loglevel", "WARNING", "--csv", str(csv_prefix),
           "--stop-timeout", "0", cls]
    limit = len(steps) * step_seconds + tail_seconds + 60
    with open(out_dir / "locust" / f"{label}.log", "w") as log:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
    if not record_path.exists():
        raise RuntimeError(f"locust wrote no record for {label} (exit {proc.returncode}); see locust/{label}.log")
    record = json.loads(record_path.read_text())
    record_path.unlink()  # large; the summary below and locust's CSV stay
    return record


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # nan
            return "–"
        return f"{value:,.{digits}f}"
    return str(value)


def requests_cell(step: dict[str, Any]) -> str:
    return f"{step['requests']} ({step['unfinished']})" if step.get("unfinished") else str(step["requests"])


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# ponder load test — {report['started']} (source {report.get('source', 'unknown')})", ""]
    cfg = report["config"]
    lines += [
        f"Mock backend timing: ttft {cfg['mock']['ttft_ms']:g} ms, tpot {cfg['mock']['tpot_ms']:g} ms, "
        f"{cfg['mock']['tokens']} tokens per answer, batch slope {cfg['mock']['batch_slope']:g}, "
        f"prefill {cfg['mock']['prefill_ms_per_1k_tokens']:g} ms per 1k prompt tokens. "
        f"Steps: {cfg['steps']} users × {cfg['step_seconds']:g} s; requests timed if they start after the first "
        f"{cfg['warmup']:g} s and before the last {cfg.get('drain', 0):g} s of a step. "
        f"Cache: {'on' if cfg['cache'] else 'off'}. Machine: {cfg['machine']}; other load on it before the run: "
        f"{report.get('background_cores', float('nan')):.2f} cores, after: {report.get('background_cores_after', float('nan')):.2f}.",
        "",
        "Strategy params: " + "; ".join(f"{k} {json.dumps(v)}" for k, v in cfg["params"].items() if v),
        "",
    ]
    head = report.get("headline")
    if head:
        lines += ["## Headline", "", "| figure | value | target |", "|---|---|---|"]
        for row in head:
            lines.append(f"| {row['figure']} | {row['value']} | {row['target']} |")
        lines.append("")
    lines += ["## Per scenario and step", "",
              "| scenario | users | requests (unfinished) | req/s | p50 ms | p95 ms | p99 ms | errors | backend calls/req "
              "| ponder CPU cores | ponder CPU ms/req | ponder RSS MB | other load (cores) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, scen in report["scenarios"].items():
        for s in scen["steps"]:
            lines.append(
                f"| {name} | {s['users']} | {requests_cell(s)} | {fmt(s['rps'])} | {fmt(s['p50_ms'])} | {fmt(s['p95_ms'])} "
                f"| {fmt(s['p99_ms'])} | {s['errors']} | {fmt(scen.get('backend_calls_per_request'), 1)} "
                f"| {fmt(s.get('ponder_cpu_cores'), 2)} | {fmt(s.get('ponder_cpu_ms_per_req'), 2)} "
                f"| {fmt(s.get('ponder_rss_max_mb'), 0)} | {fmt(s.get('other_load_cores'), 2)} |")
    lines.append("")
    lines.append("Backend calls per request: the mock's request counter over the whole scenario ÷ requests "
                 "completed (in-flight requests at the end make it slightly high). Ponder CPU is the "
                 "`ponder serve` process's utime+stime (/proc) over the step window; the load generator, "
                 "the mock and ponder share the machine's cores.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_strategy: dict[str, list[str]] = {}
    for name, scen in report["scenarios"].items():
        by_strategy.setdefault(scen["strategy"], []).append(name)
    strategies = [s for s in STRATEGIES if s in by_strategy]
    panels = len(strategies) + 1
    cols = 3
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    styles = {"direct": ":", "proxy": "-", "rest": "--"}
    colors = {"p50_ms": "tab:blue", "p95_ms": "tab:orange", "p99_ms": "tab:red"}
    for ax, strategy in zip(axes.flat, strategies):
        for name in by_strategy[strategy]:
            scen = report["scenarios"][name]
            users = [s["users"] for s in scen["steps"]]
            for key, color in colors.items():
                ax.plot(users, [s[key] for s in scen["steps"]], styles[scen["surface"]], color=color, marker="o",
                        markersize=3, label=f"{scen['surface']} {key[:3]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{strategy}: latency")
        ax.set_xlabel("concurrent users")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    ax = axes.flat[len(strategies)]
    for name, scen in report["scenarios"].items():
        users = [s["users"] for s in scen["steps"]]
        ax.plot(users, [s["rps"] for s in scen["steps"]], styles[scen["surface"]], marker="o", markersize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title("throughput")
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("requests/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    for extra in list(axes.flat)[panels:]:
        extra.axis("off")
    fig.suptitle(f"ponder over the mock backend (ttft {report['config']['mock']['ttft_ms']:g} ms, "
                 f"tpot {report['config']['mock']['tpot_ms']:g} ms, {report['config']['mock']['tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def headline(report: dict[str, Any]) -> list[dict[str, str]]:
    scen = report["scenarios"]
    rows: list[dict[str, str]] = []

    def step(name: str, users: int) -> dict[str, Any] | None:
        for s in scen.get(name, {}).get("steps", []):
            if s["users"] == users:
                return s
        return None

    d1, p1 = step("DirectMock", 1), step("ProxyPassthrough", 1)
    if d1 and p1:
        rows.append({"figure": "pass-through p50 at 1 user ÷ mock direct p50",
                     "value": f"{p1['p50_ms']:.1f} / {d1['p50_ms']:.1f} ms = {p1['p50_ms'] / d1['p50_ms']:.3f}",
                     "target": "≤ 1.05"})
    top = max(report["config"]["steps"])
    dt, pt = step("DirectMock", top), step("ProxyPassthrough", top)
    if dt and pt:
        rows.append({"figure": f"pass-through throughput at {top} users ÷ mock direct",
                     "value": f"{pt['rps']:.0f} / {dt['rps']:.0f} req/s = {pt['rps'] / max(dt['rps'], 1e-9):.3f}",
                     "target": "≥ 0.9"})
    for name, s in scen.items():
        if s["surface"] == "direct":
            continue
        st = step(name, top)
        if st and st.get("ponder_rss_max_mb"):
            rows.append({"figure": f"ponder RSS at {top} users, {name}", "value": f"{st['ponder_rss_max_mb']:.0f} MB",
                         "target": "≤ 300 MB"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="*", help=f"user classes (default: all): {', '.join(SCENARIOS)}")
    parser.add_argument("--surfaces", default="proxy,rest", help="proxy,rest (default both); DirectMock always runs")
    parser.add_argument("--steps", default="1,4,16,64")
    parser.add_argument("--cache", action="store_true", help="let ponder reuse cached checklists/judgments")
    harness.add_run_args(parser, step_seconds=6.0)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    surfaces = set(args.surfaces.split(",")) | {"direct"}
    chosen = args.scenarios or [c for c, (surface, _) in SCENARIOS.items() if surface in surfaces]
    unknown = [c for c in chosen if c not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {unknown}")
    out_dir = harness.report_dir(args.out)
    total = len(chosen) * (len(steps) * args.step_seconds + 4)
    print(f"{len(chosen)} scenarios x {len(steps)} steps x {args.step_seconds:g} s: about {total / 60:.1f} min -> {out_dir}",
          flush=True)

    background = harness.wait_quiet(0.3, args.wait_quiet)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "background_cores": background,
        "source": harness.source_version(),
        "config": {
            "mock": harness.MOCK_TIMING, "steps": steps, "step_seconds": args.step_seconds, "warmup": args.warmup,
            "drain": args.drain, "cache": args.cache, "params": harness.DEFAULT_PARAMS,
            "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
            "request": {"messages": harness.MESSAGES, "max_tokens": harness.MAX_TOKENS},
        },
        "scenarios": {},
    }
    with harness.mock_server(recording=False, log_dir=out_dir) as mock, \
            harness.ponder_server(mock.url, log_dir=out_dir) as ponder:
        # Warm both up (first requests pay imports and connection set-up).
        with httpx.Client(timeout=60) as client:
            for strategy in STRATEGIES:
                client.post(ponder.url + "/v1/chat/completions", json=harness.proxy_body(strategy)).raise_for_status()
        for cls in chosen:
            surface, strategy = SCENARIOS[cls]
            harness.wait_idle(mock.url)  # requests abandoned by the previous scenario's last step
            calls0 = mock_requests_total(mock.url)
            with Sampler({"ponder": ponder.pid, "mock": mock.pid}) as sampler:
                # locust's --host overrides a user class's own host: the baseline must get the mock's.
                record = run_scenario(cls, ponder_url=ponder.url, mock_url=mock.url, steps=steps,
                                      step_seconds=args.step_seconds, out_dir=out_dir,
                                      extra_env={"LOAD_CACHE": "1" if args.cache else "0"},
                                      host=mock.url if surface == "direct" else None)
            calls = mock_requests_total(mock.url) - calls0
            stats = step_stats(record, args.step_seconds, args.warmup, args.drain)
            done = sum(1 for s in record["samples"] if s[2])
            attach_resources(stats, sampler, ["mock"] if surface == "direct" else ["ponder", "mock"])
            report["scenarios"][cls] = {
                "surface": surface, "strategy": strategy, "steps": stats,
                "backend_calls_per_request": round(calls / max(done, 1), 2),
            }
            summary = ", ".join(f"{s['users']}u: p50 {s['p50_ms']:.0f} ms, {s['rps']:.1f} req/s" for s in stats)
            print(f"{cls:22s} {summary}", flush=True)
    report["background_cores_after"] = harness.background_cores()
    report["headline"] = headline(report)
    harness.write_report(out_dir, "report", report, markdown(report))
    plot(report, out_dir / "latency_throughput.png")
    print(f"wrote {out_dir}/report.json, report.md, latency_throughput.png")
    for row in report["headline"]:
        print(f"  {row['figure']}: {row['value']} (target {row['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
