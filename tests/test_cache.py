"""Cache stores against a real Redis: TTLs, LRU, single-flight, cross-replica lock, outages."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
import redis
from prometheus_client import REGISTRY

from service.cache import MemoryCache, RedisCache, build_cache

pytestmark = pytest.mark.asyncio

TTLS = {"short": 0.3, "long": 60.0, "checklist": 60.0, "critique": 60.0}
DEAD_URL = "redis://127.0.0.1:1/0"
MakeRedis = Callable[..., RedisCache]


class RedisServer:
    """A private redis-server that a test may kill and restart on the same port."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server binary")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2) as client:
                    client.ping()
                return
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex}"
    yield ns
    with redis.Redis.from_url(redis_url) as client:
        for name in client.scan_iter(f"{ns}*"):
            client.delete(name)


@pytest_asyncio.fixture
async def make_redis(redis_url: str, namespace: str) -> AsyncIterator[MakeRedis]:
    caches: list[RedisCache] = []

    def make(url: str = redis_url, ttls: dict[str, float] = TTLS, **options: Any) -> RedisCache:
        options.setdefault("namespace", namespace)
        cache = RedisCache(url, ttls, **options)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.aclose()


@pytest_asyncio.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, make_redis: MakeRedis) -> AsyncIterator[MemoryCache | RedisCache]:
    if request.param == "redis":
        yield make_redis()
        return
    memory = MemoryCache(100, TTLS)
    yield memory
    await memory.aclose()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


def counter() -> tuple[list[int], Callable[[Any], Callable[[], Awaitable[Any]]]]:
    """A call count and a factory of computes that count, wait a little and return a value."""
    calls = [0]

    def compute_returning(value: Any, delay: float = 0.05) -> Callable[[], Awaitable[Any]]:
        async def compute() -> Any:
            calls[0] += 1
            await asyncio.sleep(delay)
            return value

        return compute

    return calls, compute_returning


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def timed(awaitable: Awaitable[Any], limit_s: float = 1.0) -> Any:
    started = time.monotonic()
    result = await awaitable
    assert time.monotonic() - started < limit_s
    return result


# -- both stores


async def test_hit_miss_and_ttl_per_kind(cache: MemoryCache | RedisCache) -> None:
    assert await cache.get("short", "k") is None
    await cache.put("short", "k", {"x": 1})
    await cache.put("long", "k", [1, 2])
    await cache.put("long", "override", "soon gone", ttl=0.3)
    assert await cache.get("short", "k") == {"x": 1}
    assert await cache.get("long", "override") == "soon gone"
    await asyncio.sleep(0.4)
    assert await cache.get("short", "k") is None
    assert await cache.get("long", "override") is None
    assert await cache.get("long", "k") == [1, 2]


async def test_get_many(cache: MemoryCache | RedisCache) -> None:
    await cache.put("checklist", "a", {"a": 1})
    await cache.put("checklist", "c", ["c"])
    assert await cache.get_many("checklist", ["a", "b", "c"]) == [{"a": 1}, None, ["c"]]
    assert await cache.get_many("checklist", []) == []


async def test_kinds_do_not_collide(cache: MemoryCache | RedisCache) -> None:
    await cache.put("checklist", "same", 1)
    await cache.put("critique", "same", 2)
    assert await cache.get("checklist", "same") == 1
    assert await cache.get("critique", "same") == 2


async def test_cached_values_cannot_be_mutated_by_callers(cache: MemoryCache | RedisCache) -> None:
    value = {"items": [1]}
    await cache.put("checklist", "k", value)
    value["items"].append(2)
    read = await cache.get("checklist", "k")
    read["items"].append(3)
    assert await cache.get("checklist", "k") == {"items": [1]}


async def test_unknown_kind_is_a_programming_error(cache: MemoryCache | RedisCache) -> None:
    with pytest.raises(ValueError, match="no TTL configured"):
        await cache.put("nope", "k", 1)


async def test_single_flight(cache: MemoryCache | RedisCache) -> None:
    calls, compute_returning = counter()
    compute = compute_returning({"answer": 42})
    results = await asyncio.gather(*(cache.get_or_compute("checklist", "sf", compute) for _ in range(20)))
    assert calls[0] == 1
    assert [value for value, _ in results] == [{"answer": 42}] * 20
    assert sorted(hit for _, hit in results) == [False] + [True] * 19
    results[1][0]["answer"] = 0  # each caller got its own copy
    assert results[2][0] == {"answer": 42}
    assert await cache.get_or_compute("checklist", "sf", compute) == ({"answer": 42}, True)
    assert calls[0] == 1


