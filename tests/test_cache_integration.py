"""The result cache in use: strategies and the app against a real Redis.

``tests/test_cache.py`` covers the stores themselves; here checklist-bon and
self-refine run through ``run_strategy`` (and ``/v1/solve``) with a real
``RedisCache``, and the tests check what reaches the generator: hits and misses
per kind, keys that change with the model and the prompt version, uncached
sampled critiques, ``use_cache=False``, a Redis outage mid-test, single-flight
under 20 concurrent identical runs, and two app replicas sharing one Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import pytest
import pytest_asyncio
import redis

from service.app import create_app
from service.cache import MemoryCache, RedisCache
from service.config import Settings
from strategies import prompts, run_strategy
from strategies.base import Budget, StrategyResult, Task
from strategies.protocol import GenerationRequest
from tests.conftest import free_port, start_redis_server, stop_redis_server
from tests.fake_openai import FakeOpenAI
from tests.scripted import ScriptedGenerator, is_checklist, is_feedback, is_judge, is_task_sample, match_template
from tests.servers import ServedApp

TTLS = Settings().cache_ttls()
ITEMS = ["Does the poem mention cats?", "Is the poem at most four lines?", "Does the poem rhyme?"]
CHECKLIST_REPLY = f" {ITEMS[0]}\n2. {ITEMS[1]}\n3. {ITEMS[2]}\n"
CANDIDATES = ["poem zero", "poem one", "poem two", "poem three"]
VERDICTS = {"poem zero": "YNN", "poem one": "YYN", "poem two": "YYY", "poem three": "NNN"}
N, K = len(CANDIDATES), len(ITEMS)
BON = {"n": N}


def unique_task(topic: str = "cats") -> Task:
    """A task no other test (or an earlier session on the shared Redis) has asked."""
    return Task(messages=({"role": "user", "content": f"Write a short poem about {topic} ({uuid.uuid4().hex})."},))


def bon_responder(request: GenerationRequest, i: int) -> str:
    if is_checklist(request):
        return CHECKLIST_REPLY
    if (fields := match_template(request, prompts.JUDGE_ITEM)) is not None:
        return " YES" if VERDICTS[fields["response"]][ITEMS.index(fields["item"])] == "Y" else " NO"
    return CANDIDATES[i]


def bon_generator(delay: float = 0.001) -> ScriptedGenerator:
    return ScriptedGenerator(bon_responder, delay=delay)


async def bon(task: Task, cache: Any, gen: ScriptedGenerator | None = None, **kwargs: Any) -> tuple[StrategyResult, ScriptedGenerator]:
    gen = gen or bon_generator()
    result = await run_strategy("checklist-bon", task, gen, params=BON, cache=cache, **kwargs)
    assert result.answer == "poem two" and not result.budget_limited
    return result, gen


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    ns = f"itest-{uuid.uuid4().hex}"
    yield ns
    with redis.Redis.from_url(redis_url) as client:
        for name in client.scan_iter(f"{ns}:*"):
            client.delete(name)


@pytest_asyncio.fixture
async def make_cache(redis_url: str, namespace: str) -> AsyncIterator[Callable[..., RedisCache]]:
    caches: list[RedisCache] = []

    def make(url: str = redis_url, **options: Any) -> RedisCache:
        options.setdefault("namespace", namespace)
        cache = RedisCache(url, TTLS, **options)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.aclose()


def stored_kinds(redis_url: str, namespace: str) -> dict[str, int]:
    """How many keys of each kind this test's namespace holds (locks excluded)."""
    counts: dict[str, int] = {}
    with redis.Redis.from_url(redis_url) as client:
        for name in client.scan_iter(f"{namespace}:*"):
            kind = name.decode().split(":")[1]
            if kind != "lock":
                counts[kind] = counts.get(kind, 0) + 1
    return counts


# -- 1. hits and misses per kind, through the strategies --------------------------------


async def test_checklist_bon_second_run_is_served_from_redis(make_cache, redis_url: str, namespace: str) -> None:
    cache, task = make_cache(), unique_task()
    first, gen1 = await bon(task, cache)
    assert (first.usage.cache_hits, first.usage.cache_misses) == (0, 1 + N * K)
    assert len(gen1.requests_where(is_checklist)) == 1 and len(gen1.requests_where(is_judge)) == N * K
    assert first.usage.backend_calls == 2 + N * K
    assert stored_kinds(redis_url, namespace) == {"checklist": 1, "judgment": N * K}

    # Another cache object on the same Redis (a restarted process) finds the values too.
    second, gen2 = await bon(task, make_cache())
    assert not gen2.requests_where(is_checklist) and not gen2.requests_where(is_judge)
    assert len(gen2.requests_where(is_task_sample)) == 1
    assert (second.usage.cache_hits, second.usage.cache_misses) == (1 + N * K, 0)
    assert second.usage.backend_calls == 1 < first.usage.backend_calls
    assert second.trace["checklist"] == first.trace["checklist"]
    assert [c["verdicts"] for c in second.trace["candidates"]] == [c["verdicts"] for c in first.trace["candidates"]]


