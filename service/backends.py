"""OpenAI-compatible HTTP backend (vLLM's server, the embedded engine, any peer).

Keep-alive connections per endpoint through the lean HTTP/1.1 client in
``http1.py``. Each request goes to the healthy endpoint with the fewest requests
in flight; connect errors, 429 and 502/503/504 are retried with exponential
backoff and jitter (Retry-After honoured), on another endpoint when there is one.
Upstream 4xx are surfaced as ``UpstreamError`` and never retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from strategies.base import gather_or_cancel
from strategies.protocol import Choice, Generation, GenerationRequest

from .http1 import ConnectError, ConnectionClosed, ConnectionPool, HTTPClientError, ProtocolError, Response

log = logging.getLogger("ponder.backend")

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
KEEPALIVE_SECONDS = 4.0
"""Below uvicorn's (and so vLLM's) 5 s keep-alive, so a pooled connection is dropped here
before the server drops it under a request."""
PROBE_TIMEOUT_S = 2.0


class BackendError(Exception):
    """The backend could not answer (down, timed out, retries spent)."""

    status_code = 503

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class BackendTimeout(BackendError):
    status_code = 504


class UpstreamError(BackendError):
    """The backend answered with an error status; carries its body for pass-through."""

    def __init__(self, status_code: int, body: Any) -> None:
        self.body = body
        message = _error_message(body) or f"upstream returned HTTP {status_code}"
        super().__init__(message, status_code=status_code)


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return error.get("message") or body.get("detail") and str(body["detail"])
        return str(error)
    return str(body) if body else None


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self, seconds: float) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + min(seconds * 2 ** min(self.failures - 1, 5), 30.0)

    def mark_up(self) -> None:
        self.failures = 0
        self.down_until = 0.0


@dataclass
class BackendConfig:
    urls: Sequence[str]
    api_key: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    max_retries: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    max_concurrency: int = 256
    eject_seconds: float = 2.0
    supports_seed: bool = True
    """False for engines that crash on per-request seeds (the vLLM CPU build)."""
    default_model: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


class HTTPBackend:
    """Generator over one or more OpenAI-compatible servers."""

    def __init__(self, config: BackendConfig) -> None:
        if not config.urls:
            raise ValueError("HTTPBackend needs at least one URL")
        self.config = config
        self.endpoints = [Endpoint(u.rstrip("/").removesuffix("/v1")) for u in config.urls]
        headers = dict(config.extra_headers)
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._pools = {e.url: ConnectionPool(e.url, headers=headers, connect_timeout=config.connect_timeout,
                                             read_timeout=config.read_timeout, keepalive_s=KEEPALIVE_SECONDS)
                       for e in self.endpoints}
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._model: str | None = config.default_model

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()

    # -- routing -------------------------------------------------------------------

    def _pick(self, exclude: set[int]) -> Endpoint:
        candidates = [e for i, e in enumerate(self.endpoints) if i not in exclude] or self.endpoints
        # Prefer an untried healthy endpoint, then any healthy one (a retry after a 429
        # goes back to a live endpoint rather than to one known to be down).
        healthy = [e for e in candidates if e.healthy] or [e for e in self.endpoints if e.healthy]
        if healthy:
            return min(healthy, key=lambda e: e.in_flight)
        # None healthy: probe the one that comes back soonest.
        return min(candidates, key=lambda e: e.down_until)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max)
        ceiling = min(self.config.backoff_max, self.config.backoff_base * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    async def _start(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[Response, Endpoint]:
        """A successful response, routed and retried; its body is still unread.

        Retries happen only before the response starts, so a stream is never replayed.
        The response holds a concurrency slot and counts as in flight on its endpoint
        until ``_finish``; a response abandoned half-read closes its connection there,
        which tells vLLM to abort the generation. (Plain acquire/release rather than
        context managers: this is the per-call hot path.)
        """
        data = None if body is None else json.dumps(body).encode()
        await self._semaphore.acquire()
        try:
            tried: set[int] = set()
            for attempt in range(self.config.max_retries + 1):
                last_attempt = attempt == self.config.max_retries
                endpoint = self._pick(tried)
                tried.add(self.endpoints.index(endpoint))
                endpoint.in_flight += 1
                try:
                    response = await self._pools[endpoint.url].request(method, path, data)
                except BaseException as exc:
                    endpoint.in_flight -= 1
                    if isinstance(exc, TimeoutError):
                        raise BackendTimeout(
                            f"backend {endpoint.url} did not answer within {self.config.read_timeout}s") from exc
                    if isinstance(exc, ProtocolError):
                        raise BackendError(f"backend {endpoint.url} failed: {exc}") from exc
                    if not isinstance(exc, (ConnectError, ConnectionClosed)):
                        raise
                    # A stale keep-alive connection closed by the server is not the
                    # endpoint's fault: retry without ejecting it.
                    if isinstance(exc, ConnectError):
                        endpoint.mark_down(self.config.eject_seconds)
                    log.warning("backend %s unreachable (%s)", endpoint.url, exc)
                    if last_attempt:
                        raise BackendError(f"backend unreachable after {attempt + 1} attempts: {exc}") from exc
                    await asyncio.sleep(self._backoff(attempt, None))
                    continue
                if response.status < 400:
                    endpoint.mark_up()
                    return response, endpoint
                try:
                    content = await _read(response, self.config.read_timeout)
                finally:
                    response.release()
                    endpoint.in_flight -= 1
                if response.status in RETRYABLE_STATUS and not last_attempt:
                    if response.status != 429:
                        endpoint.mark_down(self.config.eject_seconds)
                    await asyncio.sleep(self._backoff(attempt, _retry_after(response)))
                    continue
                raise UpstreamError(response.status, _json_or_text(content, response.status))
            raise AssertionError("unreachable: the last attempt returns or raises")
        except BaseException:
            self._semaphore.release()
            raise

    def _finish(self, response: Response, endpoint: Endpoint) -> None:
        response.release()  # back to the pool if read to the end, else the connection is closed
        endpoint.in_flight -= 1
        self._semaphore.release()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None, *, decode: bool = True) -> Any:
        """Send one JSON request with routing and retries; return the decoded body
        (or its raw bytes, for pass-through without a decode/encode round trip)."""
        response, endpoint = await self._start(method, path, body)
        try:
            content = await _read(response, self.config.read_timeout)
        finally:
            self._finish(response, endpoint)
        return json.loads(content) if decode else content

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a streaming request and yield its raw SSE bytes as they arrive.

        A backend that breaks off mid-stream raises ``BackendError`` from the iterator."""
        response, endpoint = await self._start("POST", path, body)
        try:
            yield _relay(response, self.config.read_timeout)
        finally:
            self._finish(response, endpoint)

    # -- the generation protocol -------------------------------------------------

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if len(requests) == 1:  # the common case: no task to spawn
            return [await self._generate_one(requests[0])]
        return await gather_or_cancel(*(self._generate_one(r) for r in requests))

    async def _generate_one(self, request: GenerationRequest) -> Generation:
        body = await self.request_body(request)
        path = "/v1/chat/completions" if request.is_chat else "/v1/completions"
        data = await self.request("POST", path, body)
        return parse_generation(data, chat=request.is_chat)

    async def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or await self.default_model(),
            "n": request.n,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None and self.config.supports_seed:
            body["seed"] = request.seed
        if request.is_chat:
            body["messages"] = list(request.messages)
            if request.logprobs:
                body["logprobs"] = True
        else:
            body["prompt"] = request.prompt
            if request.logprobs:
                body["logprobs"] = 0
        body.update(dict(request.extra))
        return body

    async def models(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/models")

    async def default_model(self) -> str:
        if self._model is None:
            listing = await self.models()
            self._model = listing["data"][0]["id"]
        return self._model

    async def ready(self) -> dict[str, bool]:
        """Probe every endpoint's /health (vLLM) directly, without retries."""

        async def probe(endpoint: Endpoint) -> bool:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    response = await self._pools[endpoint.url].request("GET", "/health")
                    try:
                        await response.read()
                    finally:
                        response.release()  # closes the connection if the read was cut short
                ok = response.status == 200
            except (HTTPClientError, TimeoutError):
                ok = False
            if ok:
                endpoint.mark_up()
            return ok

        results = await asyncio.gather(*(probe(e) for e in self.endpoints))
        return {e.url: ok for e, ok in zip(self.endpoints, results)}


def parse_generation(data: dict[str, Any], *, chat: bool) -> Generation:
    choices = []
    for raw in sorted(data.get("choices", []), key=lambda c: c.get("index", 0)):
        logprobs = _token_logprobs(raw.get("logprobs"), chat=chat)
        if chat:
            message = raw.get("message") or {}
            text = message.get("content") or ""
            choices.append(Choice(text, raw.get("finish_reason"), logprobs, message, raw.get("stop_reason")))
        else:
            choices.append(Choice(raw.get("text", ""), raw.get("finish_reason"), logprobs, None, raw.get("stop_reason")))
    usage = data.get("usage") or {}
    return Generation(
        choices=tuple(choices),
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        model=data.get("model"),
    )


def _token_logprobs(raw: Any, *, chat: bool) -> tuple[float, ...] | None:
    if not raw:
        return None
    if chat:
        return tuple(item["logprob"] for item in raw.get("content") or [])
    values = raw.get("token_logprobs") or []
    return tuple(v for v in values if v is not None)


async def _read(response: Response, read_timeout: float) -> bytes:
    try:
        return await response.read()
    except TimeoutError as exc:
        raise BackendTimeout(f"backend did not finish within {read_timeout}s") from exc
    except HTTPClientError as exc:
        raise BackendError(f"backend connection broke mid-response: {exc}") from exc


async def _relay(response: Response, read_timeout: float) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.iter_chunks():
            yield chunk
    except TimeoutError as exc:
        raise BackendTimeout(f"backend stream stalled for {read_timeout}s") from exc
    except HTTPClientError as exc:
        raise BackendError(f"backend stream broke off: {exc}") from exc


def _retry_after(response: Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _json_or_text(content: bytes, status: int) -> Any:
    try:
        return json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = content.decode(errors="replace")[:500]
        return {"error": {"message": text, "type": "upstream_error", "code": status}}
