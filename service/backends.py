"""OpenAI-compatible HTTP backend (vLLM's server, the embedded engine, vllm-router, any peer).

One aiohttp ``ClientSession`` per backend object (one per process in the service) over a
tuned ``TCPConnector``: a connection limit equal to the concurrency bound, optional
per-host limit, keep-alive below uvicorn's (so vLLM's) 5 s, a DNS cache, happy eyeballs;
proxies from ``HTTP(S)_PROXY``/``NO_PROXY`` (read once, at start), a custom CA bundle and a client
certificate for https. Redirects are followed (at most ``MAX_REDIRECTS``), gzip/deflate
bodies decoded, interim 1xx responses skipped, userinfo in a URL sent as basic auth and
never shown (``Endpoint.url`` has none).

Routing: each request goes to the healthy endpoint with the fewest requests in flight.

Retries (exponential backoff with jitter, Retry-After honoured, on another endpoint when
there is one), only when the upstream cannot still be generating for the failed attempt:

* no connection (refused, unresolvable, connect timeout): nothing was sent;
* the connection closed or reset before the response was complete (vLLM aborts a
  generation whose connection goes), a 2xx body that is cut, undecodable or not JSON (the
  upstream had finished sending it);
* HTTP 429, 500, 502, 503: the upstream answered, so it is done with the request.

Never retried: a read timeout or HTTP 504 on a generation request (the upstream, or the one
behind a gateway, may still be generating: a retry would double the work), a body over
``max_response_bytes``, and any other status (4xx pass through as ``UpstreamError``). Reads
(``GET``: ``/v1/models``) are idempotent by construction and are retried on timeouts and 504
too. Every retry also needs the **retry budget** (``RetryBudget``): at most
``retry_budget_min + retry_budget_ratio × calls`` retries per sliding window, so an upstream
503 storm costs about 1.2 calls per request instead of ``1 + max_retries`` once past the
``retry_budget_min`` reserve (100 per 10 s window: Finagle's default of 10 a second, which
lets a strategy's 5-30 calls ride out 30% faults at moderate load).

Ejection: a refused connection takes the endpoint out of rotation at once (2 s, doubling
per consecutive failure up to 30 s); 500/502, resets and broken bodies only after
``EJECT_AFTER_FAILURES`` in a row; 429 and 503 (back-pressure from a live server) never.

Concurrency: ``max_concurrency`` requests in flight per process. Strategy fan-out may use
all but a reserved share (``passthrough_reserve``), so pass-through requests never queue
behind a strategy's hundreds of calls; a caller waiting longer than ``queue_timeout`` for a
slot gets ``BackendError`` 503 with a Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
import time
import urllib.request
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import aiohttp
from yarl import URL

from strategies.base import gather_or_cancel
from strategies.protocol import Choice, Generation, GenerationRequest

from . import metrics

log = logging.getLogger("ponder.backend")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503})
"""Statuses retried for every request; 504 only for reads (see the module docstring)."""
BACKPRESSURE_STATUS = frozenset({429, 503})
"""A live server asking for less load: retried, never a reason to eject it."""
EJECT_AFTER_FAILURES = 3
MAX_REDIRECTS = 3
PROBE_TIMEOUT_S = 2.0
QUEUE_RETRY_AFTER_S = 1.0


class BackendError(Exception):
    """The backend could not answer (down, timed out, broken response, retries spent).

    ``retry_after``: seconds a client should wait, sent as ``Retry-After`` when set;
    ``public``: a message safe to show the caller (no URL, no transport detail), if any."""

    status_code = 503

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None,
                 public: str | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.retry_after = retry_after
        self.public = public


class BackendTimeout(BackendError):
    status_code = 504


class BadResponse(BackendError):
    """A 2xx whose body is cut, undecodable, not JSON or too large: a 502."""

    status_code = 502


class UpstreamError(BackendError):
    """The backend answered with an error status; carries its body for pass-through."""

    def __init__(self, status_code: int, body: Any, *, retry_after: float | None = None) -> None:
        self.body = body
        message = _error_message(body) or f"upstream returned HTTP {status_code}"
        super().__init__(message, status_code=status_code, retry_after=retry_after)


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return error.get("message") or body.get("detail") and str(body["detail"])
        return str(error)
    return str(body) if body else None


def header_value(name: str, value: str) -> str:
    """``value`` without surrounding whitespace (a key read from a file keeps its newline);
    ValueError naming ``name`` if what is left cannot be sent in an HTTP header."""
    value = value.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F or ord(c) > 0xFF for c in value):
        raise ValueError(f"{name} contains a character that an HTTP header cannot carry "
                         "(a control character or one outside Latin-1)")
    return value


@dataclass
class Endpoint:
    """One backend server. ``url`` is public (no credentials); ``base`` is what is called."""

    url: str
    base: URL = field(default=None, repr=False)  # type: ignore[assignment]
    auth: str | None = field(default=None, repr=False)
    """``Authorization`` value from the URL's userinfo (basic auth), if any."""
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0
    proxy: str | None = field(default=None, repr=False)
    """From ``HTTP(S)_PROXY`` unless ``NO_PROXY`` exempts the host (looked up once: aiohttp's
    ``trust_env`` does it, and a netrc lookup, in a thread for every request)."""
    _urls: dict[str, URL] = field(default_factory=dict, repr=False)

    def url_for(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self.base.with_path(self.base.path.rstrip("/") + path, encoded=False)
        return url

    def headers(self, *, json_body: bool) -> dict[str, str] | None:
        headers = {"Content-Type": "application/json"} if json_body else {}
        if self.auth is not None:
            headers["Authorization"] = self.auth
        return headers or None

    @classmethod
    def parse(cls, raw: str) -> "Endpoint":
        url = URL(raw.strip().rstrip("/").removesuffix("/v1"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"backend URL {url.with_user(None)!s} is not http(s)://host[:port][/path]")
        auth = None
        if url.user or url.password:
            auth = "Basic " + base64.b64encode(f"{url.user or ''}:{url.password or ''}".encode()).decode()
        base = url.with_user(None)
        proxy = None if base.host and urllib.request.proxy_bypass(base.host) else urllib.request.getproxies().get(base.scheme)
        return cls(url=str(base), base=base, auth=auth, proxy=proxy)

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self, seconds: float) -> None:
        if self.healthy:
            metrics.BACKEND_EJECTIONS.inc()
        self.failures += 1
        self.down_until = time.monotonic() + min(seconds * 2 ** min(self.failures - 1, 5), 30.0)

    def mark_failed(self, seconds: float) -> None:
        """A failed answer: ejected only after ``EJECT_AFTER_FAILURES`` in a row."""
        if self.failures + 1 >= EJECT_AFTER_FAILURES:
            self.mark_down(seconds)
        else:
            self.failures += 1

    def mark_up(self) -> None:
        self.failures = 0
        self.down_until = 0.0


class RetryBudget:
    """Retries allowed in a sliding window: ``min_retries + ratio × calls`` (calls = first
    attempts). After Finagle's ``RetryBudget`` (twitter/finagle, ``percentCanRetry`` plus a
    ``minRetriesPerSec`` reserve): a fault storm cannot multiply the upstream's load by the
    retry count, while a quiet server still gets its few retries."""

    def __init__(self, ratio: float, window_s: float, min_retries: int) -> None:
        self.ratio, self.window_s, self.min_retries = ratio, window_s, min_retries
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for times in (self._calls, self._retries):
            while times and times[0] < horizon:
                times.popleft()

    def record_call(self) -> None:
        self._calls.append(time.monotonic())

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        now = time.monotonic()
        self._prune(now)
        if len(self._retries) < self.min_retries + self.ratio * len(self._calls):
            self._retries.append(now)
            return True
        self.refused += 1
        return False


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
    passthrough_reserve: float = 0.125
    """Share of ``max_concurrency`` that strategy fan-out may not use."""
    queue_timeout: float = 30.0
    """Seconds a request may wait for a concurrency slot before a 503."""
    max_response_bytes: int = 32 * 1024 * 1024
    retry_budget_ratio: float = 0.2
    retry_budget_window_s: float = 10.0
    retry_budget_min: int = 100
    eject_seconds: float = 2.0
    connections_per_host: int = 0
    """0: only the overall limit (``max_concurrency``)."""
    keepalive_s: float = 4.0
    """Below uvicorn's (and so vLLM's) 5 s, so a pooled connection is dropped here first."""
    dns_ttl_s: float = 10.0
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    supports_seed: bool = True
    """False for engines that crash on per-request seeds (the vLLM CPU build)."""
    supports_structured_outputs: bool = True
    """vLLM's ``structured_outputs`` (constrained decoding); False for backends without it."""
    default_model: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


class HTTPBackend:
    """Generator over one or more OpenAI-compatible servers."""

    def __init__(self, config: BackendConfig) -> None:
        if not config.urls:
            raise ValueError("HTTPBackend needs at least one URL")
        self.config = config
        self.endpoints = [Endpoint.parse(u) for u in config.urls]
        headers = {name: header_value(f"header {name}", value) for name, value in config.extra_headers.items()}
        key = header_value("PONDER_BACKEND_API_KEY", config.api_key or "")
        if key:
            if any(e.auth for e in self.endpoints):
                raise ValueError("a backend URL carries credentials and PONDER_BACKEND_API_KEY is set: use one")
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                              sock_read=config.read_timeout)
        self._ssl = _ssl_context(config) if any(e.base.scheme == "https" for e in self.endpoints) else True
        reserve = 0
        if config.max_concurrency > 1 and config.passthrough_reserve > 0:
            reserve = max(1, round(config.max_concurrency * config.passthrough_reserve))
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._fanout_slots = asyncio.Semaphore(config.max_concurrency - reserve)
        self.retry_budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_window_s,
                                        config.retry_budget_min)
        self._model: str | None = config.default_model

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one session, created on first use inside the running loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_concurrency, limit_per_host=self.config.connections_per_host,
                keepalive_timeout=self.config.keepalive_s, ttl_dns_cache=int(self.config.dns_ttl_s) or None,
                happy_eyeballs_delay=0.25, ssl=self._ssl)
            # No cookie jar: a backend sets no cookies, and the jar's filtering costs every request.
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._timeout,
                                                  auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

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

    async def _acquire(self, fanout: bool) -> None:
        """A concurrency slot (fan-out first takes one of its own share), waiting at most
        ``queue_timeout``."""
        semaphores = (self._fanout_slots, self._slots) if fanout else (self._slots,)
        if not any(semaphore.locked() for semaphore in semaphores):
            for semaphore in semaphores:  # free: taken without suspending (the per-call hot path)
                await semaphore.acquire()
            return
        taken: list[asyncio.Semaphore] = []
        try:
            async with asyncio.timeout(self.config.queue_timeout):
                for semaphore in semaphores:
                    await semaphore.acquire()
                    taken.append(semaphore)
        except BaseException as exc:
            for semaphore in taken:
                semaphore.release()
            if isinstance(exc, TimeoutError):
                metrics.BACKEND_QUEUE_TIMEOUTS.inc()
                message = f"no backend slot free within {self.config.queue_timeout:g}s; retry later"
                raise BackendError(message, retry_after=QUEUE_RETRY_AFTER_S, public=message) from None
            raise

    def _release(self, fanout: bool) -> None:
        self._slots.release()
        if fanout:
            self._fanout_slots.release()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool,
                    fanout: bool) -> tuple[Any, Endpoint]:
        """Route and retry one request. ``stream``: return the response with its body unread
        (it holds a slot and counts in flight until ``_finish``), retries happening only
        before it starts; else ``(body bytes, decoded JSON)``, read within the size cap."""
        data = None if body is None else json.dumps(body).encode()
        idempotent = method == "GET"
        await self._acquire(fanout)
        self.retry_budget.record_call()
        streaming = False  # the slot is then released by ``_finish``
        try:
            tried: set[int] = set()
            for attempt in range(self.config.max_retries + 1):
                last_attempt = attempt == self.config.max_retries
                endpoint = self._pick(tried)
                tried.add(self.endpoints.index(endpoint))
                endpoint.in_flight += 1
                response: aiohttp.ClientResponse | None = None
                retry_after: float | None = None
                outcome = "failed"  # or "read" (body complete) or "streaming" (handed to the caller)
                try:
                    response = await self.session.request(
                        method, endpoint.url_for(path), data=data, headers=endpoint.headers(json_body=data is not None),
                        proxy=endpoint.proxy, max_redirects=MAX_REDIRECTS)
                    if response.status < 400 and stream:
                        endpoint.mark_up()
                        outcome = "streaming"
                        streaming = True
                        return response, endpoint
                    content = await _read_capped(response, self.config.max_response_bytes)
                    outcome = "read"
                    if response.status < 400:
                        try:
                            decoded = json.loads(content)
                        except ValueError:  # JSONDecodeError and UnicodeDecodeError
                            raise BadResponse(f"backend {endpoint.url} answered HTTP {response.status} with a body "
                                              f"that is not JSON ({len(content)} bytes)",
                                              public="the backend's answer was not complete JSON") from None
                        endpoint.mark_up()
                        return (content, decoded), endpoint
                    retry_after = _retry_after(response)
                    status = response.status
                    error = UpstreamError(status, _json_or_text(content, status), retry_after=retry_after)
                    if status not in RETRYABLE_STATUS and not (status == 504 and idempotent):
                        raise error
                    if status not in BACKPRESSURE_STATUS:
                        endpoint.mark_failed(self.config.eject_seconds)
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # nothing sent
                    endpoint.mark_down(self.config.eject_seconds)
                    error = BackendError(f"backend {endpoint.url} unreachable: {exc}")
                except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
                    timeout = BackendTimeout(f"backend {endpoint.url} did not answer within "
                                             f"{self.config.read_timeout:g}s")
                    if not idempotent:  # it may still be generating: do not ask twice
                        raise timeout from exc
                    error = timeout
                except ResponseTooLarge as exc:
                    raise BadResponse(f"backend {endpoint.url}: {exc}", public=str(exc)) from None
                except BadResponse as exc:
                    endpoint.mark_failed(self.config.eject_seconds)
                    error = exc
                except (aiohttp.ClientError, UnicodeError) as exc:  # closed, reset, cut, bad gzip, bad redirect
                    endpoint.mark_failed(self.config.eject_seconds)
                    error = BadResponse(f"backend {endpoint.url} failed mid-response: {type(exc).__name__}: {exc}")
                finally:
                    if outcome != "streaming":
                        endpoint.in_flight -= 1
                        if response is not None:
                            if outcome == "read":
                                response.release()
                            else:  # a body not read to its end: close the connection (vLLM aborts)
                                response.close()
                log.warning("backend %s: %s (attempt %d)", endpoint.url, error, attempt + 1)
                if last_attempt:
                    raise error
                if not self.retry_budget.try_retry():
                    metrics.BACKEND_RETRIES.labels("budget_spent").inc()
                    raise error
                metrics.BACKEND_RETRIES.labels("retried").inc()
                await asyncio.sleep(self._backoff(attempt, retry_after))
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            if not streaming:
                self._release(fanout)

    def _finish(self, response: aiohttp.ClientResponse, endpoint: Endpoint, fanout: bool) -> None:
        # A stream read to its end goes back to the pool; one abandoned half-read is closed,
        # which tells vLLM to abort the generation.
        if response.content.is_eof():
            response.release()
        else:
            response.close()
        endpoint.in_flight -= 1
        self._release(fanout)

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None, *, decode: bool = True,
                      fanout: bool = False) -> Any:
        """Send one JSON request with routing and retries; return the decoded body (or its
        raw bytes, checked to be JSON, for pass-through without a re-encoding).

        ``fanout``: a strategy's internal call (it may not take the pass-through reserve).
        Raises ``UpstreamError`` (an error status), ``BackendTimeout`` (504),
        ``BadResponse`` (502) or ``BackendError`` (503)."""
        (content, decoded), _ = await self._call(method, path, body, stream=False, fanout=fanout)
        return decoded if decode else content

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a streaming request and yield its raw SSE bytes as they arrive.

        Errors before the response starts raise here, with the upstream's status; a backend
        that breaks off mid-stream raises ``BackendError`` (or ``BackendTimeout``) from the
        iterator. Leaving the block releases the slot and, unless the stream was read to
        its end, closes the upstream connection."""
        response, endpoint = await self._call("POST", path, body, stream=True, fanout=False)
        try:
            yield _relay(response, endpoint, self.config.read_timeout)
        finally:
            self._finish(response, endpoint, fanout=False)

    # -- the generation protocol -------------------------------------------------

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       return_exceptions: bool = False) -> list[Generation | BaseException]:
        if return_exceptions:
            return await asyncio.gather(*(self._generate_one(r) for r in requests), return_exceptions=True)
        if len(requests) == 1:  # the common case: no task to spawn
            return [await self._generate_one(requests[0])]
        return await gather_or_cancel(*(self._generate_one(r) for r in requests))

    async def _generate_one(self, request: GenerationRequest) -> Generation:
        body = await self.request_body(request)
        path = "/v1/chat/completions" if request.is_chat else "/v1/completions"
        data = await self.request("POST", path, body, fanout=True)
        return parse_generation(data, chat=request.is_chat)

    async def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The request's JSON body. The caller's extra fields come first, so ponder's own
        (model, n, sampling, prompt, logprobs) always win over them."""
        body: dict[str, Any] = dict(request.extra)
        body.update({
            "model": request.model or await self.default_model(),
            "n": request.n,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
        })
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None and self.config.supports_seed:
            body["seed"] = request.seed
        else:
            body.pop("seed", None)
        if request.allowed_replies and self.config.supports_structured_outputs:
            body["structured_outputs"] = {"choice": list(request.allowed_replies)}
        if request.is_chat:
            body["messages"] = list(request.messages)
            body.pop("prompt", None)
            if request.logprobs:
                body["logprobs"] = True
        else:
            body["prompt"] = request.prompt
            body.pop("messages", None)
            if request.logprobs:
                body["logprobs"] = 0
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
                    async with self.session.get(endpoint.url_for("/health"), headers=endpoint.headers(json_body=False),
                                                proxy=endpoint.proxy) as response:
                        await response.read()
                ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
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


