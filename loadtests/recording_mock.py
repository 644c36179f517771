"""The mock vLLM backend plus a request log, for counting backend calls and sequential rounds.

Same flags and behaviour as ``python -m loadtests.mock_backend`` (single process), with two
more endpoints:

* ``GET /stats`` -> ``{"requests_total", "active", "log": [{"start", "end", "n", "kind", "chat",
  "service_s"}, ...]}``: every generation request since the last reset, with its start and end on
  the mock's monotonic clock (seconds), the ``n`` it asked for, the reply kind the mock picked
  ("answer", "score", "yesno", "checklist") and the time the mock itself spent on it.
* ``POST /stats/reset`` -> clears the log and the counter.

    python -m loadtests.recording_mock --port 9000 --ttft-ms 20 --tpot-ms 2

``critical_path`` turns a log into the number of *sequential* backend rounds: the longest
chain of requests each of which started after the previous one ended.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from loadtests import mock_backend
from loadtests.mock_backend import MockBackend, MockConfig, Receive, Scope, Send, classify_prompt

MAX_LOG = 200_000


class RecordingMock(MockBackend):
    def __init__(self, config: MockConfig) -> None:
        super().__init__(config)
        self.log: list[dict[str, Any]] = []

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/stats" and method == "GET":
            await mock_backend._send_json(send, 200, {"requests_total": self.requests_total, "active": self.active,
                                                      "log": self.log})
            return
        if path == "/stats/reset" and method == "POST":
            await mock_backend._read_body(receive)
            self.log = []
            self.requests_total = 0
            await mock_backend._send_json(send, 200, {"ok": True})
            return
        await super()._http(scope, receive, send)

    async def _generate(self, body: bytes, chat: bool, receive: Receive, send: Send) -> None:
        start = time.monotonic()
        entry: dict[str, Any] = {"start": start, "chat": chat, "n": 1, "kind": "?"}
        try:
            req = mock_backend._loads(body)
            entry["n"] = req.get("n") or 1
            if chat:
                messages = req.get("messages") or [{}]
                text = mock_backend._content_text(messages[-1].get("content"))
            else:
                prompt = req.get("prompt")
                text = prompt if isinstance(prompt, str) else ""
            entry["kind"] = classify_prompt(text)
        except Exception:  # noqa: BLE001 - the mock answers the 400 itself
            pass
        try:
            await super()._generate(body, chat, receive, send)
        finally:
            entry["end"] = time.monotonic()
            entry["service_s"] = entry["end"] - start
            if len(self.log) < MAX_LOG:
                self.log.append(entry)


def critical_path(log: list[dict[str, Any]], slack_s: float = 0.002) -> tuple[int, float, list[dict[str, Any]]]:
    """(rounds, seconds the mock spent on the chain, the chain) of the longest chain of requests
    that each started after the previous one ended (``slack_s`` absorbs clock jitter)."""
    items = sorted(log, key=lambda e: e["start"])
    if not items:
        return 0, 0.0, []
    # best[i] = (rounds, service seconds, predecessor) of the longest chain ending with item i;
    # more rounds first, then the longer mock time (the real critical path).
    best: list[tuple[int, float, int]] = []
    for i, item in enumerate(items):
        top = (1, item["service_s"], -1)
        for j in range(i):
            if items[j]["end"] <= item["start"] + slack_s:
                cand = (best[j][0] + 1, best[j][1] + item["service_s"], j)
                if cand[:2] > top[:2]:
                    top = cand
        best.append(top)
    end = max(range(len(items)), key=lambda i: best[i][:2])
    chain, k = [], end
    while k >= 0:
        chain.append(items[k])
        k = best[k][2]
    chain.reverse()
    return best[end][0], best[end][1], chain


def main(argv: list[str] | None = None) -> None:
    args = mock_backend.parse_args(argv)
    config = mock_backend.config_from_args(args)
    print(f"recording mock backend on http://{args.host}:{args.port} {config}", file=sys.stderr, flush=True)
    import uvicorn

    uvicorn.Server(mock_backend.uvicorn_config(RecordingMock(config), host=args.host, port=args.port,
                                               log_level=args.log_level)).run()


if __name__ == "__main__":
    main()
