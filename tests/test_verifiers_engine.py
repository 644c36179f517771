"""Every verifier kind over HTTP in front of the real vLLM CPU engine: the verdict in the trace
of each real candidate agrees with an independent check of that candidate's text, rewrites
happen only while nothing passes, and a passing candidate is the answer when there is one.
Wording of the model's answers is never asserted (it depends on the embedded model)."""

from __future__ import annotations

import re
import threading

import httpx
import jsonschema
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.verifiers import extract_json
from tests.servers import ServedApp

pytestmark = pytest.mark.engine


class Hook:
    """A webhook verifier: passes texts without a digit, records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.app = FastAPI()

        @self.app.post("/hooks/no-digits")
        async def check(body: dict):
            with self.lock:
                self.seen.append(body)
            ok = not re.search(r"\d", body["candidate"])
            return {"pass": ok, "score": 1.0 if ok else 0.0, "feedback": "" if ok else "write the number in words"}


@pytest.fixture(scope="module")
def hook():
    hook = Hook()
    with ServedApp(hook.app, name="hook", lifespan="off") as served:
        hook.url = served.url
        yield hook


@pytest.fixture(scope="module")
def http(engine, hook):
    settings = Settings(backend_urls=engine.url, backend_supports_seed=False, model=engine.model_name,
                        allow_code_execution=True, webhook_allowlist=f"{hook.url}/hooks/", verifier_workers=1)
    with ServedApp(create_app(settings), name="ponder") as served:
        with httpx.Client(base_url=served.url, timeout=300) as client:
            yield client


def solve(http: httpx.Client, content: str, verify: list[dict], *, strategy: str = "verified-bon",
          params: dict | None = None, max_tokens: int = 48) -> dict:
    response = http.post("/v1/solve", json={
        "task": {"messages": [{"role": "user", "content": content}]}, "strategy": strategy,
        "params": params if params is not None else {"n": 3, "rounds": 1, "rewrites": 1},
        "sampling": {"max_tokens": max_tokens, "temperature": 0.9}, "verify": verify, "cache": False})
    assert response.status_code == 200, response.text
    return response.json()


def assert_consistent(body: dict, label: str, independent) -> None:
    """Each candidate's verdict is what ``independent(text)`` says; the rules of verified-bon hold."""
    trace = body["trace"]
    candidates = trace["candidates"]
    assert candidates and all(c["text"] is not None for c in candidates)
    for c in candidates:
        verdict = c["verdicts"][label]
        assert verdict["passed"] is independent(c["text"]), c
        assert 0.0 <= verdict["score"] <= 1.0
        assert verdict["passed"] or verdict["feedback"]
    first = [c for c in candidates if c["round"] == 0]
    assert len(first) == 3
    rewrites = [c for c in candidates if c["round"] > 0]
    assert (not rewrites) == any(c["passed"] for c in first)  # rewrites only while nothing passed
    assert trace["passed"] == any(c["passed"] for c in candidates)
    if trace["passed"]:
        assert independent(body["answer"])


def test_json_schema_on_the_engine(http) -> None:
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}

    def valid(text: str) -> bool:
        found, value = extract_json(text)
        return found and not list(jsonschema.Draft202012Validator(schema).iter_errors(value))

    body = solve(http, 'Reply with only a JSON object like {"name": "Ada"} for the cat Tom.',
                 [{"type": "json_schema", "schema": schema}])
    assert_consistent(body, "json_schema", valid)


def test_regex_on_the_engine(http) -> None:
    body = solve(http, "Say hello.", [{"type": "regex", "pattern": "hello", "flags": ["IGNORECASE"], "name": "hi"}])
    assert_consistent(body, "hi", lambda t: re.search("hello", t, re.IGNORECASE) is not None)


def test_ifeval_on_the_engine(http) -> None:
    pytest.importorskip("if_verifiable")
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    def lowercase(text: str) -> bool:
        checker = INSTRUCTION_DICT["change_case:english_lowercase"]("change_case:english_lowercase")
        checker.build_description()
        return bool(text.strip()) and checker.check_following(text)

    body = solve(http, "Describe rain in one sentence, all in lowercase letters.",
                 [{"type": "ifeval", "instructions": [{"id": "change_case:english_lowercase"}]}])
    assert_consistent(body, "ifeval", lowercase)


def test_python_tests_on_the_engine(http) -> None:
    body = solve(http, "Write a Python function add(a, b) that returns a + b, in a ```python code block.",
                 [{"type": "python_tests", "tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}],
                 max_tokens=64)
    trace = body["trace"]
    for c in trace["candidates"]:
        verdict = c["verdicts"]["python_tests"]
        assert verdict["score"] in (0.0, 0.5, 1.0) and verdict["passed"] == (verdict["score"] == 1.0)
        assert verdict["passed"] or verdict["feedback"]
        assert "def add" in c["text"] or not verdict["passed"]  # nothing passes without the function
    assert trace["passed"] == any(c["passed"] for c in trace["candidates"])


def test_webhook_on_the_engine(http, hook) -> None:
    before = len(hook.seen)
    body = solve(http, "Count from one to three.",
                 [{"type": "webhook", "url": f"{hook.url}/hooks/no-digits", "name": "words"}])
    assert_consistent(body, "words", lambda t: not re.search(r"\d", t))
    sent = hook.seen[before:]
    assert {s["candidate"] for s in sent} == {c["text"] for c in body["trace"]["candidates"]}
    assert all(s["task"] == "Count from one to three." and s["name"] == "words" for s in sent)


def test_auto_with_a_verifier_on_the_engine(http) -> None:
    body = solve(http, "Say hello.", [{"type": "regex", "pattern": r"\S", "name": "non-empty"}], strategy="auto",
                 params={"first_wave": 2, "max_samples": 4, "wave_size": 2, "refine_rounds": 1})
    path = body["trace"]["path"]
    assert path[0]["stage"] == "first wave"
    if any(s["passed"] for s in body["trace"]["samples"][:2]):
        assert path[0]["answer_now"] and body["usage"]["backend_calls"] == 1
    else:
        assert not path[0]["answer_now"] and len(path) > 1