async def test_single_flight_failure_reaches_every_waiter_and_caches_nothing(
    cache: MemoryCache | RedisCache,
) -> None:
    calls = [0]

    async def boom() -> Any:
        calls[0] += 1
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(cache.get_or_compute("checklist", "fail", boom) for _ in range(10)), return_exceptions=True
    )
    assert calls[0] == 1
    assert all(isinstance(result, RuntimeError) for result in results)
    assert await cache.get("checklist", "fail") is None
    _, compute_returning = counter()
    assert await cache.get_or_compute("checklist", "fail", compute_returning("ok")) == ("ok", False)


async def test_cancelled_leader_hands_over_to_a_waiter(cache: MemoryCache | RedisCache) -> None:
    started = asyncio.Event()

    async def hangs() -> Any:
        started.set()
        await asyncio.sleep(30)

    _, compute_returning = counter()
    leader = asyncio.create_task(cache.get_or_compute("checklist", "cancel", hangs))
    await started.wait()
    waiter = asyncio.create_task(cache.get_or_compute("checklist", "cancel", compute_returning("mine")))
    await asyncio.sleep(0.01)
    leader.cancel()
    # Not after lock_wait_s: a cancelled Redis leader releases its lock too.
    assert await asyncio.wait_for(waiter, 1.0) == ("mine", False)
    with pytest.raises(asyncio.CancelledError):
        await leader


# -- memory only


async def test_memory_lru_evicts_least_recently_used() -> None:
    memory = MemoryCache(3, TTLS)
    for key in "abc":
        await memory.put("long", key, key)
    assert await memory.get("long", "a") == "a"  # a is now the most recent
    await memory.put("long", "d", "d")
    assert await memory.get_many("long", ["a", "b", "c", "d"]) == ["a", None, "c", "d"]


# -- redis only


async def test_two_replicas_compute_once_and_share_values(
    make_redis: MakeRedis, sync_redis: redis.Redis, namespace: str
) -> None:
    a, b = make_redis(), make_redis()
    calls, compute_returning = counter()
    compute = compute_returning({"shared": True}, delay=0.2)
    results = await asyncio.gather(
        *(replica.get_or_compute("checklist", "x", compute) for replica in [a, b] * 5)
    )
    assert calls[0] == 1
    assert [value for value, _ in results] == [{"shared": True}] * 10
    assert sorted(hit for _, hit in results) == [False] + [True] * 9
    assert not sync_redis.exists(f"{namespace}:lock:checklist:x")

    await a.put("critique", "p", {"from": "a"})
    assert await b.get("critique", "p") == {"from": "a"}


async def test_lock_loser_takes_over_at_once_when_the_winner_fails(make_redis: MakeRedis) -> None:
    a, b = make_redis(lock_wait_s=5.0), make_redis(lock_wait_s=5.0)

    async def fails() -> Any:
        await asyncio.sleep(0.1)
        raise RuntimeError("winner failed")

    winner = asyncio.create_task(a.get_or_compute("checklist", "y", fails))
    await asyncio.sleep(0.03)  # a holds the lock
    _, compute_returning = counter()
    assert await timed(b.get_or_compute("checklist", "y", compute_returning("fresh"))) == ("fresh", False)
    with pytest.raises(RuntimeError):
        await winner


async def test_stale_lock_is_waited_out_then_ignored(
    make_redis: MakeRedis, sync_redis: redis.Redis, namespace: str
) -> None:
    sync_redis.set(f"{namespace}:lock:checklist:z", "a dead replica", px=10_000)
    replica = make_redis(lock_wait_s=0.3)
    _, compute_returning = counter()
    started = time.monotonic()
    assert await replica.get_or_compute("checklist", "z", compute_returning("mine")) == ("mine", False)
    assert 0.3 <= time.monotonic() - started < 1.0


async def test_lock_release_spares_a_lock_another_replica_took(
    make_redis: MakeRedis, sync_redis: redis.Redis, namespace: str
) -> None:
    lock = f"{namespace}:lock:checklist:slow"
    replica = make_redis(lock_ms=100)

    async def slow() -> Any:
        await asyncio.sleep(0.25)  # outlives the lock
        sync_redis.set(lock, "other replica", px=10_000)
        return "v"

    assert await replica.get_or_compute("checklist", "slow", slow) == ("v", False)
    assert sync_redis.get(lock) == b"other replica"


async def test_unknown_schema_version_or_garbage_is_a_miss(
    make_redis: MakeRedis, sync_redis: redis.Redis, namespace: str
) -> None:
    sync_redis.set(f"{namespace}:checklist:old", json.dumps({"v": 0, "value": "old shape"}))
    sync_redis.set(f"{namespace}:checklist:junk", b"\x00not json")
    sync_redis.set(f"{namespace}:checklist:ok", json.dumps({"v": 1, "value": "current"}))
    replica = make_redis()
    assert await replica.get("checklist", "old") is None
    assert await replica.get_many("checklist", ["old", "junk", "ok"]) == [None, None, "current"]
    await replica.put("checklist", "mine", [1])
    assert json.loads(sync_redis.get(f"{namespace}:checklist:mine")) == {"v": 1, "value": [1]}
    assert 59_000 < sync_redis.pttl(f"{namespace}:checklist:mine") <= 60_000


