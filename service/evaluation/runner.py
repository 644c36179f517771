"""Running a dataset through strategy settings: solvers, the resumable runner, the CLI entry.

Every (item, setting) pair is one line of ``OUT/results.jsonl``, written (and flushed) as soon as
the pair finishes; a rerun of the same command skips the pairs already there (keyed by item id
and setting label) and retries the ones that failed. Pairs run item-major (all settings of an
item before the next item) under a bounded number of workers, so a partial run compares the
settings on the same items.

A solver turns (item, setting, params) into an ``Outcome``:

- ``InProcessSolver`` calls ``run_strategy`` over any ``Generator`` — the runtime's backend (the
  embedded engine or ``PONDER_BACKEND_URLS``) from the CLI, a scripted generator in tests;
- ``HTTPSolver`` POSTs to a running ponder's ``/v1/solve``.

Neither reads nor writes a cache (``cache: false``): every pair pays for all of its own
work, so tokens per task and ``--match-budget`` measure the setting itself, not the setting
order or what an old Redis still holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TextIO

import httpx

from strategies import Budget, Limits, StrategyError, Task, get_strategy, run_strategy
from strategies.base import parse_params
from strategies.protocol import Generator

from .data import EvalItem, load_dataset, parse_dataset_spec
from .report import format_table, summarize, write_plot, write_summary
from .scoring import score_answer

log = logging.getLogger("ponder.eval")

RESULTS_FILE = "results.jsonl"
TRACES_FILE = "traces.jsonl"
RUN_FILE = "run.json"
PLOT_FILE = "accuracy_vs_tokens.png"


# -- settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSetting:
    """One point on the accuracy-vs-compute plot: a strategy with fixed params."""

    label: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    verify: bool = False
    """Run with the item's checks from ``--verify`` as the request's ``verify`` list."""

    def as_dict(self) -> dict[str, Any]:
        out = {"label": self.label, "strategy": self.strategy, "params": dict(self.params)}
        return {**out, "verify": True} if self.verify else out


DEFAULT_SETTINGS: tuple[EvalSetting, ...] = (
    EvalSetting("greedy", "none", {"temperature": 0}),
    EvalSetting("sc-k4", "self-consistency", {"k": 4}),
    EvalSetting("sc-k8", "self-consistency", {"k": 8}),
    EvalSetting("sc-adaptive-k8", "self-consistency", {"k": 8, "adaptive": True}),
    EvalSetting("self-refine", "self-refine", {"max_rounds": 2}),
    EvalSetting("mcts-refine", "mcts", {"mode": "refine", "simulations": 4}),
    EvalSetting("mcts-steps", "mcts", {"mode": "steps", "simulations": 4}),
    EvalSetting("checklist-bon", "checklist-bon", {"n": 4}),
)
BUILTIN_SETTINGS: tuple[EvalSetting, ...] = DEFAULT_SETTINGS + (
    EvalSetting("best-of-n-n8", "best-of-n", {"n": 8}),
    EvalSetting("checklist-bon-n8", "checklist-bon", {"n": 8}),
    EvalSetting("verified-bon-n4", "verified-bon", {"n": 4, "rounds": 2}, verify=True),
    EvalSetting("verified-bon-n8", "verified-bon", {"n": 8, "rounds": 2}, verify=True),
    EvalSetting("auto", "auto", {}),
    EvalSetting("auto-verify", "auto", {}, verify=True),
)
"""Selectable by label; the ones with ``verify`` need ``--verify``."""


def _setting_from(entry: Any, index: int) -> EvalSetting:
    if not isinstance(entry, dict) or "strategy" not in entry:
        raise ValueError(f"settings[{index}]: expected {{'label', 'strategy', 'params'}}, got {entry!r}")
    unknown = set(entry) - {"label", "strategy", "params", "verify"}
    if unknown:
        raise ValueError(f"settings[{index}]: unknown field(s) {sorted(unknown)}")
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"settings[{index}]: params must be an object")
    if not isinstance(entry.get("verify", False), bool):
        raise ValueError(f"settings[{index}]: verify must be true or false")
    label = entry.get("label") or entry["strategy"] + "".join(f"-{k}{v}" for k, v in sorted(params.items()))
    return EvalSetting(str(label), str(entry["strategy"]), dict(params), bool(entry.get("verify", False)))


def load_settings(value: str | None, *, limits: Limits | None = None) -> list[EvalSetting]:
    """``None``: the built-in set; inline JSON (a list, or ``{"settings": [...]}``); a JSON file;
    or comma-separated labels of the built-in set (``greedy,sc-k8``). Validated against the strategies."""
    if value is None or not value.strip():
        chosen = list(DEFAULT_SETTINGS)
    else:
        text = value.strip()
        if text[0] in "[{":
            raw = json.loads(text)
        elif Path(text).expanduser().is_file():
            raw = json.loads(Path(text).expanduser().read_text(encoding="utf-8"))
        else:
            builtin = {s.label: s for s in BUILTIN_SETTINGS}
            labels = [p.strip() for p in text.split(",") if p.strip()]
            missing = [label for label in labels if label not in builtin]
            if missing:
                raise ValueError(f"--settings: {missing} are neither a file nor built-in labels "
                                 f"({', '.join(builtin)})")
            raw = [builtin[label].as_dict() for label in labels]
        if isinstance(raw, dict):
            raw = raw.get("settings")
        if not isinstance(raw, list) or not raw:
            raise ValueError("--settings: expected a non-empty list of settings")
        chosen = [_setting_from(entry, i) for i, entry in enumerate(raw)]
    seen: set[str] = set()
    for setting in chosen:
        if setting.label in seen:
            raise ValueError(f"--settings: label {setting.label!r} used twice")
        seen.add(setting.label)
        parse_params(get_strategy(setting.strategy), setting.params, limits)  # StrategyError names the field
    return chosen


VerifySource = Callable[[EvalItem], list[dict[str, Any]]]


def load_verify(value: str) -> VerifySource:
    """``--verify``: ``item`` (each item's own checks: an IFEval item's instructions as one
    ``ifeval`` verifier), or a JSON list of verifier specs (inline or a file) used for every item."""
    text = value.strip()
    if text == "item":
        return item_checks
    raw = json.loads(text if text[:1] == "[" else Path(text).expanduser().read_text(encoding="utf-8"))
    from strategies.verification import parse_verify

    parse_verify(raw)  # StrategyError names the field
    return lambda item: raw


def item_checks(item: EvalItem) -> list[dict[str, Any]]:
    """The checks an item carries: IFEval's instructions, checked like its scoring (strict)."""
    if item.kind != "ifeval":
        raise ValueError(f"--verify item: {item.kind} items carry no checks of their own (give a JSON list)")
    instructions = [{"id": i, "kwargs": {k: v for k, v in (kw or {}).items() if v is not None}}
                    for i, kw in zip(item.meta["instruction_id_list"], item.meta["kwargs"])]
    return [{"type": "ifeval", "name": "ifeval", "instructions": instructions, "prompt": item.question}]