async def test_model_id_and_prompt_version_are_part_of_the_keys(
    make_cache, monkeypatch: pytest.MonkeyPatch, redis_url: str, namespace: str
) -> None:
    cache, task = make_cache(), unique_task()
    await bon(task, cache, model_id="model-a")
    hit, _ = await bon(task, cache, model_id="model-a")
    assert hit.usage.cache_hits == 1 + N * K

    other_model, gen = await bon(task, cache, model_id="model-b")
    assert (other_model.usage.cache_hits, other_model.usage.cache_misses) == (0, 1 + N * K)
    assert len(gen.requests_where(is_checklist)) == 1 and len(gen.requests_where(is_judge)) == N * K

    monkeypatch.setattr(prompts, "PROMPT_VERSION", prompts.PROMPT_VERSION + "-bumped")
    new_prompts, gen = await bon(task, cache, model_id="model-a")
    assert (new_prompts.usage.cache_hits, new_prompts.usage.cache_misses) == (0, 1 + N * K)
    assert len(gen.requests_where(is_checklist)) == 1 and len(gen.requests_where(is_judge)) == N * K
    assert stored_kinds(redis_url, namespace) == {"checklist": 3, "judgment": 3 * N * K}

    # Once written under the new version, it hits again.
    again, gen = await bon(task, cache, model_id="model-a")
    assert again.usage.cache_hits == 1 + N * K and not gen.requests_where(is_checklist)


FEEDBACK_DONE = " 10\nIssues:\n- none\nVerdict: DONE"


def refine_generator() -> ScriptedGenerator:
    return ScriptedGenerator(lambda request, i: FEEDBACK_DONE if is_feedback(request) else "a draft")


async def test_self_refine_critique_cached_only_at_temperature_zero(
    make_cache, redis_url: str, namespace: str
) -> None:
    cache = make_cache()

    greedy_task = unique_task("greedy critiques")
    runs = []
    for _ in range(2):
        gen = refine_generator()
        result = await run_strategy("self-refine", greedy_task, gen, params={"max_rounds": 2}, cache=cache)
        assert result.answer == "a draft"
        runs.append((result.usage, len(gen.requests_where(is_feedback))))
    (first, first_critiques), (second, second_critiques) = runs
    assert (first.cache_hits, first.cache_misses, first_critiques) == (0, 1, 1)
    assert (second.cache_hits, second.cache_misses, second_critiques) == (1, 0, 0)
    assert stored_kinds(redis_url, namespace) == {"critique": 1}

    sampled_task = unique_task("sampled critiques")
    for _ in range(2):
        gen = refine_generator()
        result = await run_strategy("self-refine", sampled_task, gen,
                                    params={"max_rounds": 2, "feedback_temperature": 0.7}, cache=cache)
        assert (result.usage.cache_hits, result.usage.cache_misses) == (0, 0)
        (critique,) = gen.requests_where(is_feedback)
        assert critique.temperature == 0.7
    assert stored_kinds(redis_url, namespace) == {"critique": 1}  # nothing written for sampled critiques


async def test_use_cache_false_neither_reads_nor_writes(make_cache, redis_url: str, namespace: str) -> None:
    cache, task = make_cache(), unique_task()
    for _ in range(2):
        result, gen = await bon(task, cache, use_cache=False)
        assert (result.usage.cache_hits, result.usage.cache_misses) == (0, 0)
        assert len(gen.requests_where(is_checklist)) == 1 and len(gen.requests_where(is_judge)) == N * K
    assert stored_kinds(redis_url, namespace) == {}

    await bon(task, cache)  # fills the cache...
    result, gen = await bon(task, cache, use_cache=False)  # ...which an uncached run still ignores
    assert result.usage.cache_hits == 0 and len(gen.requests_where(is_checklist)) == 1


# -- 2. Redis stopped mid-test ----------------------------------------------------------------


async def test_strategies_survive_redis_dying_and_use_it_again_after_restart(make_cache) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis_server(port)
    try:
        cache = make_cache(url=url, socket_timeout=0.1, breaker_failures=2, breaker_reset_s=0.5)
        task = unique_task()
        await bon(task, cache)
        warm, _ = await bon(task, cache)
        assert warm.usage.cache_hits == 1 + N * K

        stop_redis_server(proc)
        for _ in range(4):
            started = time.monotonic()
            result, gen = await bon(task, cache)  # answers, no exception
            assert time.monotonic() - started < 1.0
            assert result.usage.cache_hits == 0 and result.usage.cache_misses == 1 + N * K
            assert len(gen.requests_where(is_checklist)) == 1 and len(gen.requests_where(is_judge)) == N * K
            assert cache.breaker_state == "open"

        proc = start_redis_server(port)  # empty: no persistence
        await asyncio.sleep(0.6)
        assert cache.breaker_state == "half_open"
        recovered, gen = await bon(task, cache)
        assert cache.breaker_state == "closed"
        assert recovered.usage.cache_hits == 0 and len(gen.requests_where(is_checklist)) == 1

        written, gen = await bon(task, cache)  # the recovered run wrote its values again
        assert (written.usage.cache_hits, written.usage.cache_misses) == (1 + N * K, 0)
        assert not gen.requests_where(is_checklist) and not gen.requests_where(is_judge)
    finally:
        stop_redis_server(proc)


