"""``ponder`` command line: serve the API, or solve one task from the terminal."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from .config import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from .app import create_app

    host = args.host or settings.host
    port = args.port or settings.port
    log = logging.getLogger("ponder")
    if warning := settings.exposure_warning(host):
        log.warning("!" * 20 + " %s " + "!" * 20, warning)
    log.info("ponder serving on http://%s:%d", host, port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level, access_log=False)
    return 0


def _solve(args: argparse.Namespace, settings: Settings) -> int:
    from strategies import Task, run_strategy

    from .runtime import Runtime

    async def main() -> int:
        runtime = await Runtime.start(settings, engine_log=args.engine_log)
        try:
            model = await runtime.backend.default_model()
            task = (Task(prompt=args.task, model=model, max_tokens=args.max_tokens, stop=tuple(args.stop))
                    if args.completion else
                    Task(messages=({"role": "user", "content": args.task},), model=model,
                         max_tokens=args.max_tokens, stop=tuple(args.stop)))
            result = await run_strategy(
                args.strategy, task, runtime.backend, params=json.loads(args.params), cache=runtime.cache,
                budget=settings.budget(), limits=settings.limits, model_id=model,
            )
        finally:
            await runtime.stop()
        if args.json:
            print(json.dumps(result.as_dict(), indent=2))
        else:
            print(result.answer)
            print(f"\n[{result.strategy}] " + ", ".join(f"{k}={v}" for k, v in result.usage.as_dict().items())
                  + (" (budget-limited)" if result.budget_limited else ""), file=sys.stderr)
        return 0

    return asyncio.run(main())


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from .evaluation.runner import main as eval_main

    return eval_main(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the REST and OpenAI-compatible API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    solve = sub.add_parser("solve", help="run one task through a strategy and print the answer")
    solve.add_argument("task")
    solve.add_argument("--strategy", default="none")
    solve.add_argument("--params", default="{}", help="strategy params as JSON")
    solve.add_argument("--completion", action="store_true",
                       help="send the task as a raw completion prompt (base models, few-shot)")
    solve.add_argument("--max-tokens", type=int, default=256)
    solve.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    solve.add_argument("--json", action="store_true", help="print answer, usage and trace as JSON")
    solve.add_argument("--engine-log", type=Path, default=None, help="write the embedded engine's log here")
    solve.set_defaults(func=_solve)

    ev = sub.add_parser(
        "eval", help="run a dataset through strategy settings: accuracy vs compute, with a plot",
        description="Runs every (item, setting) pair, one JSONL line each in OUT/results.jsonl (a rerun resumes), "
                    "then writes OUT/summary.md, OUT/summary.json and OUT/accuracy_vs_tokens.png. In-process "
                    "(the embedded engine, or PONDER_BACKEND_URLS) unless --url names a running ponder.")
    ev.add_argument("--dataset", metavar="SPEC",
                    help="arith:N[:difficulty 1-5] (built-in few-shot arithmetic) | gsm8k:PATH | ifeval:PATH "
                         "(required unless --summary-only)")
    ev.add_argument("--limit", type=int, help="use only the first N items")
    ev.add_argument("--settings", metavar="SETTINGS",
                    help='JSON file or inline JSON list of {"label", "strategy", "params"}, or comma-separated '
                         "built-in labels (greedy, sc-k4, sc-k8, sc-adaptive-k8, self-refine, mcts-refine, "
                         "mcts-steps, checklist-bon; also best-of-n-n8, checklist-bon-n8, verified-bon-n4, "
                         "verified-bon-n8, auto, auto-verify); default: the first eight")
    ev.add_argument("--verify", default=None, metavar="SOURCE",
                    help="checks for settings with verify (verified-bon-n4/-n8, auto-verify, or JSON settings with "
                         '"verify": true): "item" = each item\'s own (IFEval: its instructions as an ifeval '
                         "verifier), or a JSON list of verifier specs (inline or a file) for every item")
    ev.add_argument("--out", type=Path, required=True, metavar="DIR", help="results directory (resumed if present)")
    ev.add_argument("--url", help="a running ponder (POST /v1/solve), e.g. http://ponder:8000")
    ev.add_argument("--api-key", default=None, help="bearer key for --url (its PONDER_API_KEYS)")
    ev.add_argument("--model", default=None, help="model id (default: the backend's first model)")
    ev.add_argument("--concurrency", type=int, default=8, help="pairs in flight at once (default 8)")
    ev.add_argument("--match-budget", type=int, default=None, metavar="TOKENS",
                    help="give every setting the same token budget per task (prompt + completion, all calls)")
    ev.add_argument("--seed", type=int, default=0, help="arithmetic items and few-shot example choice")
    ev.add_argument("--fewshot", type=Path, default=None, metavar="PATH",
                    help="gsm8k: train JSONL for a few-shot prompt (default: zero-shot)")
    ev.add_argument("--shots", type=int, default=4, help="gsm8k: few-shot examples (default 4)")
    ev.add_argument("--chat", action="store_true",
                    help="gsm8k: chat messages for instruct models (default: a completion prompt for base models)")
    ev.add_argument("--max-tokens", type=int, default=None,
                    help="per-sample max_tokens (default: arith 8, gsm8k 256, ifeval 1024)")
    ev.add_argument("--deadline-s", type=float, default=None, help="per-task deadline")
    ev.add_argument("--no-traces", action="store_true", help="do not write OUT/traces.jsonl")
    ev.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    ev.add_argument("--summary-only", action="store_true", help="only rebuild the summary and plot from OUT")
    ev.add_argument("--engine-log", type=Path, default=None, help="write the embedded engine's log here")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from strategies import StrategyError

    from .backends import BackendError
    from .engine import EngineError

    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, settings)
    except (StrategyError, BackendError, EngineError, json.JSONDecodeError) as exc:
        print(f"ponder: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
