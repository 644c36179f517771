"""A mock vLLM OpenAI-compatible server that behaves like vLLM in *time*, not in words.

Used for load tests and benchmarks of the proxy without a GPU::

    python -m loadtests.mock_backend --port 9000 [--model mock-model] [--ttft-ms 20] [--tpot-ms 2]
        [--batch-slope 0.01] [--prefill-ms-per-1k-tokens 5] [--tokens 32] [--answer 42]
        [--answer-p 0.6] [--seed N] [--fail-rate 0] [--workers 1]

Every flag can also be set by an environment variable ``MOCK_<FLAG>`` (``MOCK_TTFT_MS=0``,
``MOCK_ANSWER_P=1``, ...); a flag given on the command line wins over the environment.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health`` (and ``/ping``), ``GET /metrics`` (a few Prometheus-style gauges). Bodies are
shaped like vLLM's: ``n`` choices, ``stop`` strings (text cut before the first stop string,
``finish_reason`` "stop", ``stop_reason`` the string), ``max_tokens`` / ``max_completion_tokens``
(``finish_reason`` "length"), ``ignore_eos`` (generate exactly ``max_tokens``), ``logprobs``
(chat: ``logprobs.content[{token, logprob, bytes, top_logprobs}]``; completions:
``logprobs{tokens, token_logprobs, top_logprobs, text_offset}``) with random negative values,
``stream`` as SSE ``data: {...}`` chunks (one token per chunk per choice) ending with
``data: [DONE]``, and ``stream_options.include_usage`` (a last chunk with empty ``choices`` and
``usage``). A completions ``prompt`` that is a list of strings yields ``n`` choices per prompt.

Timing model (one process = one simulated GPU):

* ``active`` is the number of sequences (``n`` per request) currently being served.
* Prefill, paid once per request whatever ``n`` is:
  ``ttft = ttft_ms + prefill_ms_per_1k_tokens * prompt_tokens / 1000``.
* Decode: ``tpot_eff = tpot_ms * (1 + batch_slope * max(0, active - 1))``.
* The first token comes out at ``ttft``, every further token ``tpot_eff`` later, so a request
  whose longest choice has ``N`` tokens takes ``ttft + (N - 1) * tpot_eff``. Non-streaming
  requests sleep that once (``tpot_eff`` fixed from ``active`` at the start); streaming requests
  re-read ``active`` every token and sleep only when at least 1 ms is due (chunks due together
  are sent in one write). A streaming client that hangs up frees its sequences at the next
  token; a non-streaming one keeps them until its sleep ends.
* Tokens are words (~1 token per word, prompts included; +4 tokens per chat message).

Content: a normal answer is ``--tokens`` words of filler ending with "The answer is X." where X
is ``--answer`` with probability ``--answer-p`` and otherwise another random integer; the answer
sentence is never cut by the ``--tokens`` sizing (only by ``max_tokens`` / ``stop``). The RNG is
seeded by ``--seed`` (default: unseeded); a request's ``seed`` seeds that request alone; a request
with ``temperature: 0`` is greedy: every choice and every repeat of the same prompt is identical.

Heuristics for strategies' auxiliary prompts, looked for in the prompt (completions) or the last
message (chat), case-insensitively, first match wins:

1. "score:" or a request for a score ("rate ... score", "give a score", "on a scale of 1",
   "respond with only a number", "rate the above response")
   -> ``Score: K`` with K uniform in 1..10;
2. a request to write a checklist ("write/create/generate/make/list ... checklist")
   -> four numbered yes/no questions "1. Does the response ...?";
3. "yes or no" -> ``YES`` (p = 0.7) or ``NO``;
4. any other mention of "checklist" -> the checklist as in 2.

These short replies are not padded to ``--tokens``.

``--fail-rate p`` answers a fraction p of generation requests with HTTP 503 (retry testing).
With ``--workers k`` there are k processes, each with its own batch model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import socket
import sys
import time
import zlib
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator, Awaitable, Callable

try:  # pragma: no cover - depends on the environment
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def _dumps(obj: Any) -> bytes:
        return _encoder.encode(obj).encode()

    _loads = json.loads

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# -- configuration ------------------------------------------------------------------


@dataclass
class MockConfig:
    model: str = "mock-model"
    ttft_ms: float = 20.0
    tpot_ms: float = 2.0
    batch_slope: float = 0.01
    prefill_ms_per_1k_tokens: float = 5.0
    tokens: int = 32
    answer: str = "42"
    answer_p: float = 0.6
    seed: int | None = None
    fail_rate: float = 0.0
    max_model_len: int = 8192

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> MockConfig:
        """Defaults overridden by ``MOCK_<FIELD>`` environment variables."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get("MOCK_" + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _FIELD_TYPES[f.name](raw)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        return {"MOCK_" + f.name.upper(): str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}


_FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    "model": str,
    "ttft_ms": float,
    "tpot_ms": float,
    "batch_slope": float,
    "prefill_ms_per_1k_tokens": float,
    "tokens": int,
    "answer": str,
    "answer_p": float,
    "seed": int,
    "fail_rate": float,
    "max_model_len": int,
}


# -- text generation ------------------------------------------------------------------

_FILLER = (
    "Let us work through the problem carefully and check each step before we commit to a final "
    "result so that nothing important is missed along the way while keeping the reasoning short"
).split()

_CHECKLIST_POOL = (
    "Does the response answer the question that was asked?",
    "Does the response state a single final answer?",
    "Does the response show the reasoning behind the answer?",
    "Does the response avoid arithmetic mistakes?",
    "Does the response stay consistent with the given facts?",
    "Does the response use the units the question asks for?",
    "Does the response avoid unsupported assumptions?",
    "Does the response check its result?",
)

_SCORE_RE = re.compile(
    r"score:|\b(?:give|assign|output|provide|rate|reply with|respond with)\b[^\n.?!]{0,60}\bscore\b"
    r"|\bon a scale (?:of|from) 1\b"
    # other proxies' judge prompts (optillm's bon rating and mcts evaluation), which a real
    # model answers with a bare number
    r"|\brespond with only a number\b|\brate the above response\b"
)
_CHECKLIST_REQUEST_RE = re.compile(
    r"\b(?:write|create|generate|produce|make|draft|list|propose|come up with)\b[^\n.?!]{0,80}\bchecklist\b"
)


def classify_prompt(text: str) -> str:
    """Which reply a prompt gets: "score", "checklist", "yesno" or "answer"."""
    low = text.lower()
    if _SCORE_RE.search(low):
        return "score"
    if _CHECKLIST_REQUEST_RE.search(low):
        return "checklist"
    if "yes or no" in low:
        return "yesno"
    if "checklist" in low:
        return "checklist"
    return "answer"


def _words_to_tokens(words: list[str]) -> list[str]:
    return [words[0]] + [" " + w for w in words[1:]] if words else []


def _filler(rng: random.Random, count: int) -> list[str]:
    start = rng.randrange(len(_FILLER))
    return [_FILLER[(start + i) % len(_FILLER)] for i in range(count)]


def _other_integer(rng: random.Random, answer: str) -> str:
    try:
        correct = int(answer)
    except ValueError:
        correct = None
    while True:
        value = rng.randint(0, 99)
        if value != correct:
            return str(value)


def natural_tokens(rng: random.Random, config: MockConfig, kind: str) -> list[str]:
    """The tokens the mock "model" would produce if nothing stopped it."""
    if kind == "score":
        return _words_to_tokens(["Score:", str(rng.randint(1, 10))])
    if kind == "yesno":
        return ["YES" if rng.random() < 0.7 else "NO"]
    if kind == "checklist":
        questions = rng.sample(_CHECKLIST_POOL, 4)
        text = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1))
        return _words_to_tokens(text.split(" "))
    value = config.answer if rng.random() < config.answer_p else _other_integer(rng, config.answer)
    tail = ["The", "answer", "is", f"{value}."]
    pad = _filler(rng, max(0, config.tokens - len(tail)))
    if pad:
        pad[0] = pad[0].capitalize()
        pad[-1] += "."
    return _words_to_tokens(pad + tail)


