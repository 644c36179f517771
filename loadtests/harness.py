"""Shared plumbing of the load and performance scripts: processes on free loopback ports,
readiness, CPU and memory of a process, percentiles, a minimal closed-loop client, and the
command-line options, report folder and source version every script shares.

Every server started here binds 127.0.0.1 and every request goes there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MODEL = "mock-model"

# The mock timing model every benchmark here uses (say so in every report).
MOCK_TIMING = {"ttft_ms": 20.0, "tpot_ms": 2.0, "tokens": 32, "batch_slope": 0.01, "prefill_ms_per_1k_tokens": 5.0}

PROMPT = "What is 6 times 7? Think step by step and end with 'The answer is N.'"
MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (for servers that fork workers)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        pids += kids
        frontier += kids
    return pids


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += rss_mb(p)
    return total


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def background_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by everything on the machine over ``seconds`` (call it while our own
    servers are idle: it tells how noisy the machine is before a measurement)."""
    busy0, total0 = _busy_jiffies()
    time.sleep(seconds)
    busy1, total1 = _busy_jiffies()
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def wait_quiet(max_cores: float = 0.3, timeout_s: float = 0.0) -> float:
    """Wait up to ``timeout_s`` for the machine's background load to drop to ``max_cores``;
    returns the last reading (measurements on a shared machine are only as good as this)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = background_cores()
        if load <= max_cores or time.monotonic() >= deadline:
            return load


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")
        time.sleep(0.1)


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path | None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    # Own process group, so stop() ends a server and any worker it forked, nothing else.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def mock_flags(timing: dict[str, Any] | None = None) -> list[str]:
    timing = {**MOCK_TIMING, **(timing or {})}
    flags = []
    for key, value in timing.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


@contextlib.contextmanager
def mock_server(timing: dict[str, Any] | None = None, *, recording: bool = True, log_dir: Path | None = None,
                seed: int | None = 1) -> Iterator[Server]:
    """The mock vLLM backend (``loadtests.recording_mock``: the mock plus ``/stats``)."""
    port = free_port()
    module = "loadtests.recording_mock" if recording else "loadtests.mock_backend"
    cmd = [sys.executable, "-m", module, "--port", str(port), "--model", MODEL, *mock_flags(timing)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    log_path = log_dir / "mock.log" if log_dir else None
    proc = _spawn(cmd, {**os.environ, "PYTHONPATH": str(ROOT)}, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 30, proc)
        yield Server("mock", url, proc, log_path)
    finally:
        stop(proc)


@contextlib.contextmanager
def ponder_server(backend_url: str, *, log_dir: Path | None = None,
                  env: dict[str, str] | None = None) -> Iterator[Server]:
    """``ponder serve`` in front of ``backend_url`` (in-process cache, no auth)."""
    port = free_port()
    cmd = [str(VENV_BIN / "ponder"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    full_env = {
        **os.environ,
        "PONDER_BACKEND_URLS": backend_url,
        "PONDER_MODEL": MODEL,
        "PONDER_LOG_LEVEL": "warning",
        "PONDER_REDIS_URL": "",
        "PONDER_API_KEYS": "",
        # Throughput and overhead scripts measure ponder, not its admission bound (overload.py does).
        "PONDER_MAX_CONCURRENT_RUNS": "100000",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    log_path = log_dir / "ponder.log" if log_dir else None
    proc = _spawn(cmd, full_env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz", 60, proc)
        yield Server("ponder", url, proc, log_path)
    finally:
        stop(proc)


def wait_idle(mock_url: str, quiet_s: float = 1.0, timeout_s: float = 90.0) -> None:
    """Wait until the mock has nothing in flight and has received no request for ``quiet_s``:
    servers keep working on requests a load generator abandoned at the end of a run."""
    import re

    def total() -> tuple[int, int]:
        text = httpx.get(mock_url + "/metrics", timeout=10).text
        count = re.search(r"^mock_requests_total (\d+)", text, re.M)
        active = re.search(r"^mock_active_sequences (\d+)", text, re.M)
        return int(count.group(1)) if count else 0, int(active.group(1)) if active else 0

    deadline = time.monotonic() + timeout_s
    last, since = total(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = total()
        if now != last or now[1] > 0:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def mock_stats(mock_url: str) -> dict[str, Any]:
    return httpx.get(mock_url + "/stats", timeout=30).json()


def mock_reset(mock_url: str) -> None:
    httpx.post(mock_url + "/stats/reset", timeout=10).raise_for_status()


# -- what a request to each surface looks like ------------------------------------------------

# Strategy parameters used everywhere unless a script overrides them.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "self-consistency": {"k": 8},
    "best-of-n": {"n": 8},
    "checklist-bon": {"n": 8},
    "self-refine": {"max_rounds": 3},
    "mcts": {"simulations": 4, "branching": 2, "value_samples": 2},  # ponder's defaults
}


def proxy_body(strategy: str, params: dict[str, Any] | None = None, *, cache: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    if strategy != "none":
        body["strategy"] = strategy
        body["strategy_params"] = DEFAULT_PARAMS.get(strategy, {}) if params is None else params
        body["cache"] = cache
    return body


def rest_body(strategy: str, params: dict[str, Any] | None = None, *, cache: bool = False) -> dict[str, Any]:
    return {
        "task": {"messages": MESSAGES},
        "strategy": strategy,
        "params": DEFAULT_PARAMS.get(strategy, {}) if params is None else params,
        "sampling": {"max_tokens": MAX_TOKENS},
        "cache": cache,
    }


def direct_body() -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}


# -- a minimal closed-loop client (used where locust's own CPU would blur a small overhead) --


async def closed_loop(url: str, body: dict[str, Any], *, concurrency: int, requests: int | None = None,
                      duration_s: float | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """``concurrency`` workers, one keep-alive connection each, sending ``body`` back to back until
    ``requests`` are done or ``duration_s`` has passed (whichever is given; both bound the loop)."""
    assert requests is not None or duration_s is not None
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=timeout))
                   for _ in range(concurrency)]
        started = time.perf_counter()
        stop_at = started + duration_s if duration_s is not None else float("inf")

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal issued
            while time.perf_counter() < stop_at and (requests is None or issued < requests):
                issued += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(url, content=payload, headers=headers)
                    ok = response.status_code == 200
                    if not ok:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    ok = False
                    errors.append(repr(exc))
                if ok:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(c) for c in clients))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def summarize(latencies_s: Sequence[float], elapsed_s: float | None = None) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies_s]
    out = {
        "requests": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "mean_ms": round(sum(ms) / len(ms), 2) if ms else float("nan"),
    }
    if elapsed_s:
        out["rps"] = round(len(ms) / elapsed_s, 2)
    return out


def exit_on_sigterm() -> None:
    """Turn SIGTERM (and SIGINT, which background jobs ignore) into SystemExit, so the servers a
    script started are stopped by its ``finally`` blocks instead of being left running."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# -- what every script's command line and report share ------------------------------------------


