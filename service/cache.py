"""Result caches behind ``strategies.protocol.Cache``: an in-process LRU and Redis.

The cache is an optimisation, never a dependency. ``RedisCache`` turns every Redis
failure into a miss (reads) or a no-op (writes), and a circuit breaker stops it
paying timeouts while Redis is down. Both stores collapse concurrent identical
misses in one process into a single computation; ``RedisCache`` also takes a
short cross-replica lock so one replica computes while the others wait for it.

``get_or_compute`` returns ``(value, was_hit)``: ``was_hit`` is True when the
value came from the store or from another caller's computation (in this process,
or on another replica under the lock), False when this call ran ``compute``.
``None`` means "absent", so a computed ``None`` is never served as a hit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.metrics import CACHE_OP_SECONDS, CACHE_REQUESTS

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("ponder.cache")

T = TypeVar("T")
Compute = Callable[[], Awaitable[Any]]

SCHEMA_VERSION = 1
"""Bump when the shape of cached values changes: older entries then read as misses."""
LOCK_POLL_S = 0.05
ERROR_LOG_INTERVAL_S = 30.0

# Delete the lock only while it still holds our token: after a slow compute the
# lock may have expired and been taken by another replica.
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

_UNAVAILABLE: Any = object()
"""What a Redis call answers when it failed or was skipped by the open breaker."""


def _clone(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _ttl_for(ttls: dict[str, float], kind: str, ttl: float | None) -> float:
    if ttl is not None:
        return ttl
    try:
        return ttls[kind]
    except KeyError:
        raise ValueError(f"no TTL configured for cache kind {kind!r}") from None


class SingleFlight:
    """Collapses concurrent identical misses in this process into one computation.

    The first caller for a ``(kind, key)`` leads; later callers await its outcome:
    its value (each gets its own copy) or its exception. When the leader is
    cancelled, a waiter takes over rather than inheriting a cancellation that was
    not its own.
    """

    def __init__(self) -> None:
        self._inflight: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def run(
        self, kind: str, key: str, fetch: Callable[[], Awaitable[tuple[Any, bool]]]
    ) -> tuple[Any, bool]:
        flight = (kind, key)
        while (future := self._inflight.get(flight)) is not None:
            try:
                return _clone(await asyncio.shield(future)), True
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not future.cancelled() or (current is not None and current.cancelling()):
                    raise
        future = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            value, hit = await fetch()
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: there may be no waiters
            raise
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(value)
            return value, hit
        finally:
            del self._inflight[flight]


class MemoryCache:
    """Bounded in-process LRU with per-kind TTLs, for a single replica or tests.

    Values are stored JSON-encoded, so neither the writer nor readers can mutate
    what is cached. Expiry is checked on read; expired entries also age out of the
    LRU order like any other.
    """

    def __init__(self, max_entries: int, ttls: dict[str, float]) -> None:
        self._max_entries = max_entries
        self._ttls = dict(ttls)
        self._entries: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._flight = SingleFlight()

    async def get(self, kind: str, key: str) -> Any | None:
        return self._get(kind, key)

    async def get_many(self, kind: str, keys: Sequence[str]) -> list[Any | None]:
        return [self._get(kind, key) for key in keys]

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (the kind's TTL by default; <= 0 skips)."""
        ttl = _ttl_for(self._ttls, kind, ttl)
        if ttl <= 0:
            return
        entry = (kind, key)
        self._entries[entry] = (time.monotonic() + ttl, json.dumps(value))
        self._entries.move_to_end(entry)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def get_or_compute(self, kind: str, key: str, compute: Compute) -> tuple[Any, bool]:
        return await self._flight.run(kind, key, lambda: self._fetch_or_compute(kind, key, compute))

    async def aclose(self) -> None:
        self._entries.clear()

    def _get(self, kind: str, key: str) -> Any | None:
        entry = (kind, key)
        stored = self._entries.get(entry)
        if stored is not None and stored[0] <= time.monotonic():
            del self._entries[entry]
            stored = None
        if stored is None:
            CACHE_REQUESTS.labels(kind, "miss").inc()
            return None
        self._entries.move_to_end(entry)
        CACHE_REQUESTS.labels(kind, "hit").inc()
        return json.loads(stored[1])

    async def _fetch_or_compute(self, kind: str, key: str, compute: Compute) -> tuple[Any, bool]:
        value = self._get(kind, key)
        if value is not None:
            return value, True
        value = await compute()
        await self.put(kind, key, value)
        return value, False