@dataclass
class Sample:
    index: int
    text: str
    pieces: list[str]
    """What each generated token contributes to ``text`` (the last may be partial or empty)."""
    finish_reason: str
    stop_reason: str | None
    logprobs: list[float] | None

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def finish_sample(
    tokens: list[str],
    *,
    max_tokens: int | None,
    stops: list[str],
    ignore_eos: bool,
    rng: random.Random,
) -> tuple[str, list[str], str, str | None]:
    """Apply ``ignore_eos``, ``max_tokens`` then ``stop``: (text, pieces, finish_reason, stop_reason)."""
    finish = "stop"
    if ignore_eos and max_tokens is not None and len(tokens) < max_tokens:
        tokens = tokens + [" " + w for w in _filler(rng, max_tokens - len(tokens))]
    if max_tokens is not None and len(tokens) >= max_tokens:  # EOS would be token max_tokens + 1
        tokens = tokens[:max_tokens]
        finish = "length"
    text = "".join(tokens)
    if stops:
        cut, hit = -1, None
        for stop in stops:
            i = text.find(stop)
            if i >= 0 and (cut < 0 or i < cut):
                cut, hit = i, stop
        if hit is not None:
            end = cut + len(hit)
            pieces: list[str] = []
            pos = 0
            for token in tokens:
                if pos >= end:
                    break
                pieces.append(token[: max(0, cut - pos)])
                pos += len(token)
            return text[:cut], pieces, "stop", hit
    return text, tokens, finish, None


def count_tokens(text: str) -> int:
    return len(text.split())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class BadRequest(Exception):
    pass


# -- the ASGI app ---------------------------------------------------------------------------

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"