def effective_params(setting: EvalSetting, item: EvalItem) -> dict[str, Any]:
    """The setting's params plus the item's ``answer_format`` where the strategy takes one
    (and the setting does not fix it)."""
    params = dict(setting.params)
    fields = get_strategy(setting.strategy).Params.model_fields
    if item.answer_format and "answer_format" in fields and "answer_format" not in params:
        params["answer_format"] = item.answer_format
    return params


# -- solvers ------------------------------------------------------------------------


@dataclass
class Outcome:
    answer: str
    usage: dict[str, Any]
    trace_id: str
    trace: dict[str, Any] = field(default_factory=dict)
    budget_limited: bool = False
    stop_reason: str = "completed"
    model: str | None = None


class Solver(Protocol):
    mode: str

    async def solve(self, item: EvalItem, setting: EvalSetting, params: dict[str, Any],
                    verify: list[dict[str, Any]] | None = None) -> Outcome: ...


class InProcessSolver:
    """``run_strategy`` over a ``Generator`` in this process, with no cache."""

    mode = "in-process"

    def __init__(self, generator: Generator, *, model: str | None = None,
                 budget: Budget = Budget(), limits: Limits | None = None, verifiers: Any = None,
                 temperature: float | None = None) -> None:
        """``verifiers``: a ``service.verifiers.VerifierRegistry`` for settings with ``verify``;
        ``temperature``: the request temperature, as the service sets it (``Settings.request_temperature``)."""
        self.generator, self.model, self.temperature = generator, model, temperature
        self.budget, self.limits, self.verifiers = budget, limits, verifiers

    async def solve(self, item: EvalItem, setting: EvalSetting, params: dict[str, Any],
                    verify: list[dict[str, Any]] | None = None) -> Outcome:
        task = Task(prompt=item.prompt, messages=item.messages, model=self.model, max_tokens=item.max_tokens,
                    stop=tuple(item.stop), temperature=self.temperature)
        verification = None
        if verify:
            if self.verifiers is None:
                raise SolveError("this solver has no verifier registry for --verify")
            verification = self.verifiers.build(verify, instruction=task.instruction)
        result = await run_strategy(setting.strategy, task, self.generator, params=params, use_cache=False,
                                    budget=self.budget, limits=self.limits, model_id=self.model or "",
                                    verification=verification)
        return Outcome(answer=result.answer, usage=result.usage.as_dict(), trace_id=f"eval-{uuid.uuid4().hex[:20]}",
                       trace=result.trace, budget_limited=result.budget_limited, stop_reason=result.stop_reason,
                       model=self.model)


