"""locust scenarios: one user class per strategy and surface, plus baselines.

Each user sends one request, waits for the answer, and sends the next (closed loop, no think
time), so the number of users is the concurrency. Pick classes by name or by tag:

    .venv/bin/locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 16 -r 100 -t 20s ProxySelfConsistency RestSelfConsistency
    .venv/bin/locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 16 -r 100 -t 20s --tags self-consistency

Classes (tags): ``DirectMock`` (direct; the backend itself: run it with ``--host <mock URL>``, since
locust's ``--host`` replaces a class's own ``host``; without ``--host`` it uses ``LOAD_MOCK_URL``),
``ProxyPassthrough`` (proxy, none), ``RestNone`` (rest, none), ``ProxySelfConsistency`` /
``RestSelfConsistency`` (self-consistency), ``ProxyBestOfN`` / ``RestBestOfN`` (best-of-n),
``ProxyChecklistBoN`` / ``RestChecklistBoN`` (checklist-bon), ``ProxySelfRefine`` /
``RestSelfRefine`` (self-refine), ``ProxyMCTS`` / ``RestMCTS`` (mcts), ``Optillm`` (optillm;
approach from ``LOAD_OPTILLM_APPROACH``; ``--host`` = the optillm server, or
``LOAD_OPTILLM_URL`` without ``--host``).

Environment:

* ``LOAD_STEPS`` (e.g. ``1,4,16,64``) and ``LOAD_STEP_SECONDS`` (default 10): a step load shape —
  that many users for that long each (the last step ``LOAD_TAIL_SECONDS`` longer), then stop.
  Without ``LOAD_STEPS`` locust's ``-u/-t`` apply.
* ``LOAD_PARAMS``: JSON strategy params replacing the defaults of the selected classes
  (defaults in ``loadtests/harness.py``: self-consistency k=8, best-of-n n=8, checklist-bon n=8,
  self-refine max_rounds=3, mcts simulations=4 branching=2 value_samples=2).
* ``LOAD_CACHE``: ``1`` lets ponder reuse cached checklists/critiques/judgments (default ``0``:
  every request pays for its whole algorithm).
* ``LOAD_OPTILLM_EXTRA``: JSON merged into optillm request bodies (e.g. ``{"k": 8}``).
* ``LOAD_RECORD``: write every request (start time, latency, success) and the step transitions
  to this JSON file when locust quits; ``loadtests/run_load.py`` computes per-step percentiles
  and throughput from it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, constant, events, tag, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.harness import direct_body, proxy_body, rest_body  # noqa: E402

_CACHE = os.environ.get("LOAD_CACHE", "0") == "1"
_PARAMS = json.loads(os.environ["LOAD_PARAMS"]) if os.environ.get("LOAD_PARAMS") else None
_HEADERS = {"content-type": "application/json", "authorization": "Bearer unused"}


def _payload(body: dict) -> bytes:
    return json.dumps(body).encode()


class _JSONUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)
    path = "/"
    req_name = ""
    body: bytes = b"{}"
    network_timeout = 300.0
    connection_timeout = 10.0

    @task
    def call(self) -> None:
        with self.client.post(self.path, data=self.body, headers=_HEADERS, name=self.req_name,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
            elif not response.content or b'"error"' in response.content[:20]:
                response.failure(f"error body: {(response.text or '')[:200]}")


def _proxy(strategy: str) -> bytes:
    return _payload(proxy_body(strategy, _PARAMS, cache=_CACHE))


def _rest(strategy: str) -> bytes:
    return _payload(rest_body(strategy, _PARAMS, cache=_CACHE))


# -- baselines ----------------------------------------------------------------------------


@tag("direct")
class DirectMock(_JSONUser):
    """The backend itself, with the pass-through request: what ponder is compared with."""

    host = os.environ.get("LOAD_MOCK_URL", "http://127.0.0.1:9000")
    path, req_name, body = "/v1/chat/completions", "direct", _payload(direct_body())


@tag("proxy", "none")
class ProxyPassthrough(_JSONUser):
    path, req_name, body = "/v1/chat/completions", "proxy:none", _proxy("none")


@tag("rest", "none")
class RestNone(_JSONUser):
    path, req_name, body = "/v1/solve", "rest:none", _rest("none")


# -- strategies ---------------------------------------------------------------------------


@tag("proxy", "self-consistency")
class ProxySelfConsistency(_JSONUser):
    path, req_name, body = "/v1/chat/completions", "proxy:self-consistency", _proxy("self-consistency")


@tag("rest", "self-consistency")
class RestSelfConsistency(_JSONUser):
    path, req_name, body = "/v1/solve", "rest:self-consistency", _rest("self-consistency")


@tag("proxy", "best-of-n")
class ProxyBestOfN(_JSONUser):
    path, req_name, body = "/v1/chat/completions", "proxy:best-of-n", _proxy("best-of-n")


@tag("rest", "best-of-n")
class RestBestOfN(_JSONUser):
    path, req_name, body = "/v1/solve", "rest:best-of-n", _rest("best-of-n")


@tag("proxy", "checklist-bon")
class ProxyChecklistBoN(_JSONUser):
    path, req_name, body = "/v1/chat/completions", "proxy:checklist-bon", _proxy("checklist-bon")


@tag("rest", "checklist-bon")
class RestChecklistBoN(_JSONUser):
    path, req_name, body = "/v1/solve", "rest:checklist-bon", _rest("checklist-bon")


@tag("proxy", "self-refine")
class ProxySelfRefine(_JSONUser):
    path, req_name, body = "/v1/chat/completions", "proxy:self-refine", _proxy("self-refine")


@tag("rest", "self-refine")
class RestSelfRefine(_JSONUser):
    path, req_name, body = "/v1/solve", "rest:self-refine", _rest("self-refine")


@tag("proxy", "mcts")
class ProxyMCTS(_JSONUser):
    path, req_name, body = "/v1/chat/completions", "proxy:mcts", _proxy("mcts")


@tag("rest", "mcts")
class RestMCTS(_JSONUser):
    path, req_name, body = "/v1/solve", "rest:mcts", _rest("mcts")


# -- optillm (side-by-side) ---------------------------------------------------------------


@tag("optillm")
class Optillm(_JSONUser):
    """optillm's proxy; the approach is chosen by the model prefix, as optillm documents."""

    host = os.environ.get("LOAD_OPTILLM_URL", "http://127.0.0.1:8001")
    path = "/v1/chat/completions"
    req_name = "optillm:" + os.environ.get("LOAD_OPTILLM_APPROACH", "none")
    body = _payload({
        **direct_body(),
        "model": f"{os.environ.get('LOAD_OPTILLM_APPROACH', 'none')}-{direct_body()['model']}",
        **json.loads(os.environ.get("LOAD_OPTILLM_EXTRA") or "{}"),
    })