class MockBackend:
    """Pure-ASGI app; ``active`` counts the sequences being served (the batch model)."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.active = 0
        self.requests_total = 0
        self.created = int(time.time())
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex()

    # -- plumbing --

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            body = await _read_body(receive)
            if body is None:
                return
            await self._generate(body, path == "/v1/chat/completions", receive, send)
        elif method in ("GET", "HEAD"):
            if path in ("/health", "/ping"):
                await _send_body(send, 200, b"", [])
            elif path == "/v1/models":
                await _send_json(send, 200, self.models())
            elif path == "/metrics":
                await _send_body(send, 200, self.metrics().encode(), [(b"content-type", b"text/plain; version=0.0.4")])
            elif path == "/version":
                await _send_json(send, 200, {"version": "mock"})
            else:
                await _send_error(send, 404, "Not Found", "NotFoundError")
        elif path in ("/v1/chat/completions", "/v1/completions"):
            await _send_error(send, 405, "Method Not Allowed", "MethodNotAllowed")
        else:
            await _send_error(send, 404, "Not Found", "NotFoundError")

    def models(self) -> dict[str, Any]:
        model = self.config.model
        return {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "vllm",
                    "root": model,
                    "parent": None,
                    "max_model_len": self.config.max_model_len,
                    "permission": [],
                }
            ],
        }

    def metrics(self) -> str:
        m = self.config.model
        return (
            f'vllm:num_requests_running{{model_name="{m}"}} {self.active}\n'
            f"mock_active_sequences {self.active}\n"
            f"mock_requests_total {self.requests_total}\n"
        )

    # -- generation --

    def _plan(self, req: dict[str, Any], chat: bool) -> tuple[list[Sample], int, dict[str, Any]]:
        """Build every choice up front: (samples, prompt_tokens, options)."""
        cfg = self.config
        n = req.get("n") or 1
        if not isinstance(n, int) or n < 1:
            raise BadRequest("n must be a positive integer")
        if chat:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list")
            texts = [_content_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
            prompt_tokens = sum(count_tokens(t) + 4 for t in texts)
            prompts = [texts[-1]]
            max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
            want_logprobs = bool(req.get("logprobs"))
            top_logprobs = int(req.get("top_logprobs") or 0)
        else:
            prompt = req.get("prompt")
            if isinstance(prompt, str):
                prompts, prompt_tokens = [prompt], count_tokens(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompts, prompt_tokens = list(prompt), sum(count_tokens(p) for p in prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
                prompts, prompt_tokens = [""], len(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
                prompts, prompt_tokens = [""] * len(prompt), sum(len(p) for p in prompt)
            else:
                raise BadRequest("prompt must be a string, a list of strings or token ids")
            max_tokens = req.get("max_tokens")
            lp = req.get("logprobs")
            want_logprobs = lp is not None and lp is not False
            top_logprobs = int(lp or 0)
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise BadRequest("max_tokens must be at least 1")
        if max_tokens is None:
            max_tokens = max(1, cfg.max_model_len - prompt_tokens)
        stop = req.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
        ignore_eos = bool(req.get("ignore_eos"))
        temperature = req.get("temperature")
        greedy = temperature is not None and float(temperature) == 0.0
        seed = req.get("seed")
        request_rng = random.Random(seed) if seed is not None else self.rng

        samples: list[Sample] = []
        for prompt_text in prompts:
            kind = classify_prompt(prompt_text)
            for _ in range(n):
                rng = random.Random(zlib.crc32(prompt_text.encode())) if greedy else request_rng
                tokens = natural_tokens(rng, cfg, kind)
                text, pieces, finish, stop_reason = finish_sample(
                    tokens, max_tokens=max_tokens, stops=stops, ignore_eos=ignore_eos, rng=rng
                )
                logprobs = [-rng.expovariate(3.0) - 1e-4 for _ in pieces] if want_logprobs else None
                samples.append(Sample(len(samples), text, pieces, finish, stop_reason, logprobs))
        options = {
            "stream": bool(req.get("stream")),
            "include_usage": bool((req.get("stream_options") or {}).get("include_usage")),
            "top_logprobs": top_logprobs,
            "model": req.get("model") or cfg.model,
        }
        return samples, prompt_tokens, options

    async def _generate(self, body: bytes, chat: bool, receive: Receive, send: Send) -> None:
        self.requests_total += 1
        try:
            req = _loads(body)
            if not isinstance(req, dict):
                raise BadRequest("request body must be a JSON object")
            samples, prompt_tokens, options = self._plan(req, chat)
        except (ValueError, TypeError, BadRequest) as exc:
            await _send_error(send, 400, str(exc) or "invalid request", "BadRequestError")
            return
        cfg = self.config
        if cfg.fail_rate > 0 and self.rng.random() < cfg.fail_rate:
            await _send_error(send, 503, "mock backend: injected failure", "ServiceUnavailableError")
            return
        ttft = (cfg.ttft_ms + cfg.prefill_ms_per_1k_tokens * prompt_tokens / 1000.0) / 1000.0
        sequences = len(samples)
        self.active += sequences
        if options["stream"]:
            await self._stream(samples, prompt_tokens, options, chat, ttft, receive, send)  # releases `active`
            return
        try:
            longest = max(s.completion_tokens for s in samples)
            tpot = cfg.tpot_ms / 1000.0 * (1.0 + cfg.batch_slope * max(0, self.active - 1))
            total = ttft + (longest - 1) * tpot
            if total > 0:
                await asyncio.sleep(total)
        finally:
            self.active -= sequences
        await _send_json(send, 200, self._response(samples, prompt_tokens, options, chat))

    def reply(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The complete non-streamed body for request ``req`` at once, with no timing model
        (for test doubles that only need the content). Raises ``BadRequest``."""
        samples, prompt_tokens, options = self._plan(req, chat)
        return self._response(samples, prompt_tokens, options, chat)

    def _new_id(self, chat: bool) -> str:
        return f"{'chatcmpl' if chat else 'cmpl'}-{self._id_prefix}{next(self._ids):012x}"

    def _response(self, samples: list[Sample], prompt_tokens: int, options: dict[str, Any], chat: bool) -> dict[str, Any]:
        completion_tokens = sum(s.completion_tokens for s in samples)
        top = options["top_logprobs"]
        choices = []
        for s in samples:
            logprobs = None
            if s.logprobs is not None:
                logprobs = _chat_logprobs(s.pieces, s.logprobs, top) if chat else _completion_logprobs(s.pieces, s.logprobs, 0)
            if chat:
                choices.append(
                    {
                        "index": s.index,
                        "message": {"role": "assistant", "content": s.text, "tool_calls": []},
                        "logprobs": logprobs,
                        "finish_reason": s.finish_reason,
                        "stop_reason": s.stop_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": s.index,
                        "text": s.text,
                        "logprobs": logprobs,
                        "finish_reason": s.finish_reason,
                        "stop_reason": s.stop_reason,
                        "prompt_logprobs": None,
                    }
                )
        return {
            "id": self._new_id(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": options["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
        }

    async def _stream(
        self,
        samples: list[Sample],
        prompt_tokens: int,
        options: dict[str, Any],
        chat: bool,
        ttft: float,
        receive: Receive,
        send: Send,
    ) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        remaining = len(samples)  # sequences still counted in self.active
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            rid, created, model = self._new_id(chat), int(time.time()), options["model"]
            obj = "chat.completion.chunk" if chat else "text_completion"
            include_usage, top = options["include_usage"], options["top_logprobs"]
            head = {"id": rid, "object": obj, "created": created, "model": model}
            if include_usage:
                head["usage"] = None

            def chunk(choices: list[dict[str, Any]]) -> bytes:
                return b"data: " + _dumps({**head, "choices": choices}) + b"\n\n"

            due = loop.time() + ttft
            if ttft > 0:
                await asyncio.sleep(ttft)
            buf: list[bytes] = []
            if chat:
                for s in samples:
                    role = {"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    buf.append(chunk([role]))
            steps = max(s.completion_tokens for s in samples)
            offsets = [0] * len(samples)
            for step in range(steps):
                for s in samples:
                    last = s.completion_tokens - 1
                    if step > last:
                        continue
                    piece = s.pieces[step]
                    final = step == last
                    if not piece and not final:
                        continue  # a token swallowed by a stop string
                    finish = s.finish_reason if final else None
                    lp = s.logprobs[step] if s.logprobs is not None else None
                    if chat:
                        c: dict[str, Any] = {
                            "index": s.index,
                            "delta": {"content": piece},
                            "logprobs": _chat_logprobs([piece], [lp], top) if lp is not None else None,
                            "finish_reason": finish,
                        }
                    else:
                        c = {
                            "index": s.index,
                            "text": piece,
                            "logprobs": _completion_logprobs([piece], [lp], offsets[s.index]) if lp is not None else None,
                            "finish_reason": finish,
                        }
                        offsets[s.index] += len(piece)
                    if final:
                        c["stop_reason"] = s.stop_reason
                        remaining -= 1
                        self.active -= 1
                    buf.append(chunk([c]))
                if step + 1 < steps:
                    due += cfg.tpot_ms / 1000.0 * (1.0 + cfg.batch_slope * max(0, self.active - 1))
                    delay = due - loop.time()
                    if delay >= 0.001:
                        await send({"type": "http.response.body", "body": b"".join(buf), "more_body": True})
                        buf.clear()
                        await asyncio.sleep(delay)
                        if disconnected.is_set():
                            return
            if include_usage:
                completion_tokens = sum(s.completion_tokens for s in samples)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "completion_tokens": completion_tokens,
                }
                buf.append(b"data: " + _dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
            buf.append(_DONE)
            await send({"type": "http.response.body", "body": b"".join(buf), "more_body": False})
        finally:
            self.active -= remaining
            watcher.cancel()


def _token_bytes(token: str) -> list[int]:
    return list(token.encode())


def _chat_logprobs(pieces: list[str], values: list[float], top: int) -> dict[str, Any]:
    content = []
    for token, value in zip(pieces, values):
        alternatives = [{"token": token, "logprob": value, "bytes": _token_bytes(token)}]
        for k in range(1, top):
            alt = f" alt{k}"
            alternatives.append({"token": alt, "logprob": value - 1.5 * k, "bytes": _token_bytes(alt)})
        content.append({"token": token, "logprob": value, "bytes": _token_bytes(token), "top_logprobs": alternatives if top else []})
    return {"content": content}


def _completion_logprobs(pieces: list[str], values: list[float], start: int) -> dict[str, Any]:
    offsets, pos = [], start
    for token in pieces:
        offsets.append(pos)
        pos += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": list(values),
        "tokens": list(pieces),
        "top_logprobs": [{token: value} for token, value in zip(pieces, values)],
    }


async def _read_body(receive: Receive) -> bytes | None:
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send_body(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await _send_body(send, status, _dumps(obj), _JSON_HEADERS)


async def _send_error(send: Send, status: int, message: str, kind: str) -> None:
    await _send_json(send, status, {"error": {"message": message, "type": kind, "param": None, "code": status}})


def create_app(config: MockConfig | None = None) -> MockBackend:
    """The ASGI app for ``config`` (defaults from the environment)."""
    return MockBackend(config if config is not None else MockConfig.from_env())


def _app_from_env() -> MockBackend:
    """Factory for ``uvicorn --factory`` / multi-worker runs."""
    return create_app(MockConfig.from_env())


# -- running it -------------------------------------------------------------------------------


def _fast_settings() -> dict[str, Any]:
    settings: dict[str, Any] = {"access_log": False}
    try:
        import uvloop  # noqa: F401

        settings["loop"] = "uvloop"
    except ImportError:  # pragma: no cover
        settings["loop"] = "asyncio"
    try:
        import httptools  # noqa: F401

        settings["http"] = "httptools"
    except ImportError:  # pragma: no cover
        settings["http"] = "h11"
    return settings


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 9000, log_level: str = "warning", **kwargs: Any):
    import uvicorn

    settings = {**_fast_settings(), "ws": "none", "lifespan": "on", "backlog": 4096, **kwargs}
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, **settings)


