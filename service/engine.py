"""The embedded engine: vLLM's CPU build as a supervised child process.

Started when no backend URL is configured. It serves the prepared Gemma 3 270M
on a free loopback port; the supervisor waits for ``/health`` with visible
progress, restarts the engine when it dies, and stops it (whole process group)
on exit.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .config import Settings
from .model_prep import prepare_model

log = logging.getLogger("ponder.engine")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ponder dies without stopping the engine (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedEngine:
    """Owns one vLLM OpenAI server process and keeps it alive."""

    def __init__(self, settings: Settings, *, log_path: Path | None = None) -> None:
        self.settings = settings
        self.port = settings.engine_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_name = settings.served_model_name
        self.log_path = log_path
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def command(self, model_dir: Path) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", self.model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--gpu-memory-utilization", "0.5",  # the CPU build's memory check fails at the default
            "--max-model-len", str(self.settings.engine_max_model_len),
            "--dtype", "bfloat16",
            *shlex.split(self.settings.engine_extra_args),
        ]

    async def prepare(self) -> Path:
        """The model directory to serve (converted once, then cached)."""
        return await asyncio.to_thread(prepare_model, self.settings.model_cache_dir)

    async def start(self) -> None:
        self._model_dir = await self.prepare()
        await self._launch()
        self._watch = asyncio.create_task(self._supervise(), name="ponder-engine-supervisor")

    async def _launch(self) -> None:
        cmd = self.command(self._model_dir)
        log.info("starting embedded vLLM engine on %s (first start compiles, ~2 min)", self.url)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        await self._wait_healthy()

    async def _wait_healthy(self) -> None:
        started = time.monotonic()
        deadline = started + self.settings.engine_startup_timeout_s
        last_report = started
        async with httpx.AsyncClient() as client:
            while True:
                if self._process.poll() is not None:
                    raise EngineError(
                        f"embedded engine exited with code {self._process.returncode} during start-up"
                        + (f"; see {self.log_path}" if self.log_path else "")
                    )
                try:
                    if (await client.get(self.url + "/health", timeout=2)).status_code == 200:
                        log.info("embedded engine ready after %.0fs", time.monotonic() - started)
                        return
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if now > deadline:
                    self._kill()
                    raise EngineError(f"embedded engine not ready after {self.settings.engine_startup_timeout_s:.0f}s")
                if now - last_report >= 10:
                    log.info("waiting for embedded engine ... %.0fs", now - started)
                    last_report = now
                await asyncio.sleep(0.5)

    async def _supervise(self) -> None:
        """Restart the engine when it dies (e.g. an engine-core crash), with backoff."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            if self._process is None or self._process.poll() is None or self._stopping:
                continue
            self.restarts += 1
            log.error("embedded engine died (code %s); restart #%d", self._process.returncode, self.restarts)
            await asyncio.sleep(min(2 ** min(self.restarts, 5), 30))
            try:
                await self._launch()
            except EngineError:
                log.exception("embedded engine restart failed")

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _kill(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=5)
        except ProcessLookupError:
            pass

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.to_thread(self._kill)
