"""Side by side with optillm 0.4.0: same mock backend, same concurrency, same sample counts.

One run starts the mock vLLM backend (``loadtests.recording_mock``: ttft 20 ms, tpot 2 ms,
32-token answers), ``ponder serve`` and optillm's proxy (only if an optillm contender is chosen),
both pointed at that mock, then:

1. counts, for every contender, the backend calls one request makes and its sequential backend
   rounds (from the mock's request log, at concurrency 1);
2. runs locust (``loadtests/locustfile.py``, classes ``Proxy*`` for ponder and ``Optillm``) with
   a step load of 1, 16 and 64 users, ``--step-seconds`` each, per contender, ponder and optillm
   of a pair back to back;
3. writes ``compare.json`` and ``compare.md``: p50/p95 at 1 and 16 users, throughput at 64
   users, and ponder ÷ optillm for each pair, next to the targets.

Pairs (optillm approaches read from its 0.4.0 source):

* pass-through: ponder without a strategy vs optillm ``none``;
* self-consistency k=8 vs optillm's ``majority_voting`` plugin (one ``n=k`` call, ``k: 8`` in the
  body, its default) and vs optillm's ``self_consistency`` (5 samples, one after the other — the
  count is fixed in its code, ``AdvancedSelfConsistency(num_samples=5)``, and cannot be set);
* Best-of-N n=8, the same algorithm: ponder's ``best-of-n`` vs optillm's ``bon``. Both draw the
  8 candidates in one ``n=8`` call and then have the model rate each 0-10 (9 calls); optillm
  rates them one after the other (9 sequential rounds), ponder all at once (2 rounds). optillm's
  n is server-wide: ``--best-of-n 8``;
* Best-of-N n=8, ponder's ``checklist-bon`` (a checklist alongside the 8 samples, then 8 × K
  yes/no judgments at once: 2 rounds) vs the same optillm ``bon``;
* MCTS around optillm's budget: optillm's ``mcts`` defaults (2 simulations, depth 1, 3 actions:
  14 calls, all sequential) vs ponder ``mcts`` with ``simulations 4, branching 1`` (18 calls, 14
  rounds), and bracketed by ``simulations 2, branching 2`` (14 calls) and ``simulations 2,
  branching 3`` (18 calls), both in 8 rounds (ponder's MCTSr: 2 + simulations × (2 + 2 ×
  branching) calls in 2 + 3 × simulations rounds; the figures in docs/performance.md were
  measured before MCTSr re-rewarded each visited node, one call more per simulation).

optillm runs in its own virtual environment, ``loadtests/.optillm-venv`` (created on first use;
it ignores itself in git). ``pip install optillm==0.4.0`` with its declared dependencies does not
resolve: it asks for ``transformers>=5`` and, through ``adaptive-classifier`` →
``optimum[onnxruntime]``, for ``transformers<4.45``, and pip backtracks for ever. So the script
installs optillm with ``--no-deps`` plus the packages its server imports (``OPTILLM_DEPS``); the
plugins that need torch/transformers/selenium/outlines fail to load and are not used here.

    .venv/bin/python -m loadtests.compare_optillm [--step-seconds 7] [--out DIR]
    .venv/bin/python -m loadtests.compare_optillm --contenders "ponder best-of-n n=8" "optillm bon n=8"

The report records the source version of ponder measured.

Every server binds 127.0.0.1; every locust run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

from loadtests import harness
from loadtests.harness import ROOT, Server
from loadtests.recording_mock import critical_path
from loadtests.run_load import Sampler, attach_resources, run_scenario, step_stats

OPTILLM_VENV = ROOT / "loadtests" / ".optillm-venv"
OPTILLM_VERSION = "0.4.0"
OPTILLM_DEPS = ["flask", "openai", "numpy", "networkx", "z3-solver<=4.15.4.0", "aiohttp", "cerebras_cloud_sdk",
                "pyyaml", "requests", "math-verify"]
STEPS = [1, 16, 64]

# name -> (side, locust class or optillm approach, params / extra body)
CONTENDERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ponder none": ("ponder", "ProxyPassthrough", {}),
    "optillm none": ("optillm", "none", {}),
    "ponder self-consistency k=8": ("ponder", "ProxySelfConsistency", {"k": 8}),
    "optillm majority_voting k=8": ("optillm", "majority_voting", {"k": 8}),
    "optillm self_consistency (5)": ("optillm", "self_consistency", {}),
    "ponder best-of-n n=8": ("ponder", "ProxyBestOfN", {"n": 8}),
    "optillm bon n=8": ("optillm", "bon", {}),
    "ponder checklist-bon n=8": ("ponder", "ProxyChecklistBoN", {"n": 8}),
    "ponder mcts s4 b1": ("ponder", "ProxyMCTS", {"simulations": 4, "branching": 1, "value_samples": 2}),
    "optillm mcts (defaults)": ("optillm", "mcts", {}),
    "ponder mcts s2 b2": ("ponder", "ProxyMCTS", {"simulations": 2, "branching": 2, "value_samples": 2}),
    "ponder mcts s2 b3": ("ponder", "ProxyMCTS", {"simulations": 2, "branching": 3, "value_samples": 2}),
}
STRATEGY_OF = {"ProxyPassthrough": "none", "ProxySelfConsistency": "self-consistency", "ProxyBestOfN": "best-of-n",
               "ProxyChecklistBoN": "checklist-bon", "ProxyMCTS": "mcts"}

# (pair, ponder contender, optillm contender, targets: {metric: (op, bound)})
PAIRS = [
    ("pass-through", "ponder none", "optillm none", {}),
    ("self-consistency k=8 vs majority_voting", "ponder self-consistency k=8", "optillm majority_voting k=8",
     {"p50@1": ("<=", 1.0), "p50@16": ("<=", 1.0), "rps@64": (">=", 2.0)}),
    ("self-consistency k=8 vs self_consistency", "ponder self-consistency k=8", "optillm self_consistency (5)",
     {"p50@1": ("<=", 0.3), "p50@16": ("<=", 0.3)}),
    ("Best-of-N n=8: best-of-n vs bon", "ponder best-of-n n=8", "optillm bon n=8",
     {"p50@1": ("<=", 0.5), "p50@16": ("<=", 0.5)}),
    ("Best-of-N n=8: checklist-bon vs bon", "ponder checklist-bon n=8", "optillm bon n=8",
     {"p50@1": ("<=", 0.5), "p50@16": ("<=", 0.5)}),
    ("MCTS, 18 vs 14 calls (ponder s4 b1)", "ponder mcts s4 b1", "optillm mcts (defaults)",
     {"p50@1": ("<=", 0.5), "p50@16": ("<=", 0.5)}),
    ("MCTS, 14 calls each (ponder s2 b2)", "ponder mcts s2 b2", "optillm mcts (defaults)",
     {"p50@1": ("<=", 0.5), "p50@16": ("<=", 0.5)}),
    ("MCTS, 18 vs 14 calls (ponder s2 b3)", "ponder mcts s2 b3", "optillm mcts (defaults)",
     {"p50@1": ("<=", 0.5), "p50@16": ("<=", 0.5)}),
]


# -- optillm ---------------------------------------------------------------------------------


def ensure_optillm() -> Path:
    """Create ``loadtests/.optillm-venv`` with optillm 0.4.0 unless it is there; returns its bin/."""
    bin_dir = OPTILLM_VENV / "bin"
    probe = [str(bin_dir / "python"), "-c", "import importlib.metadata as m, optillm.server; "
             "print(m.version('optillm'))"]
    if (bin_dir / "optillm").exists():
        done = subprocess.run(probe, capture_output=True, text=True, cwd=tempfile.gettempdir())
        if done.returncode == 0 and done.stdout.strip().endswith(OPTILLM_VERSION):
            return bin_dir
    print(f"installing optillm {OPTILLM_VERSION} into {OPTILLM_VENV} (--no-deps + {len(OPTILLM_DEPS)} packages)",
          flush=True)
    venv.EnvBuilder(with_pip=True, clear=False).create(OPTILLM_VENV)
    (OPTILLM_VENV / ".gitignore").write_text("*\n")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + ["--no-deps", f"optillm=={OPTILLM_VERSION}"], check=True)
    subprocess.run(pip + OPTILLM_DEPS, check=True)
    done = subprocess.run(probe, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"optillm does not import: {done.stderr[-2000:]}")
    return bin_dir


@contextmanager
def optillm_server(backend_url: str, *, best_of_n: int = 8, log_dir: Path | None = None) -> Iterator[Server]:
    bin_dir = ensure_optillm()
    port = harness.free_port()
    cmd = [str(bin_dir / "optillm"), "--base-url", backend_url + "/v1", "--host", "127.0.0.1", "--port", str(port),
           "--best-of-n", str(best_of_n), "--log", "warning"]
    env = {**os.environ, "OPENAI_API_KEY": "sk-mock-unused"}
    for key in ("OPTILLM_API_KEY", "CEREBRAS_API_KEY", "AZURE_OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(key, None)
    log_path = log_dir / "optillm.log" if log_dir else None
    workdir = tempfile.mkdtemp(prefix="optillm-")  # it looks for ./optillm/plugins in its working dir
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        harness.wait_http(url + "/health", 90, proc)
        yield Server("optillm", url, proc, log_path)
    finally:
        harness.stop(proc)


# -- measuring ---------------------------------------------------------------------------------


def request_for(side: str, target: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if side == "ponder":
        return "/v1/chat/completions", harness.proxy_body(STRATEGY_OF[target], params)
    body = {**harness.direct_body(), "model": f"{target}-{harness.MODEL}", **params}
    return "/v1/chat/completions", body


def count_calls(base_url: str, mock_url: str, path: str, body: dict[str, Any], runs: int = 3) -> dict[str, Any]:
    calls, rounds, walls = [], [], []
    headers = {"authorization": "Bearer unused"}
    with httpx.Client(timeout=120) as client:
        client.post(base_url + path, json=body, headers=headers).raise_for_status()  # warm-up
        for _ in range(runs):
            harness.mock_reset(mock_url)
            t0 = time.perf_counter()
            client.post(base_url + path, json=body, headers=headers).raise_for_status()
            walls.append((time.perf_counter() - t0) * 1000)
            log = harness.mock_stats(mock_url)["log"]
            calls.append(len(log))
            rounds.append(critical_path(log)[0])
    return {"backend_calls": statistics.median(calls), "rounds": statistics.median(rounds),
            "samples": sum(e["n"] for e in log), "wall_ms_c1": statistics.median(walls)}


def metric(result: dict[str, Any], key: str) -> float | None:
    name, users = key.split("@")
    for s in result["steps"]:
        if s["users"] == int(users):
            value = s["rps"] if name == "rps" else s[f"{name}_ms"]
            return value if value == value else None  # nan -> None
    return None


def compare(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for pair, ours, theirs, targets in PAIRS:
        if ours not in results or theirs not in results:
            continue
        row: dict[str, Any] = {"pair": pair, "ponder": ours, "optillm": theirs, "metrics": {}}
        for key in ("p50@1", "p95@1", "p50@16", "p95@16", "rps@64"):
            a, b = metric(results[ours], key), metric(results[theirs], key)
            ratio = a / b if a is not None and b else None
            entry: dict[str, Any] = {"ponder": a, "optillm": b, "ratio": ratio}
            if key in targets:
                op, bound = targets[key]
                entry["target"] = f"{op} {bound:g}"
                entry["met"] = None if ratio is None else (ratio <= bound if op == "<=" else ratio >= bound)
            row["metrics"][key] = entry
        row["calls"] = {"ponder": results[ours]["calls"], "optillm": results[theirs]["calls"]}
        rows.append(row)
    return rows


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    t = harness.MOCK_TIMING
    lines = [
        f"# ponder vs optillm {OPTILLM_VERSION} — {report['started']} "
        f"(ponder source {report.get('source', 'unknown')})", "",
        f"Same mock backend for both (ttft {t['ttft_ms']:g} ms, tpot {t['tpot_ms']:g} ms, {t['tokens']}-token answers, "
        f"batch slope {t['batch_slope']:g}), same request (one user message, max_tokens {harness.MAX_TOKENS}), "
        f"locust closed loop, {report['config']['step_seconds']:g} s per step (requests timed if they start after its "
        f"first {report['config']['warmup']:g} s and before its last {report['config'].get('drain', 0):g} s), ponder cache off. Background CPU load before the run: {report['background_cores']:.2f} cores "
        f"of {os.cpu_count()}.", "",
        "## Ratios (ponder ÷ optillm; latency: lower is better, throughput: higher is better)", "",
        "| pair | p50 @1 | p95 @1 | p50 @16 | p95 @16 | req/s @64 | targets |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["pairs"]:
        m = row["metrics"]
        cells = []
        for key in ("p50@1", "p95@1", "p50@16", "p95@16", "rps@64"):
            e = m[key]
            mark = "" if "met" not in e else (" ✅" if e["met"] else " ❌")
            cells.append(f"{fmt(e['ratio'], 2)}{mark}")
        targets = ", ".join(f"{k} {e['target']}" for k, e in m.items() if "target" in e) or "–"
        lines.append(f"| {row['pair']} | " + " | ".join(cells) + f" | {targets} |")
    lines += ["", "## Contenders", "",
              "| contender | backend calls / request | samples / request | sequential rounds | p50 @1 ms | p95 @1 ms "
              "| p50 @16 ms | p95 @16 ms | req/s @64 | server CPU ms/req @16 | server RSS MB @64 | other load (cores, max) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["contenders"].items():
        c = r["calls"]
        s16 = next((s for s in r["steps"] if s["users"] == 16), {})
        s64 = next((s for s in r["steps"] if s["users"] == 64), {})
        side = r["side"]
        lines.append(
            f"| {name} | {c['backend_calls']:g} | {c['samples']:g} | {c['rounds']:g} | {fmt(metric(r, 'p50@1'))} "
            f"| {fmt(metric(r, 'p95@1'))} | {fmt(metric(r, 'p50@16'))} | {fmt(metric(r, 'p95@16'))} "
            f"| {fmt(metric(r, 'rps@64'))} | {fmt(s16.get(f'{side}_cpu_ms_per_req'), 2)} "
            f"| {fmt(s64.get(f'{side}_rss_max_mb'), 0)} "
            f"| {fmt(max((x['other_load_cores'] for x in r['steps'] if 'other_load_cores' in x), default=None), 2)} |")
    lines += ["", "Backend calls, samples (sum of `n`) and sequential rounds come from the mock's request log "
              "for one request at concurrency 1 (median of 3)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["contenders"])
    colors = ["tab:blue" if report["contenders"][n]["side"] == "ponder" else "tab:gray" for n in names]
    panels = [("p50@1", "p50 latency, 1 user (ms)"), ("p50@16", "p50 latency, 16 users (ms)"),
              ("rps@64", "throughput, 64 users (req/s)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (key, title) in zip(axes, panels):
        values = [metric(report["contenders"][n], key) or 0.0 for n in names]
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        for i, v in enumerate(values):
            if v:
                ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
    t = harness.MOCK_TIMING
    fig.suptitle(f"ponder (blue) vs optillm {OPTILLM_VERSION} (grey), same mock backend "
                 f"(ttft {t['ttft_ms']:g} ms, tpot {t['tpot_ms']:g} ms, {t['tokens']} tokens)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", nargs="*", default=None, help="subset of: " + "; ".join(CONTENDERS))
    harness.add_run_args(parser, step_seconds=7.0)
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    chosen = args.contenders or list(CONTENDERS)
    unknown = [c for c in chosen if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders: {unknown}")
    with_optillm = any(CONTENDERS[c][0] == "optillm" for c in chosen)  # ponder alone needs no optillm
    out_dir = harness.report_dir(args.out, "optillm")
    if with_optillm:
        ensure_optillm()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "source": harness.source_version(),
        "optillm": OPTILLM_VERSION, "mock": harness.MOCK_TIMING,
        "config": {"steps": STEPS, "step_seconds": args.step_seconds, "warmup": args.warmup, "drain": args.drain},
        "background_cores": harness.wait_quiet(0.3, args.wait_quiet), "contenders": {},
    }
    print(f"{len(chosen)} contenders x {len(STEPS)} steps x {args.step_seconds:g} s: about "
          f"{len(chosen) * (len(STEPS) * args.step_seconds + 8) / 60:.1f} min -> {out_dir}", flush=True)
    with ExitStack() as stack:
        mock = stack.enter_context(harness.mock_server(recording=True, log_dir=out_dir))
        ponder = stack.enter_context(harness.ponder_server(mock.url, log_dir=out_dir))
        servers = {"ponder": ponder}
        if with_optillm:
            servers["optillm"] = stack.enter_context(optillm_server(mock.url, log_dir=out_dir))
        for name in chosen:
            side, target, params = CONTENDERS[name]
            server = servers[side]
            path, body = request_for(side, target, params)
            harness.wait_idle(mock.url)  # the previous contender's abandoned requests must not count
            calls = count_calls(server.url, mock.url, path, body)
            harness.mock_reset(mock.url)  # the log is only needed at concurrency 1
            env = {"LOAD_CACHE": "0"}
            if side == "ponder":
                env["LOAD_PARAMS"] = json.dumps(params)
                cls = target
            else:
                env.update({"LOAD_OPTILLM_URL": server.url, "LOAD_OPTILLM_APPROACH": target,
                            "LOAD_OPTILLM_EXTRA": json.dumps(params)})
                cls = "Optillm"
            label = name.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
            with Sampler({side: srv.pid for side, srv in servers.items()} | {"mock": mock.pid}) as sampler:
                record = run_scenario(cls, ponder_url=ponder.url, mock_url=mock.url, steps=STEPS,
                                      step_seconds=args.step_seconds, out_dir=out_dir, extra_env=env,
                                      host=server.url, label=label)
            stats = step_stats(record, args.step_seconds, args.warmup, args.drain)
            attach_resources(stats, sampler, [side, "mock"])
            report["contenders"][name] = {"side": side, "target": target, "params": params, "calls": calls,
                                          "steps": stats}
            print(f"{name:30s} calls {calls['backend_calls']:3g} rounds {calls['rounds']:3g} | "
                  + ", ".join(f"{s['users']}u p50 {s['p50_ms']:.0f} ms {s['rps']:.1f}/s" for s in stats), flush=True)
    report["background_cores_after"] = harness.background_cores()
    report["pairs"] = compare(report["contenders"])
    harness.write_report(out_dir, "compare", report, markdown(report))
    plot(report, out_dir / "compare_optillm.png")
    print(f"wrote {out_dir}/compare.json, compare.md, compare_optillm.png")
    for row in report["pairs"]:
        print(f"  {row['pair']}: " + ", ".join(
            f"{k} {fmt(e['ratio'], 2)}" + ("" if "met" not in e else (" (met)" if e["met"] else " (MISSED)"))
            for k, e in row["metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
