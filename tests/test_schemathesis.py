"""Property-based API tests: schemathesis generates requests for every operation of ponder's
OpenAPI document (valid and invalid bodies, paths and query strings) and sends them over HTTP
to ponder in front of a fake OpenAI backend. No answer may be a 5xx, and every 4xx body is an
OpenAI error (``{"error": {"message", "type", "param", "code"}}``). The example count is bounded
(``EXAMPLES`` per operation, ``PONDER_SCHEMATHESIS_EXAMPLES`` to explore further) to keep the
default run short; ``-s`` prints the status histogram."""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterator

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.config import Settings
from tests.fake_openai import FakeOpenAI
from tests.servers import ServedApp

EXAMPLES = int(os.environ.get("PONDER_SCHEMATHESIS_EXAMPLES", "12"))
STATUSES: Counter[int] = Counter()

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string", "minLength": 1},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}},
    }},
}

schema = schemathesis.openapi.from_dict(create_app(Settings(backend_urls="http://unused")).openapi())


@pytest.fixture(scope="module")
def served() -> Iterator[ServedApp]:
    with FakeOpenAI(name="schemathesis") as fake:
        settings_ = Settings(backend_urls=fake.url, model=fake.model, redis_url=None, api_keys="",
                             default_deadline_s=10)
        with ServedApp(create_app(settings_), name="ponder-schemathesis") as app:
            yield app
    print(f"\n[schemathesis] {sum(STATUSES.values())} responses by status: {dict(sorted(STATUSES.items()))}")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_every_error_in_the_openai_schema(case, served: ServedApp) -> None:
    response = case.call(base_url=served.url, timeout=30)
    STATUSES[response.status_code] += 1
    described = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, described
    if response.status_code >= 400:
        jsonschema.validate(response.json(), OPENAI_ERROR)