class SolveError(Exception):
    pass


class HTTPSolver:
    """POST ``/v1/solve`` on a running ponder. Retries connection failures and 429/502/503/504
    (not timeouts: a retried run would spend its compute twice)."""

    mode = "url"
    RETRY_STATUS = (429, 502, 503, 504)

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 max_tokens: int | None = None, deadline_s: float | None = None, timeout_s: float = 1800.0,
                 retries: int = 3, client: httpx.AsyncClient | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.budget = {k: v for k, v in (("max_tokens", max_tokens), ("deadline_s", deadline_s)) if v is not None}
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owned = client is None
        self.client = client or httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def body(self, item: EvalItem, setting: EvalSetting, params: dict[str, Any],
             verify: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        task = {"prompt": item.prompt} if item.prompt is not None else {"messages": list(item.messages or ())}
        body: dict[str, Any] = {
            "task": task,
            "strategy": setting.strategy,
            "params": params,
            "sampling": {"max_tokens": item.max_tokens, "stop": list(item.stop)},
            "budget": dict(self.budget),
            "cache": False,
        }
        if self.model:
            body["model"] = self.model
        if verify:
            body["verify"] = verify
        return body

    async def check(self) -> None:
        """Fail fast when nothing answers at the URL."""
        try:
            response = await self.client.get("/healthz", timeout=10)
        except httpx.HTTPError as exc:
            raise SolveError(f"ponder at {self.url} does not answer: {exc!r}") from None
        if response.status_code != 200:
            raise SolveError(f"ponder at {self.url}: /healthz answered {response.status_code}")

    async def solve(self, item: EvalItem, setting: EvalSetting, params: dict[str, Any],
                    verify: list[dict[str, Any]] | None = None) -> Outcome:
        body = self.body(item, setting, params, verify)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self.client.post("/v1/solve", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if last:
                    raise SolveError(f"POST /v1/solve: {exc!r}") from None
                await asyncio.sleep(min(2.0 ** attempt, 10.0))
                continue
            if response.status_code in self.RETRY_STATUS and not last:
                await asyncio.sleep(min(2.0 ** attempt, 10.0))
                continue
            if response.status_code >= 400:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:300]
                raise SolveError(f"HTTP {response.status_code}: {message}")
            data = response.json()
            return Outcome(answer=data["answer"], usage=data["usage"], trace_id=data["id"], trace=data.get("trace", {}),
                           budget_limited=data.get("budget_limited", False),
                           stop_reason=data.get("stop_reason", "completed"), model=data.get("model"))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._owned:
            await self.client.aclose()


# -- results file -------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every parseable line of a results file (a line cut short by an interruption is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def completed_keys(records: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(str(r.get("item_id")), str(r.get("label"))) for r in records if not r.get("error")}


class JsonlAppender:
    """Appends one JSON object per line, flushed at once; starts on a fresh line after an
    interrupted write."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        needs_newline = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as handle:
                handle.seek(-1, 2)
                needs_newline = handle.read(1) != b"\n"
        self.handle = path.open("a", encoding="utf-8")
        if needs_newline:
            self.handle.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


# -- progress -----------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """One stderr line, rewritten in place on a terminal; elsewhere (logs) a line every ``every_s``."""

    def __init__(self, total: int, *, done: int = 0, stream: TextIO | None = None, enabled: bool = True,
                 every_s: float = 10.0) -> None:
        self.total, self.done, self.skipped = total, done, done
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if not self.tty else 0.1
        self.correct = self.scored = self.errors = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def line(self) -> str:
        ran = self.done - self.skipped
        elapsed = time.monotonic() - self.started
        rate = ran / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        acc = f"{100 * self.correct / self.scored:.1f}%" if self.scored else "—"
        return (f"[eval] {self.done}/{self.total} pairs ({pct:.0f}%) | {rate:.2f}/s | ETA {eta} | "
                f"acc {acc} | errors {self.errors}")

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        if record.get("error"):
            self.errors += 1
        elif record.get("correct") is not None:
            self.scored += 1
            self.correct += bool(record["correct"])
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r" + text[:width].ljust(width))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()


# -- the runner ---------------------------------------------------------------------


@dataclass
class RunStats:
    total: int
    skipped: int
    ran: int = 0
    errors: int = 0
    first_error: str | None = None
    aborted: str | None = None


class EvalAborted(Exception):
    pass


def make_record(item: EvalItem, setting: EvalSetting, params: dict[str, Any], outcome: Outcome | None,
                latency_s: float, *, match_budget: int | None, error: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "item_id": item.id,
        "dataset": item.kind,
        "question": item.question,
        "gold": item.gold,
        "label": setting.label,
        "strategy": setting.strategy,
        "params": params,
        "budget_max_tokens": match_budget,
        "verify": setting.verify,
    }
    if outcome is None:
        record.update({"answer": None, "extracted": None, "correct": None, "latency_s": round(latency_s, 4),
                       "error": error, "time": time.time()})
        return record
    score = score_answer(item, outcome.answer)
    usage = outcome.usage
    record.update({
        "answer": outcome.answer,
        "extracted": score.extracted,
        "correct": score.correct,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)),
        "calls": usage.get("backend_calls", 0),
        "samples": usage.get("samples", 0),
        "latency_s": round(latency_s, 4),
        "budget_limited": outcome.budget_limited,
        "stop_reason": outcome.stop_reason,
        "trace_id": outcome.trace_id,
        "model": outcome.model,
        "time": time.time(),
    })
    if score.details:
        record["scores"] = score.details
    first_draws = [c for c in outcome.trace.get("candidates", ()) if isinstance(c, dict) and c.get("round") == 0
                   and "passed" in c]
    samples = [s["text"] for s in outcome.trace.get("samples", ()) if isinstance(s, dict)
               and isinstance(s.get("text"), str)]
    if first_draws:  # verified-bon: did any of the N first samples pass every check (oracle@N)?
        record["oracle_pass"] = any(c["passed"] for c in first_draws)
    elif samples:  # self-consistency: is any of its k samples right by the item's own scoring (oracle@k)?
        verdicts = [score_answer(item, text).correct for text in samples]
        record["oracle_pass"] = True if any(verdicts) else (None if None in verdicts else False)
    return record


async def run_eval(
    items: Sequence[EvalItem],
    settings: Sequence[EvalSetting],
    solver: Solver,
    out_dir: Path,
    *,
    concurrency: int = 8,
    match_budget: int | None = None,
    progress: Progress | None = None,
    save_traces: bool = True,
    max_consecutive_errors: int = 25,
    verify_for: VerifySource | None = None,
) -> RunStats:
    """Run every (item, setting) pair not yet in ``OUT/results.jsonl``, appending one line per pair.

    ``match_budget`` is only recorded here; the solver enforces it (its ``Budget`` or REST budget).
    Raises ``EvalAborted`` after ``max_consecutive_errors`` failures in a row (backend down).
    Settings with ``verify`` get ``verify_for(item)`` as the request's checks."""
    if verify_for is None and any(s.verify for s in settings):
        raise ValueError("settings with verify need --verify (item, or a JSON list of verifier specs)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    done = completed_keys(read_results(results_path))
    pairs = [(item, setting) for item in items for setting in settings]
    pending = [(item, setting) for item, setting in pairs if (item.id, setting.label) not in done]
    stats = RunStats(total=len(pairs), skipped=len(pairs) - len(pending))
    if progress is None:
        progress = Progress(len(pairs), done=stats.skipped, enabled=False)
    if not pending:
        return stats
    writer = JsonlAppender(results_path)
    traces = JsonlAppender(out_dir / TRACES_FILE) if save_traces else None
    queue = iter(pending)
    consecutive = 0

    async def worker() -> None:
        nonlocal consecutive
        for item, setting in queue:  # one shared iterator: each pair goes to exactly one worker
            params = dict(setting.params)
            started = time.perf_counter()
            outcome, error = None, None
            try:
                params = effective_params(setting, item)
                if setting.verify:
                    outcome = await solver.solve(item, setting, params, verify_for(item))
                else:
                    outcome = await solver.solve(item, setting, params)
            except (StrategyError, SolveError) as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 — recorded, retried on resume
                error = f"{type(exc).__name__}: {exc}"
            latency = time.perf_counter() - started
            record = make_record(item, setting, params, outcome, latency, match_budget=match_budget, error=error)
            writer.write(record)
            if traces is not None and outcome is not None:
                traces.write({"trace_id": outcome.trace_id, "item_id": item.id, "label": setting.label,
                              "trace": outcome.trace})
            stats.ran += 1
            progress.update(record)
            if error is not None:
                stats.errors += 1
                stats.first_error = stats.first_error or f"{item.id} / {setting.label}: {error}"
                consecutive += 1
                if consecutive >= max_consecutive_errors:
                    raise EvalAborted(f"{consecutive} failures in a row; first: {stats.first_error}")
            else:
                consecutive = 0

    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, len(pending))))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    finally:
        progress.close()
        writer.close()
        if traces is not None:
            traces.close()
    return stats


