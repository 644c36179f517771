"""A small programmable OpenAI-compatible server for backend tests, over real HTTP.

``FakeOpenAI`` runs a Starlette app under uvicorn on a free loopback port, in a
background thread with its own event loop (so its timing does not depend on the
test's loop). It serves ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models`` and ``/health``.

Per test, ``plan(...)`` queues responses (status, headers, JSON body or SSE
chunks, delay); a request consumes the first queued plan that applies to its path
(plans without a ``path`` apply to the two generation endpoints only). With nothing
queued, it answers with a well-formed default: ``n`` choices for generation
requests (an SSE stream when the body asks for ``"stream": true``), a one-model
listing, and ``health_status`` for ``/health``. Every request is logged in
``requests`` with its path, decoded body and the ``time.monotonic()`` it arrived.

    with FakeOpenAI(name="a") as fake:
        fake.plan(status=503, json={"error": {"message": "busy"}})
        ... point a client at fake.url ...
        assert len(fake.generation_requests) == 2
"""

from __future__ import annotations

import asyncio
import threading
import json as jsonlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import free_port  # noqa: F401  (re-exported for the backend tests)
from tests.servers import ServedApp

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Planned:
    status: int = 200
    json: Any = None
    """The body; None means "the default body for this request"."""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before sending the status line."""
    stream: Sequence[bytes] | None = None
    """Raw SSE chunks to send instead of a JSON body."""
    chunk_delay: float = 0.0
    path: str | None = None
    text: str | None = None
    """A raw (non-JSON) body."""


@dataclass
class Received:
    method: str
    path: str
    body: Any
    headers: dict[str, str]
    time: float


class FakeOpenAI:
    def __init__(self, *, name: str = "fake", model: str = "fake-model", delay: float = 0.0) -> None:
        self.name = name
        self.model = model
        self.delay = delay
        """Default delay for generation requests without a plan."""
        self.health_status = 200
        self.requests: list[Received] = []
        self._plans: deque[Planned] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort: asyncio.Event | None = None
        self._served: ServedApp | None = None
        self.port = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    # -- scripting -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, status: int = 200, json: Any = None, **kwargs: Any) -> Planned:
        planned = Planned(status=status, json=json, **kwargs)
        with self._lock:
            self._plans.append(planned)
        return planned

    def reset(self) -> None:
        with self._lock:
            self._plans.clear()
            self.requests.clear()
        self.health_status = 200
        self.delay = 0.0
        self.peak_in_flight = 0

    @property
    def generation_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path in GENERATION_PATHS]

    def _next_plan(self, path: str) -> Planned | None:
        with self._lock:
            for planned in self._plans:
                if planned.path == path or (planned.path is None and path in GENERATION_PATHS):
                    self._plans.remove(planned)
                    return planned
        return None

    # -- defaults ------------------------------------------------------------------

    def default_body(self, path: str, body: Any) -> Any:
        body = body if isinstance(body, dict) else {}
        n = int(body.get("n") or 1)
        usage = {"prompt_tokens": 7, "completion_tokens": 3 * n, "total_tokens": 7 + 3 * n}
        if path == "/v1/chat/completions":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"{self.name} chat {i}"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                for i in range(n)
            ]
            return {"id": "chatcmpl-fake", "object": "chat.completion", "model": self.model, "choices": choices, "usage": usage}
        if path == "/v1/completions":
            choices = [
                {"index": i, "text": f"{self.name} text {i}", "finish_reason": "stop", "logprobs": None}
                for i in range(n)
            ]
            return {"id": "cmpl-fake", "object": "text_completion", "model": self.model, "choices": choices, "usage": usage}
        if path == "/v1/models":
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}
        return {"error": {"message": f"no route {path}", "type": "not_found"}}

    def default_stream(self, path: str) -> list[bytes]:
        chunks = []
        for piece in ("Hel", "lo"):
            if path == "/v1/chat/completions":
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
            chunks.append(b"data: " + jsonlib.dumps({"model": self.model, "choices": [choice]}).encode() + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return chunks

    # -- the ASGI app ----------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short when the server shuts down."""
        if seconds <= 0:
            return
        assert self._abort is not None
        try:
            await asyncio.wait_for(self._abort.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        raw = await request.body()
        try:
            body = jsonlib.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        path = request.url.path
        with self._lock:
            self.requests.append(Received(request.method, path, body, dict(request.headers), time.monotonic()))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            response = await self._respond(path, body)
        finally:
            self.in_flight -= 1
        await response(scope, receive, send)

    async def _respond(self, path: str, body: Any) -> Response:
        known = GENERATION_PATHS + ("/v1/models", "/health")
        if path not in known:
            return JSONResponse({"error": {"message": f"no route {path}"}}, status_code=404)
        planned = self._next_plan(path)
        if planned is None:
            if path == "/health":
                return Response(status_code=self.health_status)
            if path in GENERATION_PATHS:
                await self._sleep(self.delay)
            if isinstance(body, dict) and body.get("stream") and path in GENERATION_PATHS:
                planned = Planned(stream=self.default_stream(path))
            else:
                return JSONResponse(self.default_body(path, body))
        await self._sleep(planned.delay)
        if planned.stream is not None and planned.status < 400:
            chunks = list(planned.stream)

            async def emit():
                for chunk in chunks:
                    await self._sleep(planned.chunk_delay)
                    yield chunk

            return StreamingResponse(emit(), status_code=planned.status, headers=planned.headers, media_type="text/event-stream")
        if planned.text is not None:
            return Response(planned.text, status_code=planned.status, headers=planned.headers, media_type="text/plain")
        payload = planned.json if planned.json is not None else self.default_body(path, body)
        return JSONResponse(payload, status_code=planned.status, headers=planned.headers)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "FakeOpenAI":
        self._served = ServedApp(self, name=f"fake-openai-{self.name}", lifespan="off").start()
        self.port = self._served.port
        self._loop = self._served.loop
        self._abort = asyncio.Event()
        return self

    def stop(self) -> None:
        if self._served is None:
            return
        self._served.loop.call_soon_threadsafe(self._abort.set)
        self._served.stop()
        self._served = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
