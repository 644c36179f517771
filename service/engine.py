"""The embedded engine: vLLM's CPU build as a supervised child process.

Started when no backend URL is configured. It serves the prepared embedded model
(``PONDER_EMBEDDED_MODEL``, see :mod:`service.model_prep`) on a free loopback port;
the supervisor waits for ``/health`` while logging the engine's own start-up phases
as progress, restarts the engine when it dies, and stops it (whole process group) on
exit. vLLM's and torch's compile caches live beside the prepared models, so a second
start reuses the first one's compiled kernels.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx

from .config import Settings
from .model_prep import default_cache_dir, prepare_model

log = logging.getLogger("ponder.engine")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineError(RuntimeError):
    pass


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def thread_binding(cores: list[int]) -> dict[str, str]:
    """Every core this process may use for the engine's OpenMP threads (vLLM otherwise reserves
    one for its own busy-polling processes and computes on the rest: on 2 cores, one thread).
    Only for a contiguous set (vLLM's ``a-b`` form); otherwise vLLM's own choice stands."""
    if len(cores) < 2 or cores != list(range(cores[0], cores[-1] + 1)):
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# vLLM CPU settings for a small machine, unless the environment sets them
# (measured with loadtests/bench_engine.py --configs; README, "The embedded engine").
ENGINE_ENV_DEFAULTS = {
    # The model runner inside the engine-core process instead of a worker process that the
    # core feeds through busy-polled shared memory: that poll held a whole core even when idle
    # (measured: 1.04 -> 0.13 cores of background load), and the engine starts sooner.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Then every core can compute: tokens/s x1.36 batched and n=1 latency x0.86 against one
    # thread (loadtests/bench_engine.py --configs 1-thread-mp,tuned; README).
    **thread_binding(_cores()),
    # KV cache in GiB. Unset, vLLM takes --gpu-memory-utilization of the machine's RAM
    # (12 GB on a 24 GB machine); 1 GiB holds 23,296 tokens of SmolLM2 in float32 (46 KiB/token;
    # twice that in bf16), e.g. 64 sequences of 360 tokens.
    "VLLM_CPU_KVCACHE_SPACE": "1",
}

# Lines of the engine's log that mark start-up phases; the wait logs them as progress.
PHASE_LINE = re.compile(
    r"Resolved architecture|Starting to load model|Loading weights took|Warming up|[Cc]ompil|"
    r"KV cache|init engine|Starting vLLM|Application startup complete| ERROR |^Traceback|^\w+Error: "
)
NOISE_LINE = re.compile(r"shm_broadcast|DeprecationWarning|warnings\.warn")
VLLM_PREFIX = re.compile(r"^\((?:APIServer|EngineCore|Worker|VllmWorker)[^)]*\) (?:INFO|WARNING|ERROR) \S+ \S+ ")


def compute_dtype(cpuinfo: str | None = None) -> str:
    """bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX), else float32: without
    them torch's bf16 matmuls are ~10x slower than fp32 (measured: loadtests/bench_engine.py)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))
    return "bfloat16" if flags else "float32"