USER_CLASSES = {cls.__name__: cls for cls in (
    DirectMock, ProxyPassthrough, RestNone, ProxySelfConsistency, RestSelfConsistency, ProxyBestOfN, RestBestOfN,
    ProxyChecklistBoN, RestChecklistBoN, ProxySelfRefine, RestSelfRefine, ProxyMCTS, RestMCTS, Optillm)}


# -- step load -------------------------------------------------------------------------------

_TRANSITIONS: list[tuple[float, int]] = []
_SAMPLES: list[tuple[float, float, bool]] = []

if os.environ.get("LOAD_STEPS"):

    class StepLoad(LoadTestShape):
        """``LOAD_STEPS`` users, ``LOAD_STEP_SECONDS`` each, spawned at once; then stop."""

        steps = [int(s) for s in os.environ["LOAD_STEPS"].split(",") if s.strip()]
        step_seconds = float(os.environ.get("LOAD_STEP_SECONDS", "10"))

        tail_seconds = float(os.environ.get("LOAD_TAIL_SECONDS", "0"))

        def tick(self):  # noqa: ANN201 - locust's signature
            run_time = self.get_run_time()
            index = int(run_time // self.step_seconds)
            if index >= len(self.steps):
                # Hold the last step a little longer, so its last requests finish under its load.
                if run_time < len(self.steps) * self.step_seconds + self.tail_seconds:
                    return self.steps[-1], 1000
                return None
            users = self.steps[index]
            if not _TRANSITIONS or _TRANSITIONS[-1][1] != users:
                _TRANSITIONS.append((time.time(), users))
            return users, 1000


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, start_time=None, **kwargs):  # noqa: ANN001
    if os.environ.get("LOAD_RECORD"):
        start = start_time if start_time is not None else time.time() - response_time / 1000
        _SAMPLES.append((start, response_time, exception is None))


@events.quitting.add_listener
def _dump(environment, **kwargs):  # noqa: ANN001
    path = os.environ.get("LOAD_RECORD")
    if path:
        Path(path).write_text(json.dumps({"transitions": _TRANSITIONS, "samples": _SAMPLES, "end": time.time()}))
