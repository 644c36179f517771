"""Admission control for strategy work: bounded, never an unbounded queue.

Every strategy run (``/v1/solve``, ``POST /v1/runs``, a proxy request with a strategy,
whose ``n`` runs count as ``n``) takes a slot before it starts and gives it back when it
ends. At most ``PONDER_MAX_CONCURRENT_RUNS`` slots are out at once, and at most
``PONDER_MAX_CONCURRENT_RUNS_PER_KEY`` per API key (without auth there are no keys to
tell callers apart, and only the global bound applies).
A request that does not fit is answered at once with 429 and ``Retry-After``, in the
OpenAI error schema: it never waits in a queue. Pass-through requests take no slot.
"""

from __future__ import annotations

from collections import Counter

from .. import metrics
from .errors import APIError


class Slot:
    """Held strategy capacity; ``release`` is idempotent."""

    def __init__(self, admission: "Admission", client: str | None, weight: int) -> None:
        self._admission, self.client, self.weight = admission, client, weight
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._give_back(self)


class Admission:
    def __init__(self, max_runs: int, max_runs_per_client: int, retry_after_s: int) -> None:
        self.max_runs, self.max_runs_per_client, self.retry_after_s = max_runs, max_runs_per_client, retry_after_s
        self.in_flight = 0
        self.per_client: Counter[str] = Counter()

    def acquire(self, client: str | None, weight: int = 1) -> Slot:
        """Take ``weight`` run slots for ``client`` (an API key's principal; None: no
        per-key bound) or raise a 429 ``APIError``."""
        if self.in_flight + weight > self.max_runs:
            self._refuse("global", f"server busy: {self.in_flight} of {self.max_runs} strategy runs in flight")
        if client is not None and self.per_client[client] + weight > self.max_runs_per_client:
            self._refuse("client", f"too many strategy runs in flight for this API key "
                                   f"({self.per_client[client]} of {self.max_runs_per_client})")
        self.in_flight += weight
        if client is not None:
            self.per_client[client] += weight
        return Slot(self, client, weight)

    def _refuse(self, scope: str, message: str) -> None:
        metrics.ADMISSION_REFUSED.labels(scope).inc()
        raise APIError(429, f"{message}; retry later", code="too_many_runs",
                       headers={"Retry-After": str(self.retry_after_s)})

    def _give_back(self, slot: Slot) -> None:
        self.in_flight -= slot.weight
        if slot.client is not None:
            self.per_client[slot.client] -= slot.weight
            if self.per_client[slot.client] <= 0:
                del self.per_client[slot.client]