def compile_cache_dirs(model_cache_dir: Path | None) -> dict[str, str]:
    """Where vLLM's AOT-compile cache and torch inductor's kernel cache go: beside the
    prepared models (default ``~/.cache/ponder/compile``), kept across starts."""
    root = (model_cache_dir or default_cache_dir()).parent / "compile"
    return {"VLLM_CACHE_ROOT": str(root / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(root / "torchinductor")}


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ponder dies without stopping the engine (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedEngine:
    """Owns one vLLM OpenAI server process and keeps it alive."""

    def __init__(self, settings: Settings, *, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        """``env`` overrides the engine's environment (the defaults, then ``os.environ``)."""
        self.settings = settings
        self.env_overrides = dict(env or {})
        self.port = settings.engine_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_name = settings.engine_model_name
        self.log_path = log_path
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._phases: collections.deque[str] = collections.deque()
        self._starting = False

    def environment(self) -> dict[str, str]:
        """The engine's environment: tuned defaults < ``os.environ`` < the compile cache
        directories (always ponder's: importing torch, as model preparation does, sets
        ``TORCHINDUCTOR_CACHE_DIR`` in this process) < this engine's overrides, where ``""``
        removes a variable (vLLM reads an empty one as a value, and fails on some)."""
        env = {
            **ENGINE_ENV_DEFAULTS, **os.environ, **compile_cache_dirs(self.settings.model_cache_dir),
            "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            **self.env_overrides,
        }
        return {name: value for name, value in env.items() if not (value == "" and name in self.env_overrides)}

    def command(self, model_dir: Path) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", self.model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--gpu-memory-utilization", "0.5",  # the CPU build's memory check fails at the default
            "--max-model-len", str(self.settings.engine_max_model_len),
            "--dtype", compute_dtype(),
            # torch.compile takes minutes per start on 2 cores and gained nothing measurable
            # here; PONDER_ENGINE_EXTRA_ARGS="--no-enforce-eager" turns it back on.
            "--enforce-eager",
            *self._generation_defaults(),
            *shlex.split(self.settings.engine_extra_args),
        ]

    def _generation_defaults(self) -> list[str]:
        """The sampling temperature for requests that set none, as ponder's strategies use it
        (``Settings.request_temperature``): vLLM's generation-config defaults."""
        temperature = self.settings.request_temperature
        return [] if temperature is None else ["--override-generation-config", json.dumps({"temperature": temperature})]

    async def prepare(self) -> Path:
        """The model directory to serve (converted once, then cached)."""
        return await asyncio.to_thread(prepare_model, self.settings.embedded_recipe, self.settings.model_cache_dir)

    async def start(self) -> None:
        self._model_dir = await self.prepare()
        await self._launch()
        self._watch = asyncio.create_task(self._supervise(), name="ponder-engine-supervisor")

    async def _launch(self) -> None:
        cmd = self.command(self._model_dir)
        recipe = self.settings.embedded_recipe
        log.info("starting embedded vLLM engine on %s: %s (%s) as %r (first start compiles, ~2 min)", self.url,
                 recipe.name, "instruction-tuned" if recipe.instruct else "a base model: use completion mode",
                 self.model_name)
        self._tail.clear()
        self._starting = True
        self._process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.environment(),
                                         start_new_session=True, preexec_fn=_die_with_parent)
        threading.Thread(target=self._read_output, args=(self._process.stdout,), daemon=True,
                         name="ponder-engine-log").start()
        try:
            await self._wait_healthy()
        finally:
            self._starting = False
            self._phases.clear()

    def _read_output(self, stream: IO[bytes]) -> None:
        """Copy the engine's output to the log file (if any), keep its last lines for errors,
        and queue start-up phase lines for the wait to log. Runs until the engine exits."""
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            for raw in stream:
                if out is not None:
                    out.write(raw)
                    out.flush()
                line = raw.decode(errors="replace").rstrip()
                if not line or NOISE_LINE.search(line):
                    continue
                self._tail.append(line)
                if self._starting and PHASE_LINE.search(line):
                    self._phases.append(VLLM_PREFIX.sub("", line)[:200])
        finally:
            stream.close()
            if out is not None:
                out.close()

    async def _wait_healthy(self) -> None:
        started = time.monotonic()
        deadline = started + self.settings.engine_startup_timeout_s
        last_report = started
        async with httpx.AsyncClient() as client:
            while True:
                while self._phases:
                    log.info("engine [%.0fs]: %s", time.monotonic() - started, self._phases.popleft())
                if self._process.poll() is not None:
                    await asyncio.sleep(0.5)  # let the reader take the last lines
                    raise EngineError(
                        f"embedded engine exited with code {self._process.returncode} during start-up"
                        + (f"; see {self.log_path}" if self.log_path else "")
                        + "; last lines:\n" + "\n".join(list(self._tail)[-15:])
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
                if now - last_report >= 30:
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