# -- the run directory --------------------------------------------------------------

_COMPARABLE = ("dataset", "seed", "fewshot", "shots", "chat", "match_budget", "max_tokens")


def prepare_out_dir(out_dir: Path, config: dict[str, Any], settings: Sequence[EvalSetting]) -> list[dict[str, Any]]:
    """Check a resumed run is the same experiment and record ``run.json``; returns every setting the
    directory has seen (earlier ones first), for the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / RUN_FILE
    previous: dict[str, Any] = {}
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        for key in _COMPARABLE:
            if previous.get(key) != config.get(key):
                raise ValueError(f"{out_dir} holds a run with {key}={previous.get(key)!r}, this one has "
                                 f"{config.get(key)!r}; use another --out (results would not be comparable)")
    known = {s["label"]: s for s in previous.get("settings", [])}
    for setting in settings:
        old = known.get(setting.label)
        if old is not None and (old["strategy"], old["params"]) != (setting.strategy, setting.params):
            raise ValueError(f"{out_dir}: setting {setting.label!r} was {old['strategy']} {old['params']}, now "
                             f"{setting.strategy} {setting.params}; give it another label or use another --out")
    merged = list(previous.get("settings", [])) + [s.as_dict() for s in settings if s.label not in known]
    record = {**config, "settings": merged, "created": previous.get("created", time.time()), "updated": time.time()}
    run_file.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return merged


def write_reports(out_dir: Path, *, settings: Sequence[dict[str, Any]] | None, item_ids: Iterable[str] | None,
                  meta: dict[str, Any], plot: bool = True) -> dict[str, Any]:
    out_dir = Path(out_dir)
    summary = summarize(read_results(out_dir / RESULTS_FILE), settings=settings, item_ids=item_ids, meta=meta)
    write_summary(summary, out_dir)
    if plot:
        try:
            write_plot(summary, out_dir / PLOT_FILE)
        except ImportError:
            log.warning("matplotlib is not installed (pip install 'ponder[eval]'); no plot written")
    return summary


# -- CLI entry (``ponder eval``) ----------------------------------------------------


def main(args: argparse.Namespace, settings: Any) -> int:
    """``ponder eval``: see ``service/cli.py`` for the arguments. ``settings`` is ``service.config.Settings``."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the progress
    out = Path(args.out)
    if args.summary_only:
        run_file = out / RUN_FILE
        run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {}
        summary = write_reports(out, settings=run.get("settings"), item_ids=None,
                                meta={"dataset": run.get("dataset_spec"), "match_budget": run.get("match_budget"),
                                      "mode": run.get("mode")},
                                plot=not args.no_plot)
        print(format_table(summary))
        return 0
    if not args.dataset:
        raise SystemExit("ponder eval: --dataset is required (unless --summary-only)")
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be >= 1")
    if args.match_budget is not None and args.match_budget < 16:
        raise SystemExit("--match-budget must be >= 16 tokens")
    try:
        spec = parse_dataset_spec(args.dataset)
        items = load_dataset(spec, limit=args.limit, seed=args.seed, fewshot=args.fewshot, shots=args.shots,
                             max_tokens=args.max_tokens, chat=args.chat)
        if spec.kind == "ifeval":
            try:
                import if_verifiable  # noqa: F401
            except ImportError:
                raise SystemExit("ponder eval: IFEval scoring needs if-verifiable (pip install 'ponder[eval]')") from None
        eval_settings = load_settings(args.settings, limits=settings.limits)
        verify_for = load_verify(args.verify) if args.verify else None
        if verify_for is None and any(s.verify for s in eval_settings):
            raise ValueError(f"settings {[s.label for s in eval_settings if s.verify]} need --verify")
        if verify_for is not None:
            for item in items:
                verify_for(item)  # a source that does not fit the dataset fails here, not per pair
    except (ValueError, OSError, StrategyError) as exc:
        raise SystemExit(f"ponder eval: {exc}") from None
    if not items:
        raise SystemExit("ponder eval: the dataset has no items")
    mode = "url" if args.url else "in-process"
    config = {
        "dataset": spec.identity(),
        "seed": args.seed,
        "fewshot": str(Path(args.fewshot).resolve()) if args.fewshot and spec.kind == "gsm8k" else None,
        "shots": args.shots if args.fewshot and spec.kind == "gsm8k" else None,
        "chat": bool(args.chat) if spec.kind == "gsm8k" else None,
        "match_budget": args.match_budget,
        "max_tokens": args.max_tokens,
        "dataset_spec": args.dataset,
        "verify": args.verify,
        "mode": mode,
        "url": args.url,
    }
    try:
        merged = prepare_out_dir(out, config, eval_settings)
    except ValueError as exc:
        raise SystemExit(f"ponder eval: {exc}") from None
    total = len(items) * len(eval_settings)
    print(f"[eval] {len(items)} items x {len(eval_settings)} settings = {total} pairs -> {out / RESULTS_FILE} "
          f"({mode}{', budget ' + str(args.match_budget) + ' tokens/task' if args.match_budget else ''})",
          file=sys.stderr)

    async def run() -> RunStats:
        done = completed_keys(read_results(out / RESULTS_FILE))
        already = sum(1 for i in items for s in eval_settings if (i.id, s.label) in done)
        progress = Progress(total, done=already)
        if args.url:
            solver = HTTPSolver(args.url, api_key=args.api_key, model=args.model, max_tokens=args.match_budget,
                                deadline_s=args.deadline_s)
            try:
                await solver.check()
                return await run_eval(items, eval_settings, solver, out, concurrency=args.concurrency,
                                      match_budget=args.match_budget, progress=progress,
                                      save_traces=not args.no_traces, verify_for=verify_for)
            finally:
                await solver.aclose()
        from ..runtime import Runtime

        runtime = await Runtime.start(settings, engine_log=args.engine_log)
        try:
            model = args.model or await runtime.backend.default_model()
            solver = InProcessSolver(runtime.backend, model=model,
                                     budget=settings.budget(max_tokens=args.match_budget, deadline_s=args.deadline_s),
                                     limits=settings.limits, verifiers=runtime.verifiers,
                                     temperature=settings.request_temperature)
            return await run_eval(items, eval_settings, solver, out, concurrency=args.concurrency,
                                  match_budget=args.match_budget, progress=progress, save_traces=not args.no_traces,
                                  verify_for=verify_for)
        finally:
            await runtime.stop()

    code = 0
    try:
        stats = asyncio.run(run())
    except KeyboardInterrupt:
        print("\n[eval] interrupted; rerun the same command to resume", file=sys.stderr)
        stats, code = None, 130
    except (EvalAborted, SolveError) as exc:
        print(f"\n[eval] aborted: {exc}", file=sys.stderr)
        stats, code = None, 1
    meta = {"dataset": args.dataset, "match_budget": args.match_budget, "mode": mode}
    summary = write_reports(out, settings=merged, item_ids=[i.id for i in items], meta=meta, plot=not args.no_plot)
    if stats is not None:
        print(f"[eval] ran {stats.ran} pairs, skipped {stats.skipped} already done, {stats.errors} failed"
              + (f" (first: {stats.first_error})" if stats.first_error else ""), file=sys.stderr)
    print(format_table(summary))
    print(f"\n[eval] wrote {out / 'summary.md'}, {out / 'summary.json'}"
          + ("" if args.no_plot else f", {out / PLOT_FILE}"), file=sys.stderr)
    return code