class CircuitBreaker:
    """Stops calling a store that keeps failing, then lets one call probe it.

    Closed: every call goes through. After ``failures`` consecutive failures it
    opens: calls are refused for ``reset_s``. Then half-open: the next call is
    the probe (others are still refused); success closes it, failure re-opens it.
    """

    def __init__(self, failures: int, reset_s: float) -> None:
        self._threshold = max(1, failures)
        self._reset_s = reset_s
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self._reset_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> bool:
        """Record a success; True when it closed an open breaker."""
        recovered = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probing = False
        return recovered

    def failed(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._opened_at = time.monotonic()
        self._probing = False

    def abandoned(self) -> None:
        """A call ended without an outcome (cancelled): let the next call probe."""
        self._probing = False


class RedisCache:
    """Cache shared by all replicas, in Redis, under ``{namespace}:{kind}:{key}``.

    Values are JSON in a ``{"v": SCHEMA_VERSION, "value": ...}`` envelope; an
    entry with another version reads as a miss. One pooled client with short
    socket timeouts; Redis trouble is a miss, counted and logged at most once per
    ``ERROR_LOG_INTERVAL_S``, never an exception.
    """

    def __init__(
        self,
        url: str,
        ttls: dict[str, float],
        *,
        socket_timeout: float = 0.25,
        lock_ms: int = 30_000,
        lock_wait_s: float = 5.0,
        breaker_failures: int = 5,
        breaker_reset_s: float = 10.0,
        namespace: str = "ponder",
    ) -> None:
        # One immediate retry survives a pooled connection that went stale.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._release_lock = self._client.register_script(_RELEASE_LOCK)
        self._ttls = dict(ttls)
        self._lock_ms = lock_ms
        self._lock_wait_s = lock_wait_s
        self._namespace = namespace
        self._breaker = CircuitBreaker(breaker_failures, breaker_reset_s)
        self._flight = SingleFlight()
        self._last_error_log = -math.inf
        self._unlogged_errors = 0

    @property
    def breaker_state(self) -> str:
        """``closed``, ``open`` or ``half_open``: for tests and readiness checks."""
        return self._breaker.state

    async def get(self, kind: str, key: str) -> Any | None:
        value, result = await self._read(kind, key)
        CACHE_REQUESTS.labels(kind, result).inc()
        return value

    async def get_many(self, kind: str, keys: Sequence[str]) -> list[Any | None]:
        if not keys:
            return []
        names = [self._key(kind, key) for key in keys]
        raws = await self._call(kind, "get_many", lambda: self._client.mget(names))
        if raws is _UNAVAILABLE:
            raws = [_UNAVAILABLE] * len(keys)
        values = []
        for raw in raws:
            value, result = self._decode(raw)
            CACHE_REQUESTS.labels(kind, result).inc()
            values.append(value)
        return values

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (the kind's TTL by default; <= 0 skips)."""
        ttl = _ttl_for(self._ttls, kind, ttl)
        if ttl <= 0:
            return
        payload = json.dumps({"v": SCHEMA_VERSION, "value": value})
        px = max(1, round(ttl * 1000))
        done = await self._call(kind, "put", lambda: self._client.set(self._key(kind, key), payload, px=px))
        if done is _UNAVAILABLE:
            CACHE_REQUESTS.labels(kind, "error").inc()

    async def get_or_compute(self, kind: str, key: str, compute: Compute) -> tuple[Any, bool]:
        return await self._flight.run(kind, key, lambda: self._fetch_or_compute(kind, key, compute))

    async def aclose(self) -> None:
        await self._client.aclose()

    def _key(self, kind: str, key: str) -> str:
        return f"{self._namespace}:{kind}:{key}"

    async def _fetch_or_compute(self, kind: str, key: str, compute: Compute) -> tuple[Any, bool]:
        """Redis first; on a miss, compute under a cross-replica lock.

        Losers of the lock poll for the winner's value and try the lock again on
        each poll, so they take over at once if the winner failed (it released
        the lock without a value); after ``lock_wait_s``, or if Redis is
        unavailable, they compute without the lock.
        """
        value = await self.get(kind, key)
        lock = f"{self._namespace}:lock:{kind}:{key}"
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self._lock_wait_s
        while value is None:
            locked = await self._call(
                kind, None, lambda: self._client.set(lock, token, nx=True, px=self._lock_ms)
            )
            if locked is _UNAVAILABLE or (not locked and time.monotonic() >= deadline):
                return await self._compute_and_put(kind, key, compute), False
            if locked:
                try:
                    # The previous holder may have stored it between our read and our lock.
                    value, _ = await self._read(kind, key)
                    if value is not None:
                        return value, True
                    return await self._compute_and_put(kind, key, compute), False
                finally:
                    await self._call(kind, None, lambda: self._release_lock(keys=[lock], args=[token]))
            await asyncio.sleep(LOCK_POLL_S)
            value, _ = await self._read(kind, key)
        return value, True

    async def _compute_and_put(self, kind: str, key: str, compute: Compute) -> Any:
        value = await compute()
        await self.put(kind, key, value)
        return value

    async def _read(self, kind: str, key: str) -> tuple[Any | None, str]:
        """One GET, not counted in the request metrics; returns the value and the outcome."""
        raw = await self._call(kind, "get", lambda: self._client.get(self._key(kind, key)))
        return self._decode(raw)

    @staticmethod
    def _decode(raw: Any) -> tuple[Any | None, str]:
        if raw is _UNAVAILABLE:
            return None, "error"
        if raw is None:
            return None, "miss"
        try:
            envelope = json.loads(raw)
        except ValueError:
            log.debug("unreadable cache entry treated as a miss")
            return None, "miss"
        if not isinstance(envelope, dict) or envelope.get("v") != SCHEMA_VERSION:
            return None, "miss"
        value = envelope.get("value")
        return value, "miss" if value is None else "hit"

    async def _call(self, kind: str, op: str | None, command: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis command through the breaker; ``_UNAVAILABLE`` instead of raising.

        ``op`` names the latency histogram series; lock commands pass None.
        """
        if not self._breaker.allow():
            return _UNAVAILABLE
        started = time.perf_counter()
        try:
            result = await command()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return _UNAVAILABLE
        except BaseException:
            self._breaker.abandoned()
            raise
        finally:
            if op is not None:
                CACHE_OP_SECONDS.labels(kind, op).observe(time.perf_counter() - started)
        if self._breaker.succeeded():
            log.info("redis cache reachable again (%d errors unreported); breaker closed", self._unlogged_errors)
            self._last_error_log = -math.inf  # the next outage logs its first error at once
            self._unlogged_errors = 0
        return result

    def _failed(self, exc: BaseException) -> None:
        self._breaker.failed()
        self._unlogged_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            log.warning(
                "redis cache unavailable, serving misses (%d errors since last report, breaker %s): %r",
                self._unlogged_errors,
                self._breaker.state,
                exc,
            )
            self._last_error_log = now
            self._unlogged_errors = 0


def build_cache(settings: Settings) -> MemoryCache | RedisCache:
    """Redis when ``settings.redis_url`` is set (shared by replicas), else in-process."""
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            settings.cache_ttls(),
            socket_timeout=settings.redis_socket_timeout_s,
            lock_ms=settings.redis_lock_ms,
            lock_wait_s=settings.redis_lock_wait_s,
            breaker_failures=settings.redis_breaker_failures,
            breaker_reset_s=settings.redis_breaker_reset_s,
        )
    return MemoryCache(settings.cache_max_entries, settings.cache_ttls())
