"""Prometheus metric definitions, registered once per process on import.

A plain module of metric objects: code that records imports the metric it needs.

Cache:

- ``ponder_cache_requests_total{kind,result}``: one per key looked up (``get``,
  ``get_many``, the first lookup of ``get_or_compute``; lock-wait polls are not
  counted) with ``result`` ``hit`` or ``miss``; ``error`` when Redis failed or was
  skipped by the open circuit breaker (the caller got a miss), and also once per
  write that did not reach Redis.
- ``ponder_cache_op_seconds{kind,op}``: latency of Redis round trips actually
  made (failures and timeouts included), ``op`` one of ``get``, ``put``, ``get_many``.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Counter, Gauge, Histogram

from strategies import strategies
from strategies.protocol import Usage

CACHE_REQUESTS = Counter(
    "ponder_cache_requests_total",
    "Cache lookups by outcome (hit, miss, error).",
    ["kind", "result"],
)

CACHE_OP_SECONDS = Histogram(
    "ponder_cache_op_seconds",
    "Latency of Redis cache operations.",
    ["kind", "op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

# -- requests, strategies, backend ---------------------------------------------

REQUESTS = Counter(
    "ponder_http_requests_total",
    "HTTP requests by route template, strategy and status code.",
    ["route", "strategy", "status"],
)

REQUEST_SECONDS = Histogram(
    "ponder_http_request_duration_seconds",
    "HTTP request latency by route template and strategy (streams: until the last byte).",
    ["route", "strategy"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

IN_FLIGHT = Gauge("ponder_http_requests_in_flight", "HTTP requests being served.", ["route"])

STRATEGY_RUNS = Counter("ponder_strategy_runs_total", "Strategy runs by outcome.", ["strategy", "outcome"])

STRATEGY_IN_FLIGHT = Gauge("ponder_strategy_runs_in_flight", "Strategy runs executing now.", ["strategy"])

BACKEND_CALLS = Counter("ponder_backend_calls_total", "Backend generation requests made by strategies.", ["strategy"])

TOKENS = Counter("ponder_tokens_total", "Tokens spent by strategies, over all internal calls.", ["strategy", "type"])

BACKEND_RETRIES = Counter("ponder_backend_retries_total",
                          "Failed backend attempts: retried, or not because the retry budget was spent.",
                          ["outcome"])  # "retried" | "budget_spent"
BACKEND_EJECTIONS = Counter("ponder_backend_ejections_total", "Backend servers taken out of rotation.")
BACKEND_QUEUE_TIMEOUTS = Counter("ponder_backend_queue_timeouts_total",
                                 "Requests answered 503 after waiting the queue deadline for a backend slot.")

CLIENT_DISCONNECTS = Counter("ponder_client_disconnects_total", "Requests cancelled because the client went away.")

ADMISSION_REFUSED = Counter("ponder_admission_refused_total",
                            "Strategy requests answered 429 because the run bound was reached.", ["scope"])


def strategy_label(name: object) -> str:
    """A label value that only ever holds a registered strategy name ("" before one was
    chosen, ``invalid`` for anything else), so junk input cannot mint new series."""
    if name in ("", None):
        return ""
    return name if isinstance(name, str) and name in strategies() else "invalid"


@contextmanager
def track_strategy(strategy: str) -> Iterator[None]:
    STRATEGY_IN_FLIGHT.labels(strategy).inc()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    except BaseException as exc:
        outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
        raise
    finally:
        STRATEGY_IN_FLIGHT.labels(strategy).dec()
        STRATEGY_RUNS.labels(strategy, outcome).inc()


def record_usage(strategy: str, usage: Usage) -> None:
    BACKEND_CALLS.labels(strategy).inc(usage.backend_calls)
    TOKENS.labels(strategy, "prompt").inc(usage.prompt_tokens)
    TOKENS.labels(strategy, "completion").inc(usage.completion_tokens)
