"""The engine supervisor with a stand-in server process: start, health wait, restart on death, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.engine import ENGINE_ENV_DEFAULTS, EmbeddedEngine, EngineError, thread_binding

# A tiny server that answers /health after a short start-up delay, like vLLM does, and
# logs start-up phases the way vLLM's processes do.
STAND_IN = """
import http.server, sys, time
print("(EngineCore pid=1) INFO 11-30 12:00:00 [core.py:1] Initializing a V1 LLM engine", flush=True)
print("(Worker pid=2) INFO 11-30 12:00:01 [cpu_model_runner.py:87] Warming up model for the compilation...",
      flush=True)
print("(EngineCore pid=1) INFO 11-30 12:00:02 [shm_broadcast.py:871] No available shared memory block", flush=True)
time.sleep(float(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class StandInEngine(EmbeddedEngine):
    def __init__(self, settings: Settings, startup_delay: float = 0.3, exit_code: int | None = None) -> None:
        super().__init__(settings)
        self.startup_delay = startup_delay
        self.exit_code = exit_code
        self.exit_message = ""

    async def prepare(self) -> Path:
        return Path("/nonexistent-model")

    def command(self, model_dir: Path) -> list[str]:
        if self.exit_code is not None:
            return [sys.executable, "-c", f"print({self.exit_message!r}); raise SystemExit({self.exit_code})"]
        return [sys.executable, "-c", STAND_IN, str(self.port), str(self.startup_delay)]


async def healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(url + "/health", timeout=1)).status_code == 200
    except httpx.HTTPError:
        return False


async def test_waits_for_health_restarts_after_death_and_stops():
    engine = StandInEngine(Settings())
    await engine.start()
    try:
        assert await healthy(engine.url)
        first_pid = engine._process.pid
        os.kill(first_pid, signal.SIGKILL)  # the engine dies (as the CPU engine does on a bad batch)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if engine.restarts and engine.alive and await healthy(engine.url):
                break
        assert engine.restarts == 1
        assert engine._process.pid != first_pid and await healthy(engine.url)
    finally:
        await engine.stop()
    assert not engine.alive and not await healthy(engine.url)


async def test_start_logs_the_engines_phases_as_progress(caplog, tmp_path):
    log_path = tmp_path / "engine.log"
    engine = StandInEngine(Settings(), startup_delay=0.5)
    engine.log_path = log_path
    with caplog.at_level(logging.INFO, logger="ponder.engine"):
        await engine.start()
    try:
        progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine [")]
        assert any(m.endswith("Warming up model for the compilation...") for m in progress), progress
        assert not any("shm_broadcast" in m or "Initializing" in m for m in progress), progress
        assert "Initializing a V1 LLM engine" in log_path.read_text()  # the whole output still goes to the log
    finally:
        await engine.stop()


async def test_start_fails_clearly_when_the_engine_exits():
    engine = StandInEngine(Settings(), exit_code=3)
    engine.exit_message = "ValueError: the model is broken"
    with pytest.raises(EngineError, match="(?s)exited with code 3.*the model is broken"):
        await engine.start()


def test_engine_environment_defaults_yield_to_the_callers(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_elsewhere")  # what importing torch does
    settings = Settings(model_cache_dir=tmp_path / "models")
    env = EmbeddedEngine(settings).environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == ENGINE_ENV_DEFAULTS["VLLM_CPU_KVCACHE_SPACE"]
    # the compile caches live beside the models, so a second start reuses the first's kernels
    assert env["VLLM_CACHE_ROOT"].startswith(str(tmp_path)) and env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert EmbeddedEngine(settings).environment()["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert EmbeddedEngine(settings, env={"VLLM_CPU_KVCACHE_SPACE": "2"}).environment()["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # "" unsets (loadtests.bench_engine's vllm-defaults): vLLM fails on an empty VLLM_CPU_KVCACHE_SPACE
    assert "VLLM_CPU_KVCACHE_SPACE" not in EmbeddedEngine(settings, env={"VLLM_CPU_KVCACHE_SPACE": ""}).environment()


def test_engine_threads_use_every_core_of_a_contiguous_set():
    assert thread_binding([0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert thread_binding([4, 5, 6, 7])["VLLM_CPU_OMP_THREADS_BIND"] == "4-7"
    assert thread_binding([0]) == {} and thread_binding([0, 2]) == {}  # vLLM's own choice stands
    assert ENGINE_ENV_DEFAULTS["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


async def test_start_times_out():
    engine = StandInEngine(Settings(engine_startup_timeout_s=0.5), startup_delay=30)
    with pytest.raises(EngineError, match="not ready after"):
        await engine.start()
    assert not engine.alive


def test_engine_dies_with_a_killed_parent(tmp_path):
    """SIGKILL of ponder (no clean shutdown) must not orphan the engine."""
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, sys\n"
        "sys.path.insert(0, %r)\n"
        "from tests.test_engine_supervisor import StandInEngine\n"
        "from service.config import Settings\n"
        "async def main():\n"
        "    engine = StandInEngine(Settings())\n"
        "    await engine.start()\n"
        "    print(engine._process.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n" % str(Path(__file__).resolve().parent.parent)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(50):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child_pid, signal.SIGKILL)
    raise AssertionError("engine outlived its killed parent")