def add_run_args(parser: argparse.ArgumentParser, *, step_seconds: float | None = None) -> None:
    """``--out`` and ``--wait-quiet``; with ``step_seconds`` (the default of ``--step-seconds``) also
    the options of a locust step load: ``--step-seconds``, ``--warmup`` and ``--drain``."""
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default loadtests/reports/<timestamp>[-<script>])")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before measuring, wait up to this long for the machine's other load to drop "
                             "below 0.3 cores")
    if step_seconds is not None:
        parser.add_argument("--step-seconds", type=float, default=step_seconds)
        parser.add_argument("--warmup", type=float, default=1.0, help="seconds left out at the start of every step")
        parser.add_argument("--drain", type=float, default=1.5,
                            help="requests starting in the last DRAIN seconds of a step are not timed (they "
                                 "would finish under the next step's load)")


def report_dir(out: Path | None, suffix: str = "") -> Path:
    """``out``, or ``loadtests/reports/<timestamp>-<suffix>``; created."""
    path = out or ROOT / "loadtests" / "reports" / (timestamp() + (f"-{suffix}" if suffix else ""))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_report(out_dir: Path, stem: str, data: Any, markdown_text: str) -> None:
    """``<stem>.json`` (the data) and ``<stem>.md`` (its tables) in ``out_dir``."""
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown_text)


def source_version() -> str:
    """The commit measured, and whether service/ or strategies/ differ from it (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "strategies"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (service/ or strategies/ modified)" if dirty else "")