# -- 3. single-flight through the strategy --------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_twenty_concurrent_identical_runs_write_one_checklist(store: str, make_cache) -> None:
    cache = MemoryCache(1000, TTLS) if store == "memory" else make_cache()
    task = unique_task()
    gen = bon_generator(delay=0.05)
    results = await asyncio.gather(*(bon(task, cache, gen) for _ in range(20)))
    assert len(gen.requests_where(is_checklist)) == 1
    assert len(gen.requests_where(is_judge)) == N * K
    assert len(gen.requests_where(is_task_sample)) == 20
    assert sum(r.usage.cache_misses for r, _ in results) == 1 + N * K
    assert sum(r.usage.cache_hits for r, _ in results) == 19 * (1 + N * K)
    assert {tuple(c["item"] for c in r.trace["checklist"]) for r, _ in results} == {tuple(ITEMS)}


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_concurrent_runs_budget_stop_is_not_inherited_by_its_waiters(store: str, make_cache) -> None:
    """Single-flight shares one run's computation with identical concurrent runs; when that run
    hits *its* budget mid-computation, the others must carry on under their own budgets."""
    cache = MemoryCache(1000, TTLS) if store == "memory" else make_cache()
    task = unique_task()
    gen = bon_generator(delay=0.02)
    small, full = await asyncio.gather(
        run_strategy("checklist-bon", task, gen, params=BON, cache=cache, budget=Budget(max_calls=3)),
        run_strategy("checklist-bon", task, gen, params=BON, cache=cache),
    )
    assert small.budget_limited and "max_calls=3" in small.stop_reason
    assert not full.budget_limited and full.stop_reason == "completed"
    assert full.answer == "poem two"


# -- 4. two app replicas sharing one Redis ------------------------------------------------------


def fake_checklist_requests(fake: FakeOpenAI) -> list[Any]:
    return [r for r in fake.generation_requests
            if match_template(r.body["messages"][-1]["content"], prompts.CHECKLIST) is not None]


def fake_judge_requests(fake: FakeOpenAI) -> list[Any]:
    return [r for r in fake.generation_requests
            if match_template(r.body["messages"][-1]["content"], prompts.JUDGE_ITEM) is not None]


@pytest.fixture(scope="module")
def replicas(redis_url: str) -> Iterator[tuple[FakeOpenAI, ServedApp, ServedApp]]:
    with FakeOpenAI(name="fake") as fake:
        settings = Settings(backend_urls=fake.url, redis_url=redis_url, model="fake-model", backend_max_retries=0)
        with ServedApp(create_app(settings), name="replica-1") as one, \
                ServedApp(create_app(settings), name="replica-2") as two:
            yield fake, one, two


def solve_body(instruction: str) -> dict[str, Any]:
    return {"task": {"messages": [{"role": "user", "content": instruction}]}, "strategy": "checklist-bon",
            "params": {"n": 3}}


def test_second_replica_reuses_what_the_first_computed(replicas) -> None:
    fake, one, two = replicas
    fake.reset()
    body = solve_body(f"Explain caching in one sentence ({uuid.uuid4().hex}).")

    first = httpx.post(one.url + "/v1/solve", json=body, timeout=30)
    assert first.status_code == 200, first.text
    assert len(fake_checklist_requests(fake)) == 1
    first_usage = first.json()["usage"]
    # The fake's default reply is no numbered list: one fallback-parsed item, cached all the same.
    k = len(first.json()["trace"]["checklist"])
    assert first_usage["cache_hits"] == 0 and first_usage["cache_misses"] == 1 + 3 * k

    before = len(fake.generation_requests)
    second = httpx.post(two.url + "/v1/solve", json=body, timeout=30)
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    assert usage["cache_hits"] == 1 + 3 * k and usage["cache_misses"] == 0
    from_two = fake.generation_requests[before:]
    assert len(from_two) == usage["backend_calls"] == 1  # only the n=3 candidates
    assert len(fake_checklist_requests(fake)) == 1
    assert second.json()["trace"]["checklist"] == first.json()["trace"]["checklist"]


async def test_replicas_racing_on_one_task_write_the_checklist_once(replicas) -> None:
    fake, one, two = replicas
    fake.reset()
    fake.delay = 0.2  # both replicas are mid-request at once
    body = solve_body(f"Name three prime numbers ({uuid.uuid4().hex}).")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answers = await asyncio.gather(client.post(one.url + "/v1/solve", json=body),
                                           client.post(two.url + "/v1/solve", json=body))
    finally:
        fake.delay = 0.0
    assert [a.status_code for a in answers] == [200, 200]
    k = len(answers[0].json()["trace"]["checklist"])
    assert len(fake_checklist_requests(fake)) == 1  # the cross-replica lock: one computes, one waits
    assert len(fake_judge_requests(fake)) == 3 * k
    usages = [a.json()["usage"] for a in answers]
    assert sum(u["cache_misses"] for u in usages) == 1 + 3 * k
    assert sum(u["cache_hits"] for u in usages) == 1 + 3 * k
