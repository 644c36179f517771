"""The README's chat example through every strategy a running ponder lists, one after the other.

    .venv/bin/python scripts/try_strategies.py [--url http://127.0.0.1:8000] [--question "..."]

Prints a markdown table: strategy, wall seconds, backend calls, tokens and the answer — the
check that a fresh `make serve` answers the example coherently with every strategy. Uses the
`openai` SDK as a user would (the strategy picked by the model id `strategy:model`).
`verified-bon` needs a check: it gets ``--check``, a regex for the right answer (default: the
apples question's 5).
"""

from __future__ import annotations

import argparse
import time

import httpx
from openai import OpenAI

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--check", default=r"\b5\b", help="regex of the right answer, verified-bon's check")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--strategies", help="comma-separated; default: every one /v1/strategies lists")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"}
    names = (args.strategies.split(",") if args.strategies else
             [s["name"] for s in httpx.get(f"{args.url}/v1/strategies", headers=headers).json()["data"]])
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, timeout=1800, max_retries=0)
    model = client.models.list().data[0].id
    print(f"model {model}; question: {args.question}\n")
    print("| strategy | s | calls | tokens | answer |\n|---|---|---|---|---|")
    for name in names:
        extra = {"verify": [{"type": "regex", "pattern": args.check}]} if name == "verified-bon" else {}
        started = time.monotonic()
        try:
            reply = client.chat.completions.create(
                model=f"{name}:{model}", max_tokens=args.max_tokens, extra_body=extra,
                messages=[{"role": "user", "content": args.question}])
        except Exception as exc:  # noqa: BLE001 — a failing strategy is a row of the table
            print(f"| {name} | {time.monotonic() - started:.0f} | – | – | **{type(exc).__name__}: {exc}** |")
            continue
        runs = (reply.model_extra or {}).get("ponder", {}).get("runs", [])
        calls = sum(run["usage"].get("backend_calls", 0) for run in runs) if runs else 1
        answer = (reply.choices[0].message.content or "").replace("\n", "\\n").replace("|", "\\|")
        print(f"| {name} | {time.monotonic() - started:.0f} | {calls} | {reply.usage.total_tokens} | {answer} |",
              flush=True)


if __name__ == "__main__":
    main()
