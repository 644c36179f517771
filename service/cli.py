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
    logging.getLogger("ponder").info("ponder serving on http://%s:%d", host, port)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