@contextlib.asynccontextmanager
async def serve_in_background(config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run the mock inside the current event loop; yields its base URL (``http://host:port``)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(create_app(config), host=host, port=sock.getsockname()[1]))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("mock backend did not start")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = MockConfig.from_env()
    p = argparse.ArgumentParser(
        prog="python -m loadtests.mock_backend",
        description="Mock vLLM OpenAI server with a timing model (flags default to MOCK_* env vars).",
    )
    p.add_argument("--host", default=os.environ.get("MOCK_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("MOCK_PORT", "9000")))
    p.add_argument("--workers", type=int, default=int(os.environ.get("MOCK_WORKERS", "1")), help="processes (each has its own batch model)")
    p.add_argument("--log-level", default=os.environ.get("MOCK_LOG_LEVEL", "warning"))
    p.add_argument("--model", default=env.model, help="served model name (default %(default)s)")
    p.add_argument("--ttft-ms", type=float, default=env.ttft_ms, help="time to first token, ms (default %(default)s)")
    p.add_argument("--tpot-ms", type=float, default=env.tpot_ms, help="time per further token, ms (default %(default)s)")
    p.add_argument("--batch-slope", type=float, default=env.batch_slope, help="tpot *= 1 + slope*(active-1) (default %(default)s)")
    p.add_argument("--prefill-ms-per-1k-tokens", type=float, default=env.prefill_ms_per_1k_tokens, help="extra ttft per 1k prompt tokens (default %(default)s)")
    p.add_argument("--tokens", type=int, default=env.tokens, help="completion length in tokens (default %(default)s)")
    p.add_argument("--answer", default=env.answer, help="the 'correct' answer (default %(default)s)")
    p.add_argument("--answer-p", type=float, default=env.answer_p, help="probability of --answer (default %(default)s)")
    p.add_argument("--seed", type=int, default=env.seed, help="RNG seed (default: unseeded)")
    p.add_argument("--fail-rate", type=float, default=env.fail_rate, help="fraction of generation requests answered 503")
    p.add_argument("--max-model-len", type=int, default=env.max_model_len)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> MockConfig:
    return MockConfig(**{f.name: getattr(args, f.name) for f in fields(MockConfig)})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    config = config_from_args(args)
    if args.workers > 1:
        os.environ.update(config.to_env())
        settings = {**_fast_settings(), "ws": "none", "lifespan": "on", "backlog": 4096}
        uvicorn.run(
            "loadtests.mock_backend:_app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            **settings,
        )
        return
    print(f"mock backend on http://{args.host}:{args.port} {config}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(create_app(config), host=args.host, port=args.port, log_level=args.log_level)).run()


if __name__ == "__main__":
    main()