async def test_redis_dies_mid_test_then_breaker_opens_and_recovers(
    own_redis: RedisServer, make_redis: MakeRedis
) -> None:
    replica = make_redis(url=own_redis.url, socket_timeout=0.25, breaker_failures=3, breaker_reset_s=0.5)
    await replica.put("checklist", "k", 1)
    assert await replica.get("checklist", "k") == 1

    own_redis.kill()
    _, compute_returning = counter()
    assert await timed(replica.get("checklist", "k")) is None
    await timed(replica.put("checklist", "k2", 2))
    assert await timed(replica.get_or_compute("checklist", "k3", compute_returning("computed"))) == (
        "computed",
        False,
    )
    assert replica.breaker_state == "open"

    calls_made = sample("ponder_cache_op_seconds_count", kind="checklist", op="get")
    assert await timed(replica.get("checklist", "k"), limit_s=0.05) is None
    assert sample("ponder_cache_op_seconds_count", kind="checklist", op="get") == calls_made  # no network

    await asyncio.sleep(0.55)
    assert replica.breaker_state == "half_open"
    assert await timed(replica.get("checklist", "k")) is None  # the probe fails...
    assert replica.breaker_state == "open"  # ...and re-opens it

    own_redis.start()
    await asyncio.sleep(0.55)
    assert await timed(replica.get("checklist", "k")) is None  # the probe; the new server is empty
    assert replica.breaker_state == "closed"
    await replica.put("checklist", "k", 5)
    assert await replica.get("checklist", "k") == 5


async def test_dead_redis_from_the_start_still_computes(make_redis: MakeRedis) -> None:
    replica = make_redis(url=DEAD_URL)
    calls, compute_returning = counter()
    for i in range(8):
        assert await timed(replica.get_or_compute("checklist", f"k{i}", compute_returning(i, delay=0))) == (
            i,
            False,
        )
    assert calls[0] == 8
    assert replica.breaker_state == "open"


async def test_metrics_count_hits_misses_errors_and_latency(make_redis: MakeRedis) -> None:
    kind = f"metrics-{uuid.uuid4().hex}"
    ttls = {kind: 60.0}

    dead = make_redis(url=DEAD_URL, ttls=ttls, breaker_failures=100)
    await dead.get(kind, "x")
    await dead.get_many(kind, ["a", "b"])
    await dead.put(kind, "x", 1)
    assert sample("ponder_cache_requests_total", kind=kind, result="error") == 4

    live = make_redis(ttls=ttls)
    assert await live.get(kind, "y") is None
    await live.put(kind, "y", 1)
    assert await live.get(kind, "y") == 1
    assert sample("ponder_cache_requests_total", kind=kind, result="miss") == 1
    assert sample("ponder_cache_requests_total", kind=kind, result="hit") == 1
    assert sample("ponder_cache_op_seconds_count", kind=kind, op="get") == 3
    assert sample("ponder_cache_op_seconds_count", kind=kind, op="get_many") == 1
    assert sample("ponder_cache_op_seconds_count", kind=kind, op="put") == 2

    memory = MemoryCache(10, ttls)
    assert await memory.get(kind, "z") is None
    await memory.put(kind, "z", 1)
    assert await memory.get(kind, "z") == 1
    assert sample("ponder_cache_requests_total", kind=kind, result="miss") == 2
    assert sample("ponder_cache_requests_total", kind=kind, result="hit") == 2


async def test_redis_errors_are_logged_once_per_burst(
    make_redis: MakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    dead = make_redis(url=DEAD_URL, breaker_failures=100)
    with caplog.at_level(logging.WARNING, logger="ponder.cache"):
        for _ in range(20):
            assert await dead.get("checklist", "k") is None
    assert len([r for r in caplog.records if r.name == "ponder.cache"]) == 1


async def test_caches_satisfy_the_protocol_and_build_from_settings(redis_url: str) -> None:
    from service.config import Settings
    from strategies.protocol import Cache

    memory = build_cache(Settings(redis_url=None))
    shared = build_cache(Settings(redis_url=redis_url))
    try:
        assert isinstance(memory, MemoryCache) and isinstance(memory, Cache)
        assert isinstance(shared, RedisCache) and isinstance(shared, Cache)
        assert shared.breaker_state == "closed"
    finally:
        await memory.aclose()
        await shared.aclose()