def _ssl_context(config: BackendConfig) -> ssl.SSLContext:
    """For https endpoints: a verifying context: the system's CAs (``SSL_CERT_FILE`` honoured) or ``ca_bundle``,
    plus the client certificate for mutual TLS when given."""
    context = ssl.create_default_context(cafile=config.ca_bundle)
    if config.client_cert:
        context.load_cert_chain(config.client_cert, config.client_key)
    return context


class ResponseTooLarge(Exception):
    pass


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, or ``ResponseTooLarge`` as soon as it passes ``cap`` bytes (never
    buffering more than that)."""
    length = response.content_length
    if length is not None and length <= cap and not response.headers.get("Content-Encoding"):
        return await response.read()
    if length is not None and length > cap:
        raise ResponseTooLarge(f"response of {length} bytes exceeds the cap of {cap} "
                               "(PONDER_BACKEND_MAX_RESPONSE_BYTES; ask for fewer samples or logprobs)")
    parts, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise ResponseTooLarge(f"response larger than the cap of {cap} bytes "
                                   "(PONDER_BACKEND_MAX_RESPONSE_BYTES; ask for fewer samples or logprobs)")
        parts.append(chunk)
    return b"".join(parts)


async def _relay(response: aiohttp.ClientResponse, endpoint: Endpoint, read_timeout: float) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise BackendTimeout(f"backend {endpoint.url} stream stalled for {read_timeout:g}s") from exc
    except aiohttp.ClientError as exc:
        raise BackendError(f"backend {endpoint.url} stream broke off: {type(exc).__name__}", status_code=502) from exc


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
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
    except ValueError:
        text = content.decode(errors="replace")[:500]
        return {"error": {"message": text, "type": "upstream_error", "code": status}}
