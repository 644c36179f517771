"""A fault-injecting OpenAI-compatible backend over real HTTP/1.1, for fault-tolerance tests.

``FaultyBackend`` is a raw asyncio TCP server (no HTTP framework, so it can break the
protocol on purpose) running in a background thread with its own event loop, on a free
loopback port. Healthy answers carry the content of the load-test mock
(``loadtests.mock_backend.MockBackend.reply``: ``n`` choices, stop strings, ``max_tokens``,
"Score: K" to rating prompts, numbered checklists, YES/NO verdicts), so strategies run on it
unchanged; ``/tokenize`` and ``/v1/(chat/)completions/render`` answer one token per character
(what vllm-router asks for its prefix-aware routing). Each generation request (``POST /v1/completions`` or ``/v1/chat/completions``)
draws one outcome:

========== ====================================================================================
outcome    what the client gets
========== ====================================================================================
``ok``     a complete 200 (JSON, or an SSE stream ending in ``data: [DONE]`` when the body asks
           for ``"stream": true``)
``500``    HTTP 500 with an OpenAI error body
``429``    HTTP 429 with an OpenAI error body and ``Retry-After: retry_after``
``503``    HTTP 503 with an OpenAI error body and ``Retry-After: retry_after``
``reset``  the request is read, then the connection is reset (RST, no response)
``truncated`` a well-framed 200 whose JSON body is cut in half (Content-Length matches the cut
           body, so only a JSON parser notices); a stream: half the events, then the connection
           closes (no ``[DONE]``)
``cut``    200 headers announcing the full body, half of it, then the connection closes
``stall``  nothing more is sent until the client closes the connection (or ``stall_s``
           passes); a stream first gets its headers and first event. Every stall is recorded
           in ``stalls`` with the time the client closed the connection.
========== ====================================================================================

The outcome is the next one queued by ``script(...)`` if any, else drawn from
``faults`` (probabilities per outcome; the rest is ``ok``) with a seeded RNG. ``/health``
and ``/v1/models`` always answer.

    with FaultyBackend(faults={"500": 0.3, "reset": 0.1}, seed=1) as upstream:
        ... point ponder at upstream.url ...
        assert upstream.outcomes["ok"] == 20
        upstream.set_faults(stall=1.0)
        upstream.script("429", "ok")     # the next two generation requests, in order

Counters (safe to read from the test's thread): ``calls`` (generation requests),
``outcomes`` (a ``Counter`` by outcome), ``requests`` (every request: method, path, decoded
body, outcome, monotonic arrival time), ``connections`` (accepted) and ``open_connections``.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

from loadtests.mock_backend import BadRequest, MockBackend, MockConfig

OUTCOMES = ("ok", "500", "429", "503", "reset", "truncated", "cut", "stall")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
RENDER_PATHS = ("/tokenize", "/v1/completions/render", "/v1/chat/completions/render")

Responder = Callable[[str, dict[str, Any]], dict[str, Any]]
"""(path, request body) -> a complete non-streamed response body."""


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    outcome: str
    time: float


@dataclass
class Stall:
    path: str
    started: float
    closed: float | None = None
    """``time.monotonic()`` when the client closed the connection; None while it is open."""


class FaultyBackend:
    def __init__(self, *, faults: dict[str, float] | None = None, seed: int | None = 0, stall_s: float = 60.0,
                 retry_after: float | None = 0, delay_s: float = 0.0, model: str = "mock-model",
                 responder: Responder | None = None) -> None:
        """``faults``: probability per outcome (``{"500": 0.3}``), the rest is ``ok``;
        ``stall_s``: longest stall; ``retry_after``: the Retry-After seconds sent with
        429/503 (None: no header); ``delay_s``: wait before any generation answer;
        ``responder``: the healthy body (default: the load-test mock's content)."""
        self.set_faults(**(faults or {}))
        self.rng = random.Random(seed)
        self.stall_s, self.retry_after, self.delay_s, self.model = stall_s, retry_after, delay_s, model
        mock = MockBackend(MockConfig(model=model, seed=seed))
        self.responder: Responder = responder or (lambda path, body: mock.reply(body, path == GENERATION_PATHS[1]))
        self.models_body = mock.models()
        self.requests: list[Seen] = []
        self.outcomes: Counter[str] = Counter()
        self.stalls: list[Stall] = []
        self.connections = 0
        self.open_connections = 0
        self._script: deque[str] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    # -- scripting -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())

    def set_faults(self, **probabilities: float) -> None:
        """Replace the fault probabilities, e.g. ``set_faults(**{"500": 0.3})`` or ``set_faults(stall=1)``."""
        unknown = set(probabilities) - set(OUTCOMES)
        if unknown or sum(probabilities.values()) > 1 + 1e-9:
            raise ValueError(f"faults: unknown {sorted(unknown)} or probabilities summing over 1")
        self.faults = dict(probabilities)

    def script(self, *outcomes: str) -> None:
        """Queue outcomes for the next generation requests, in order (before any drawing)."""
        unknown = set(outcomes) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown outcomes {sorted(unknown)}")
        with self._lock:
            self._script.extend(outcomes)

    def reset(self) -> None:
        """Clear the counters, the script and the faults."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.outcomes.clear()
            self.stalls.clear()
        self.faults = {}

    def _draw(self) -> str:
        with self._lock:
            if self._script:
                return self._script.popleft()
            r = self.rng.random()
        for outcome, p in self.faults.items():
            if r < p:
                return outcome
            r -= p
        return "ok"

    # -- the server ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                if not await self._answer(*request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _answer(self, method: str, path: str, raw: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must not be reused."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        if path not in GENERATION_PATHS:
            self.requests.append(Seen(method, path, body, "ok", time.monotonic()))
            if path == "/health":
                writer.write(_head(200, 0, "text/plain"))
            elif path == "/v1/models":
                _write_json(writer, 200, self.models_body)
            elif path in RENDER_PATHS:  # routers (vllm-router) tokenize here for prefix-aware routing
                token_ids = [ord(c) for c in _prompt_text(body)]
                _write_json(writer, 200, {"count": len(token_ids), "max_model_len": 8192, "tokens": token_ids}
                            if path == "/tokenize" else {"token_ids": token_ids})
            else:
                _write_json(writer, 404, _error(404, f"no route {path}"))
            await writer.drain()
            return True
        outcome = self._draw()
        with self._lock:
            self.outcomes[outcome] += 1
            self.requests.append(Seen(method, path, body, outcome, time.monotonic()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if outcome in ("500", "429", "503"):
            extra = {} if outcome == "500" or self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}
            _write_json(writer, int(outcome), _error(int(outcome), f"injected {outcome}"), extra)
            await writer.drain()
            return True
        if outcome == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        stream = isinstance(body, dict) and bool(body.get("stream"))
        if outcome == "stall" and not stream:
            await self._stall(path, reader)
            return False
        try:
            reply = self.responder(path, body if isinstance(body, dict) else {})
        except BadRequest as exc:
            _write_json(writer, 400, _error(400, str(exc)))
            await writer.drain()
            return True
        if stream:
            return await self._stream(path, reply, outcome, reader, writer)
        data = json.dumps(reply).encode()
        if outcome == "truncated":
            data = data[: len(data) // 2]
        if outcome == "cut":
            writer.write(_head(200, len(data)) + data[: len(data) // 2])
            await writer.drain()
            return False
        writer.write(_head(200, len(data)) + data)
        await writer.drain()
        return True

    async def _stream(self, path: str, reply: dict[str, Any], outcome: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        events = sse_events(reply, chat=path == GENERATION_PATHS[1])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if outcome == "stall":
            writer.write(_chunk(events[0]))
            await writer.drain()
            await self._stall(path, reader)
            return False
        if outcome in ("truncated", "cut"):
            for event in events[: max(1, len(events) // 2)]:
                writer.write(_chunk(event))
            await writer.drain()
            return False
        for event in events:
            writer.write(_chunk(event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _stall(self, path: str, reader: asyncio.StreamReader) -> None:
        """Send nothing until the client closes the connection (EOF) or ``stall_s`` passes."""
        stall = Stall(path, time.monotonic())
        self.stalls.append(stall)
        stop = asyncio.ensure_future(self._stop.wait())
        eof = asyncio.ensure_future(_until_eof(reader))
        try:
            await asyncio.wait({stop, eof}, timeout=self.stall_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if eof.done():
                stall.closed = time.monotonic()
            eof.cancel()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "FaultyBackend":
        started = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            await self._stop.wait()
            self._server.close()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), name="faulty-backend", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("FaultyBackend did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FaultyBackend":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def sse_events(reply: dict[str, Any], *, chat: bool) -> list[bytes]:
    """A complete response as SSE events: one per choice with its text, one with its
    finish reason, the usage, then ``[DONE]``."""
    head = {"id": reply.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": reply.get("created"), "model": reply.get("model")}
    events = []
    for choice in reply["choices"]:
        i = choice["index"]
        if chat:
            text = {"index": i, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                    "finish_reason": None}
            end = {"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}
        else:
            text = {"index": i, "text": choice["text"], "finish_reason": None}
            end = {"index": i, "text": "", "finish_reason": choice["finish_reason"]}
        events += [{**head, "choices": [text]}, {**head, "choices": [end]}]
    events.append({**head, "choices": [], "usage": reply.get("usage")})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    """(method, path, body) of the next request, or None at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "chunked" in headers.get("transfer-encoding", ""):
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readline()
        await reader.readline()
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length", 0)))
    return method, target.split("?")[0], body


def _prompt_text(body: Any) -> str:
    """The text a request carries (its prompt, or its messages' contents in order)."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    return "\n".join(str(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict))


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def _head(status: int, length: int, content_type: str = "application/json", extra: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _write_json(writer: asyncio.StreamWriter, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
    data = json.dumps(payload).encode()
    writer.write(_head(status, len(data), extra=extra) + data)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "injected_fault", "param": None, "code": status}}
