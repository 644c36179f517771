"""Limits that hold (issue 13): admission control, request caps, a surface no caller can
blow up (4xx in the OpenAI schema, never 5xx), runs tied to their API key, nothing
internal published.

The app runs over a scripted backend that holds every generation until the test opens
its gate, so "in flight" is exact and nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import httpx
import pytest

from service import cli
from service.app import create_app
from service.backends import BackendError, BackendTimeout
from service.config import Settings
from service.runtime import Runtime
from strategies.protocol import Generation, GenerationRequest
from tests.scripted import DictCache, ScriptedGenerator, request_text
from tests.servers import assert_openai_error

KEY_A, KEY_B = "key-a", "key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
MAX_RUNS, MAX_PER_KEY = 8, 5
INTERNAL = "http://ops:s3cret@10.1.2.3:8000"


class GatedBackend:
    """The slice of HTTPBackend the API uses, over a scripted generator whose answers
    wait for ``gate``; prompts naming FAIL/TIMEOUT raise the backend errors HTTPBackend
    raises, with its internal URL in the message."""

    class config:
        supports_seed = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.generator = ScriptedGenerator(lambda r, i: f"The answer is {i}.")

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       return_exceptions: bool = False) -> list[Generation | BaseException]:
        text = " ".join(request_text(r) for r in requests)
        error = None
        if "FAIL-BACKEND" in text:
            error = BackendError(f"backend {INTERNAL} failed: connection refused")
        elif "TIMEOUT-BACKEND" in text:
            error = BackendTimeout(f"backend {INTERNAL} did not answer within 300s")
        if error is not None:
            if return_exceptions:
                return [error] * len(requests)
            raise error
        while not self.gate.is_set():
            await asyncio.sleep(0.005)
        return await self.generator.generate(requests, return_exceptions=return_exceptions)

    async def request(self, method: str, path: str, body=None, *, decode: bool = True):
        return b'{"object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}'

    async def default_model(self) -> str:
        return "scripted"

    async def ready(self) -> dict[str, bool]:
        return {INTERNAL: True}

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def served():
    backend = GatedBackend()
    settings = Settings(backend_urls="http://unused", model="scripted", api_keys=f"{KEY_A},{KEY_B}",
                        max_concurrent_runs=MAX_RUNS, max_concurrent_runs_per_key=MAX_PER_KEY,
                        max_request_bytes=64 * 1024, max_messages=4, max_tokens_per_sample=1024,
                        max_checklist_items=8, admission_retry_after_s=3)
    runtime = Runtime(settings=settings, backend=backend, cache=DictCache())
    from tests.servers import ServedApp
    with ServedApp(create_app(runtime=runtime), name="ponder-surface") as app:
        yield app, backend


@pytest.fixture
def http(served):
    app, backend = served
    backend.gate.set()
    with httpx.Client(base_url=app.url, timeout=30) as client:
        yield client
    backend.gate.set()



def wait_idle(app, timeout: float = 10) -> None:
    admission = app_state(app).admission
    deadline = time.monotonic() + timeout
    while admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert admission.in_flight == 0


def app_state(app):
    return app.app.state


RUN = {"task": {"prompt": "2+2="}, "strategy": "self-consistency", "params": {"k": 2}}


# -- admission control ----------------------------------------------------------------------


def test_a_flood_of_runs_gets_429_beyond_the_bound_and_pass_through_still_answers(served, http) -> None:
    app, backend = served
    backend.gate.clear()  # every run stays in flight until the gate opens
    keys = [A if i % 2 == 0 else B for i in range(300)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda h: http.post("/v1/runs", json=RUN, headers=h), keys))
    accepted = [r for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code == 429]
    assert len(accepted) == min(MAX_RUNS, 2 * MAX_PER_KEY) and len(accepted) + len(refused) == 300
    for reply in refused[:5]:
        error = assert_openai_error(reply, 429)
        assert error["type"] == "rate_limit_error" and reply.headers["retry-after"] == "3"
    # A pass-through request takes no run slot: it is answered while the flood holds them all.
    passthrough = http.post("/v1/completions", json={"model": "scripted", "prompt": "hi"}, headers=A)
    assert passthrough.status_code == 200
    # ... and so is a sync strategy request: refused at once, never queued.
    started = time.monotonic()
    assert_openai_error(http.post("/v1/solve", json=RUN, headers=B), 429)
    assert time.monotonic() - started < 2
    backend.gate.set()
    wait_idle(app)
    assert http.post("/v1/runs", json=RUN, headers=A).status_code == 202  # slots came back
    wait_idle(app)


def test_one_key_cannot_take_every_slot(served, http) -> None:
    app, backend = served
    backend.gate.clear()
    own = [http.post("/v1/runs", json=RUN, headers=A).status_code for _ in range(MAX_PER_KEY + 2)]
    assert own == [202] * MAX_PER_KEY + [429, 429]
    assert http.post("/v1/runs", json=RUN, headers=B).status_code == 202  # the other key still gets in
    # proxy n runs count as n: B has 1 + 5 > MAX_PER_KEY
    body = {"model": "self-consistency:scripted", "prompt": "x", "n": 5, "strategy_params": {"k": 1}}
    assert_openai_error(http.post("/v1/completions", json=body, headers=B), 429)
    backend.gate.set()
    wait_idle(app)


# -- runs belong to their key -----------------------------------------------------------------


def test_another_keys_run_is_404(http, served) -> None:
    app, _ = served
    run_id = http.post("/v1/runs", json=RUN, headers=A).json()["id"]
    assert http.get(f"/v1/runs/{run_id}", headers=A).status_code == 200
    assert "owner" not in http.get(f"/v1/runs/{run_id}", headers=A).json()
    assert_openai_error(http.get(f"/v1/runs/{run_id}", headers=B), 404, "run_id")
    assert_openai_error(http.delete(f"/v1/runs/{run_id}", headers=B), 404, "run_id")
    assert_openai_error(http.get(f"/v1/runs/{run_id}/events", headers=B), 404, "run_id")
    wait_idle(app)


def test_run_events_are_bounded(http, served) -> None:
    app, _ = served
    settings = app_state(app).runtime.settings
    body = {"task": {"prompt": "2+2="}, "strategy": "self-consistency",
            "params": {"k": 64, "adaptive": True, "wave_size": 1, "confidence": 0.99}}
    settings_events = settings.run_max_events
    settings.run_max_events = 5
    try:
        run_id = http.post("/v1/runs", json=body, headers=A).json()["id"]
        wait_idle(app)
        record = http.get(f"/v1/runs/{run_id}", headers=A).json()
    finally:
        settings.run_max_events = settings_events
    assert record["status"] == "succeeded"
    assert record["events"] == 5  # four progress events, then the terminal one always fits
    events = [line for line in http.get(f"/v1/runs/{run_id}/events", headers=A).text.splitlines()
              if line.startswith("event: ")]
    assert events[-1] == "event: done"


# -- odd inputs answer 4xx in the OpenAI schema ------------------------------------------------


SURROGATE_TEXT = b'"tell me \\ud800 more"'


@pytest.mark.parametrize("strategy,params", [
    ("self-refine", b'{}'), ("checklist-bon", b'{"n": 2}'), ("best-of-n", b'{"n": 2}'),
    ("self-consistency", b'{"k": 2, "aggregate": "llm"}'), ("mcts", b'{"simulations": 1}')])
def test_a_lone_surrogate_in_user_text_is_400(http, strategy: str, params: bytes) -> None:
    chat = (b'{"model": "scripted", "strategy": "' + strategy.encode() + b'", "strategy_params": ' + params
            + b', "messages": [{"role": "user", "content": ' + SURROGATE_TEXT + b'}]}')
    reply = http.post("/v1/chat/completions", content=chat, headers={**A, "content-type": "application/json"})
    assert_openai_error(reply, 400, "messages.0.content")
    solve = (b'{"strategy": "' + strategy.encode() + b'", "params": ' + params
             + b', "task": {"prompt": ' + SURROGATE_TEXT + b'}}')
    reply = http.post("/v1/solve", content=solve, headers={**A, "content-type": "application/json"})
    assert_openai_error(reply, 400, "task.prompt")


def test_a_non_ascii_bearer_token_is_401(http) -> None:
    reply = http.get("/v1/models", headers={"Authorization": "Bearer \u00fc\u00df".encode("latin-1")})
    assert_openai_error(reply, 401)
    reply = http.get("/v1/models", headers={"Authorization": "Bearer \u00b2".encode("latin-1")})
    assert_openai_error(reply, 401)


def test_an_odd_last_event_id_is_400(http, served) -> None:
    app, _ = served
    run_id = http.post("/v1/runs", json=RUN, headers=A).json()["id"]
    wait_idle(app)
    reply = http.get(f"/v1/runs/{run_id}/events", headers={**A, "Last-Event-ID": "\u00b2".encode("latin-1")})
    assert_openai_error(reply, 400, "Last-Event-ID")
    assert http.get(f"/v1/runs/{run_id}/events", headers={**A, "Last-Event-ID": "0"}).status_code == 200


def test_request_caps(http) -> None:
    big = {"model": "scripted", "prompt": "x" * (65 * 1024)}
    error = assert_openai_error(http.post("/v1/completions", json=big, headers=A), 413)
    assert "PONDER_MAX_REQUEST_BYTES" in error["message"]

    def chunks():
        for _ in range(100):
            yield b"x" * 1024
    chunked = http.post("/v1/completions", content=chunks(), headers={**A, "content-type": "application/json"})
    assert_openai_error(chunked, 413)

    many = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}] * 5}
    assert_openai_error(http.post("/v1/chat/completions", json=many, headers=A), 400, "messages")
    solve_many = {"task": {"messages": [{"role": "user", "content": "hi"}] * 5}}
    assert_openai_error(http.post("/v1/solve", json=solve_many, headers=A), 400, "task.messages")
    for strategy, params, field in [
        ("checklist-bon", {"checklist": [f"item {i}?" for i in range(9)]}, "checklist"),
        ("checklist-bon", {"max_items": 9}, "max_items"),
        ("checklist-bon", {"checklist_max_tokens": 2000}, "checklist_max_tokens"),
        ("self-refine", {"feedback_max_tokens": 2000}, "feedback_max_tokens"),
        ("self-consistency", {"n_per_request": 100}, "n_per_request"),
    ]:
        body = {"task": {"prompt": "x"}, "strategy": strategy, "params": params}
        assert_openai_error(http.post("/v1/solve", json=body, headers=A), 400, field)


def test_a_budget_too_small_for_one_answer_is_400_before_202(http) -> None:
    body = {**RUN, "task": {"prompt": "word " * 400}, "budget": {"max_tokens": 100}}
    assert_openai_error(http.post("/v1/runs", json=body, headers=A), 400, "budget.max_tokens")
    stream = {"model": "self-consistency:scripted", "prompt": "word " * 400, "stream": True,
              "budget": {"max_tokens": 100}}
    assert_openai_error(http.post("/v1/completions", json=stream, headers=A), 400, "budget.max_tokens")


# -- nothing internal is published --------------------------------------------------------------


def test_backend_failures_do_not_name_internal_urls(http, served) -> None:
    app, _ = served
    for word, status in (("FAIL-BACKEND", 503), ("TIMEOUT-BACKEND", 504)):
        body = {"task": {"prompt": word}, "strategy": "self-consistency", "params": {"k": 1}}
        reply = http.post("/v1/solve", json=body, headers=A)
        assert_openai_error(reply, status)
        assert "10.1.2.3" not in reply.text and "s3cret" not in reply.text
        run_id = http.post("/v1/runs", json=body, headers=A).json()["id"]
        wait_idle(app)
        record = http.get(f"/v1/runs/{run_id}", headers=A)
        assert record.json()["status"] == "failed" and "10.1.2.3" not in record.text
        stream = {"model": "self-consistency:scripted", "prompt": word, "stream": True}
        assert "10.1.2.3" not in http.post("/v1/completions", json=stream, headers=A).text


def test_readyz_is_open_but_publishes_no_backend_address(http) -> None:
    reply = http.get("/readyz")
    assert reply.status_code == 200 and reply.json()["backends"] == [True]
    assert "10.1.2.3" not in reply.text and "s3cret" not in reply.text


def test_open_routes(http, served) -> None:
    app, _ = served
    assert http.get("/healthz").status_code == 200
    assert_openai_error(http.get("/metrics"), 401)  # behind the key by default
    assert http.get("/metrics", headers=A).status_code == 200
    assert_openai_error(http.get("/v1/strategies"), 401)
    settings = app_state(app).runtime.settings
    settings.metrics_public = True
    try:
        assert http.get("/metrics").status_code == 200
    finally:
        settings.metrics_public = False


def test_junk_strategy_names_mint_no_metric_series(http) -> None:
    def series() -> list[str]:
        text = http.get("/metrics", headers=A).text
        return [line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")]

    def junk(i: int) -> None:
        assert http.post("/v1/solve", json={"task": {"prompt": "x"}, "strategy": f"junk-{i}"},
                         headers=A).status_code == 400
        assert http.post("/v1/chat/completions", headers=A, json={
            "model": "scripted", "strategy": f"junk-{i}", "messages": [{"role": "user", "content": "x"}]}
        ).status_code == 400

    junk(-1)  # the one "invalid" series per route and status exists from here on
    before = series()
    size_before = len(http.get("/metrics", headers=A).content)
    for i in range(150):  # 300 requests: 150 on each route
        junk(i)
    after = series()
    size_after = len(http.get("/metrics", headers=A).content)
    print(f"\n[metrics] series {len(before)} -> {len(after)}, bytes {size_before} -> {size_after}")
    assert set(after) == set(before)
    assert not any("junk" in s for s in after)


def test_binding_every_interface_without_a_key_warns(monkeypatch, caplog) -> None:
    assert Settings().exposure_warning("0.0.0.0")
    assert Settings(api_keys="k").exposure_warning("0.0.0.0") is None
    assert Settings().exposure_warning("127.0.0.1") is None
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING, logger="ponder"):
        cli._serve(type("Args", (), {"host": "0.0.0.0", "port": 8123})(), Settings(backend_urls="http://x"))
    assert any("NO API key" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# -- run records: bounded, throttled, not kept in memory ----------------------------------------


class CountingCache(DictCache):
    def __init__(self) -> None:
        super().__init__()
        self.puts: list[tuple[str, str]] = []

    async def put(self, kind: str, key: str, value, ttl=None) -> None:
        self.puts.append((kind, key))
        await super().put(kind, key, value, ttl)


async def test_run_records_are_saved_throttled_bounded_and_leave_memory(monkeypatch) -> None:
    from service.api import runs as runs_module
    from service.api.protocol import SolveRequest
    from service.api.serving import StrategyRunner

    monkeypatch.setattr(runs_module, "LOCAL_KEEP_S", 0.05)
    settings = Settings(backend_urls="http://unused", model="scripted", run_save_interval_s=0.5,
                        run_max_record_bytes=4096, run_max_event_bytes=256)
    backend = GatedBackend()
    backend.generator.delay = 0.06  # a wave of one sample at a time: about 0.7 s of events
    backend.generator.responder = lambda request, i: "Let me think. " * 40 + "The answer is 4."  # a big trace
    cache = CountingCache()
    manager = runs_module.RunManager(StrategyRunner(Runtime(settings=settings, backend=backend, cache=cache)),
                                     cache)
    body = SolveRequest(task={"prompt": "2+2= " + "pad " * 400}, strategy="self-consistency",
                        params={"k": 20, "adaptive": True, "wave_size": 1, "confidence": 0.999999})
    record = await manager.create(body)
    await manager.local[record["id"]].task
    saves = [key for kind, key in cache.puts if key == record["id"]]
    events = cache.store[("run", record["id"])]["events"]
    assert len(events) >= 10  # started, a votes event per wave, done ...
    assert len(saves) <= 4  # ... but the record was written only on 202, about once per 0.5 s, and at the end
    saved = cache.store[("run", record["id"])]
    assert saved["status"] == "succeeded" and saved["result"]["trace"]["truncated"] is True
    assert all(len(json.dumps(e["data"])) <= 256 for e in events)
    assert any(e["data"].get("truncated") for e in events)
    await asyncio.sleep(0.1)
    assert record["id"] not in manager.local  # gone from memory; the cache store still answers
    assert (await manager.get(record["id"]))["status"] == "succeeded"


def test_admission_without_keys_applies_the_global_bound_only() -> None:
    from service.api.admission import Admission
    from service.api.errors import APIError

    admission = Admission(max_runs=4, max_runs_per_client=1, retry_after_s=1)
    slots = [admission.acquire(None) for _ in range(4)]  # no keys: nobody to tell apart
    with pytest.raises(APIError) as refused:
        admission.acquire(None)
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "1"}
    slots[0].release()
    slots[0].release()  # idempotent: gives back one slot, once
    assert admission.in_flight == 3
    admission.acquire("principal")
    with pytest.raises(APIError):
        admission.acquire(None)


def test_a_streamed_strategy_gives_its_slots_back_however_it_ends(served, http) -> None:
    app, backend = served
    body = {"model": "self-consistency:scripted", "prompt": "x", "n": 2, "stream": True,
            "strategy_params": {"k": 1}}
    with http.stream("POST", "/v1/completions", json=body, headers=A) as reply:
        assert reply.status_code == 200 and [l for l in reply.iter_lines() if l][-1] == "data: [DONE]"
    wait_idle(app)
    backend.gate.clear()  # the client hangs up while the runs wait on the backend
    with http.stream("POST", "/v1/completions", json=body, headers=A) as reply:
        assert reply.status_code == 200
        assert app_state(app).admission.in_flight == 2
    wait_idle(app)  # given back on the hang-up, while the backend still holds the answers
    backend.gate.set()
