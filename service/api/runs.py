"""Asynchronous runs: start now, read the result or follow progress later, from any replica.

A run's record (status, result, progress events) lives in the cache store under
kind ``run`` with a TTL, so another replica sharing the Redis can answer GET and
stream its events. The replica executing a run saves the record as it changes
(coalesced, one writer per run, at most once per ``PONDER_RUN_SAVE_INTERVAL_S``) and
watches for a cancel flag that any replica may set.

Bounded: a run keeps at most ``PONDER_RUN_MAX_EVENTS`` progress events (the terminal
one always fits), an event payload over ``PONDER_RUN_MAX_EVENT_BYTES`` is replaced by a
stub, and a result over ``PONDER_RUN_MAX_RECORD_BYTES`` loses its trace. A finished
run stays in process memory for ``LOCAL_KEEP_S`` only; after that it is read from the
cache store. Admission: a run holds an admission slot from before its 202 until it
ends. A run belongs to the API key that created it (``owner``, a hash of the key).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from strategies import Budget, Cache, Task
from strategies.base import StrategyError

from ..backends import BackendError
from .admission import Slot
from .errors import error_body, failure_body
from .protocol import SolveRequest
from .serving import StrategyRunner, new_id

log = logging.getLogger("ponder.runs")

TERMINAL = {"succeeded", "failed", "cancelled"}
TERMINAL_EVENTS = {"done", "error", "cancelled"}
LOCAL_KEEP_S = 60.0
"""How long a finished run's record stays in this process after its last save."""


def _bounded(data: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    size = len(json.dumps(data, default=str))
    return data if size <= max_bytes else {"truncated": True, "bytes": size}


@dataclass
class LocalRun:
    record: dict[str, Any]
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the record changed; the saver and local event streams wait on it."""
    version: int = 0


class RunManager:
    def __init__(self, runner: StrategyRunner, cache: Cache, *, poll_s: float = 0.25) -> None:
        self.runner = runner
        self.cache = cache
        self.poll_s = poll_s
        self.local: dict[str, LocalRun] = {}

    async def create(self, body: SolveRequest, *, owner: str | None = None,
                     admit: Callable[[], Slot] | None = None) -> dict[str, Any]:
        """Check the request (4xx), take an admission slot (429), then start the run and
        answer its record at once. ``owner``: the creating API key's principal."""
        task, budget = await self.runner.prepare(body)
        slot = admit() if admit is not None else None
        run_id = new_id("run")
        record = {"id": run_id, "status": "queued", "strategy": body.strategy, "created": time.time(),
                  "owner": owner, "result": None, "error": None, "events": []}
        run = LocalRun(record)
        self.local[run_id] = run
        try:
            await self._save(record)  # readable on every replica before the 202
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        run.task = asyncio.create_task(self._execute(run, body, task, budget, slot), name=f"ponder-run-{run_id}")
        return record

    async def _execute(self, run: LocalRun, body: SolveRequest, task: Task, budget: Budget,
                       slot: Slot | None) -> None:
        record = run.record
        settings = self.runner.settings
        saver = asyncio.create_task(self._keep_saved(run))
        watcher = asyncio.create_task(self._watch_cancel(run))

        def on_event(event: str, data: dict[str, Any]) -> None:
            events = record["events"]
            if len(events) < settings.run_max_events - 1 or event in TERMINAL_EVENTS:
                events.append({"seq": len(events), "event": event, "t": round(time.time() - record["created"], 3),
                               "data": _bounded(data, settings.run_max_event_bytes)})
                self._touch(run)

        self._set(run, status="running")
        try:
            result = (await self.runner.solve(body, task, budget, on_event=on_event, run_id=record["id"])).model_dump()
            if len(json.dumps(result, default=str)) > settings.run_max_record_bytes:
                result["trace"] = {"truncated": True, "reason": "larger than PONDER_RUN_MAX_RECORD_BYTES"}
            self._set(run, status="succeeded", result=result)
        except asyncio.CancelledError:
            on_event("cancelled", {})
            self._set(run, status="cancelled")
        except (StrategyError, BackendError) as exc:
            error = failure_body(exc)[1]["error"]
            on_event("error", {"message": error["message"]})
            self._set(run, status="failed", error=error)
        except Exception as exc:  # a run must always end in a terminal state
            log.exception("run %s failed", record["id"])
            on_event("error", {"message": type(exc).__name__})
            self._set(run, status="failed", error=error_body(500, f"internal error: {type(exc).__name__}")["error"])
        finally:
            if slot is not None:
                slot.release()
            watcher.cancel()
            saver.cancel()
            await self._save(record)
            asyncio.get_running_loop().call_later(min(settings.cache_ttl_run_s, LOCAL_KEEP_S),
                                                  self.local.pop, record["id"], None)

    def _set(self, run: LocalRun, **fields: Any) -> None:
        run.record.update(fields)
        self._touch(run)

    @staticmethod
    def _touch(run: LocalRun) -> None:
        run.version += 1
        run.changed.set()
        run.changed = asyncio.Event()  # waiters hold the old (now set) event

    async def _keep_saved(self, run: LocalRun) -> None:
        """One writer per run: save the newest record after each change, coalescing bursts."""
        saved = -1
        while True:
            if run.version == saved:
                await run.changed.wait()
            saved = run.version
            await self._save(run.record)
            await asyncio.sleep(self.runner.settings.run_save_interval_s)

    async def _watch_cancel(self, run: LocalRun) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if await self.cache.get("run", f"{run.record['id']}:cancel"):
                run.task.cancel()
                return

    async def _save(self, record: dict[str, Any]) -> None:
        await self.cache.put("run", record["id"], record)

    async def get(self, run_id: str) -> dict[str, Any] | None:
        if run_id in self.local:
            return self.local[run_id].record
        return await self.cache.get("run", run_id)

    async def cancel(self, run_id: str) -> dict[str, Any] | None:
        record = await self.get(run_id)
        if record is None or record["status"] in TERMINAL:
            return record
        run = self.local.get(run_id)
        if run is not None and run.task is not None:
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
            return run.record
        await self.cache.put("run", f"{run_id}:cancel", True)  # the owning replica acts on it
        return {**record, "status": "cancelling"}

    async def events(self, run_id: str, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """Events in order, live, until the run ends; works for runs on other replicas too."""
        sent = after
        while True:
            run = self.local.get(run_id)
            changed = run.changed if run else None
            record = run.record if run else await self.cache.get("run", run_id)
            if record is None:
                return
            for event in record["events"][sent + 1:]:
                sent = event["seq"]
                yield event
            if record["status"] in TERMINAL:
                return
            if changed is not None:
                await changed.wait()
            else:
                await asyncio.sleep(self.poll_s)

    async def aclose(self) -> None:
        tasks = [r.task for r in self.local.values() if r.task and not r.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
